"""The openai backend against a real OpenAI-compatible HTTP server on 127.0.0.1 (a threaded
http.server fake that answers chat completions with the rule rewriter's text wrapped in chatter):
success, a 5xx retried, a timeout as an error row, 4xx / 429 / unreachable classified, and the API
key sent but never logged or shown."""

import json
import logging
import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from pairaug_ray.llm.openai_backend import OpenAIBackend
from pairaug_ray.llm.rule import RuleRewriter
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteRequest, RewriteStage

KEY_ENV = "PAIRAUG_TEST_OPENAI_KEY"
SECRET = "sk-test-9f8e7d6c5b4a-secret"
TIMEOUT_S = 0.4


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []          # {"headers": ..., "body": ...}
        self.calls = defaultdict(int)           # report -> times asked
        self.lock = threading.Lock()

    @property
    def api_base(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status, payload, headers=()):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_POST(self):
        server: FakeOpenAI = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        with server.lock:
            server.requests.append({"headers": dict(self.headers), "body": body})
            server.calls[user] += 1
            n = server.calls[user]
        if "FAIL_ONCE" in user and n == 1:
            return self._send(500, {"error": {"message": "engine hiccup"}})
        if "SLOW" in user:
            time.sleep(TIMEOUT_S * 3)
            return self._send(200, {"choices": []})
        if "ECHO_AUTH" in user:  # a server that echoes credentials in its error body
            return self._send(401, {"error": f"bad key {self.headers.get('Authorization')}"})
        if "RATE" in user:
            return self._send(429, {"error": "slow down"}, [("Retry-After", "0")])
        branch = "inter" if "opposite" in system else "intra"
        text = RuleRewriter().one(RewriteRequest(user, branch, body["seed"]))
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": f'Sure! Here is the rewritten report:\n\n"{text}"'}}]})


@pytest.fixture
def server():
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _config(server, **kw):
    settings = dict(backend="openai", model="fake-cxr-llm", api_base=server.api_base,
                    api_key_env=KEY_ENV, request_timeout_s=TIMEOUT_S, max_retries=2,
                    backoff_s=0.01, concurrency=4)
    return RewriteConfig(**{**settings, **kw})


REPORT = "Small left pleural effusion. No pneumothorax. The heart is enlarged."


def test_success_retry_timeout_and_key_never_logged(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    batch = pd.DataFrame({
        "report": [REPORT, REPORT, REPORT + " FAIL_ONCE", REPORT + " SLOW"],
        "branch": ["inter", "intra", "inter", "inter"], "seed": [11, 12, 13, 14]})
    stage = RewriteStage(_config(server))
    out = stage(batch)

    assert list(out.status) == ["ok", "ok", "ok", "error"]
    for i in range(3):
        expected = RuleRewriter().one(RewriteRequest(batch.report[i], batch.branch[i], int(batch.seed[i])))
        assert out.rewritten_report[i] == expected                      # chatter and quotes stripped
    assert list(out.prompt_id[:3]) == ["inter-v1", "intra-v1", "inter-v1"]
    assert set(out.rewrite_backend[:3]) == {"openai"} and set(out.rewrite_model[:3]) == {"fake-cxr-llm"}
    assert server.calls[REPORT + " FAIL_ONCE"] == 2                     # the 500 was retried
    assert out.error_class[3] == "llm_timeout" and "3 tries" in out.error[3]
    assert server.calls[REPORT + " SLOW"] == 3                          # 1 + max_retries

    bodies = [r["body"] for r in server.requests]
    assert {b["seed"] for b in bodies} == {11, 12, 13, 14}
    assert all(b["temperature"] == 0.5 and b["max_tokens"] == 300 and b["model"] == "fake-cxr-llm"
               for b in bodies)
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in server.requests)

    assert "retry 1/2" in caplog.text                                   # retries are logged ...
    assert SECRET not in caplog.text                                    # ... without the key
    assert not out.astype(str).apply(lambda col: col.str.contains(SECRET)).any().any()
    assert SECRET not in repr(stage.backend) and KEY_ENV in repr(stage.backend)


def test_same_seed_same_text_new_seed_new_request(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    backend = OpenAIBackend(_config(server))
    reqs = [RewriteRequest(REPORT, "inter", s) for s in (1, 1, 2, 3, 4, 5)]
    texts = backend.rewrite(reqs)
    assert texts[0] == texts[1] and len(set(texts[1:])) > 1


def test_server_echoing_the_key_is_redacted_and_not_retried(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    backend = OpenAIBackend(_config(server))
    [err] = backend.rewrite([RewriteRequest(REPORT + " ECHO_AUTH", "inter", 0)])
    assert err.error_class == "llm_http_error" and "401" in str(err)
    assert "[REDACTED]" in str(err) and SECRET not in str(err) and SECRET not in caplog.text
    assert server.calls[REPORT + " ECHO_AUTH"] == 1


def test_rate_limit_and_unreachable_are_classified(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    backend = OpenAIBackend(_config(server, max_retries=1))
    [err] = backend.rewrite([RewriteRequest(REPORT + " RATE", "inter", 0)])
    assert err.error_class == "llm_rate_limited" and server.calls[REPORT + " RATE"] == 2
    assert "Authorization" not in server.requests[0]["headers"]           # no key, no header

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(server, max_retries=1).model_copy(update={"api_base": f"http://127.0.0.1:{port}/v1"})
    [err] = OpenAIBackend(cfg).rewrite([RewriteRequest(REPORT, "inter", 0)])
    assert err.error_class == "llm_unreachable"


def test_openai_backend_needs_a_model_name():
    with pytest.raises(ValueError, match="model"):
        OpenAIBackend(RewriteConfig(backend="openai"))

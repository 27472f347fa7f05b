"""Downstream classification: linear probe or full fine-tune of a VLP's image tower, on Ray Train.

A multi-label head (one logit per class, BCE) sits on the image embedding of a VLP (the projected
pooled output of the image tower, before L2-normalization, standardized with the training set's
feature mean / std, which the workers all-reduce at the start). ``mode="linear"``: the tower is
frozen; each worker encodes its shard once and trains the head. ``mode="full"``: tower, projection
and head train together (DDP). Labels as in zero-shot evaluation (``zeroshot.label_matrix``):
not mentioned = 0, uncertain ignored by default.

Label fractions (1% / 10% / 100%) are drawn **by patient** from the training split: patients are
ordered by a seeded hash and the first ``max(1, round(fraction * n_patients))`` are taken, so no
patient is split between the labeled subset and the rest, the draw is deterministic, and the 1%
subset is inside the 10% one.

The tables are read on the driver (``Store.read_table``) and the images shipped to the workers
through the object store: fine-tuning sets are small, and reading Parquet through Ray Data while
the training workers hold the CPUs of a small cluster can deadlock. One ``TorchTrainer`` run
trains every (model, fraction) job in turn (worker-group start-up is the dominant cost at this
scale); rank 0 reports one checkpoint with every job's weights and the driver scores the test split.

Usage::

    from pairaug_ray.train.finetune import finetune, finetune_models
    res = finetune("runs/vlp/model", "runs/ingest", fraction=0.01, mode="linear", steps=100)
    res["mean_auc"], res["n_train_patients"], res["classes"]["Cardiomegaly"]["auc"]
    per_model = finetune_models(["runs/a/model", "runs/b/model"], "runs/ingest", [0.01, 0.1, 1.0])
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pairaug_ray.labeler import OBSERVATIONS
from pairaug_ray.io.store import StorageConfig, Store, split_protocol
from pairaug_ray.train.zeroshot import LabeledSet, label_matrix, load_labeled, score_classes

DEFAULT_LR = {"linear": 1e-2, "full": 3e-4}


class FinetuneConfig(BaseModel):
    """One fine-tuning run (``finetune(**fields)`` takes the same names)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny://vlp?seed=0", description="VLP folder or tiny:// uri")
    studies: str = Field(..., description="labeled table: ingest folder or CheXpert-style CSV")
    fraction: float = Field(1.0, gt=0, le=1, description="share of training patients with labels")
    mode: Literal["linear", "full"] = "linear"
    steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch (split over workers)")
    lr: float | None = Field(None, description="default: 1e-2 linear, 3e-4 full")
    weight_decay: float = 1e-4
    classes: list[str] | None = None
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    train_split: str = "train"
    test_split: str = "test"
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    seed: int = 0
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the AUC CI (0 = none)")
    storage_path: str | None = Field(None, description="Ray Train run storage; default a temp dir")


def patient_order(patient_ids: Sequence[str], seed: int = 0) -> list[str]:
    """Distinct patients in a seeded, deterministic pseudo-random order."""
    uniq = sorted(set(patient_ids))
    return sorted(uniq, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())


def sample_patients(patient_ids: Sequence[str], fraction: float, seed: int = 0) -> set[str]:
    """The first max(1, round(fraction * n)) patients of `patient_order` (nested across fractions)."""
    order = patient_order(patient_ids, seed)
    if not order:
        return set()
    k = min(len(order), max(1, round(fraction * len(order))))
    return set(order[:k])


def fraction_index(patient_ids: Sequence[str], fraction: float, seed: int = 0) -> list[int]:
    """Row indices of the patients `sample_patients` picks."""
    keep = sample_patients(patient_ids, fraction, seed)
    return [i for i, p in enumerate(patient_ids) if p in keep]


class ImageClassifier(nn.Module):
    """A VLP's image tower + projection + standardization + linear multi-label head."""

    def __init__(self, vlp, n_classes: int):
        super().__init__()
        self.config = vlp.config
        self.vision = vlp.vision
        self.image_projection = vlp.image_projection
        self.vision_channels = vlp.vision_channels
        d = vlp.config.embed_dim
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("feat_std", torch.ones(d))
        self.head = nn.Linear(d, n_classes)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        from pairaug_ray.models.vlp import VLPModel, pool_hidden

        x = VLPModel.preprocess(self, pixels)
        kwargs = {}
        if getattr(self.vision.config, "image_size", x.shape[-1]) != x.shape[-1]:
            kwargs["interpolate_pos_encoding"] = True
        hidden = self.vision(pixel_values=x, **kwargs).last_hidden_state
        return self.image_projection(pool_hidden(hidden, None, self.config.image_pooling))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head((feats - self.feat_mean) / self.feat_std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(pixels))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the known (non-NaN) targets."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])


@torch.no_grad()
def _features(model: ImageClassifier, images: np.ndarray, device, batch: int = 64) -> torch.Tensor:
    out = [model.features(torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).to(device))
           for s in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim, device=device)


def _job_rows(rows: list[int], rank: int, world: int) -> list[int]:
    """This worker's share of a job's rows; a job smaller than the world is replicated instead."""
    return rows[rank::world] if len(rows) >= world else list(rows)


def _standardize(model: ImageClassifier, feats: torch.Tensor) -> None:
    """Set the feature mean / std from sums all-reduced across workers."""
    import torch.distributed as dist

    stats = torch.stack([feats.sum(0), (feats ** 2).sum(0),
                         torch.full_like(model.feat_mean, float(len(feats)))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    model.feat_mean.copy_(mean)
    model.feat_std.copy_((stats[1] / n - mean ** 2).clamp(min=1e-12).sqrt().clamp(min=1e-4))


def _train_loop(config: dict) -> None:
    """Ray Train worker: for each job (a model and a label fraction) train a fresh classifier on
    this worker's share of the job's rows; rank 0 reports one checkpoint holding every job's weights."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = ray.get(config["data_ref"])
    linear = config["mode"] == "linear"
    states, metrics = {}, {}
    frozen_feats: dict[tuple[int, int], torch.Tensor] = {}  # linear: (model, row) encoded once
    for job, (m, rows) in enumerate(config["jobs"]):
        torch.manual_seed(config["seed"])
        model: ImageClassifier = ray.get(config["model_refs"][m]).to(device)  # a fresh copy per job
        mine = _job_rows(rows, rank, world)
        # Copies: object-store arrays are read-only views.
        images = np.array(data["images"][mine])
        targets = torch.from_numpy(np.array(data["targets"][mine]))
        if linear:
            todo = [r for r in mine if (m, r) not in frozen_feats]
            if todo:
                for r, f in zip(todo, _features(model, np.array(data["images"][todo]), device)):
                    frozen_feats[(m, r)] = f
            feats = torch.stack([frozen_feats[(m, r)] for r in mine])
        else:
            feats = _features(model, images, device)
        _standardize(model, feats)

        if linear:  # frozen tower: the head trains on standardized precomputed features
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.head.parameters():
                p.requires_grad_(True)
            inputs, net = (feats - model.feat_mean) / model.feat_std, model.head
        else:
            model.train()
            inputs, net = None, model
        ddp = ray.train.torch.prepare_model(net) if world > 1 else net  # DDP averages the gradients
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=config["lr"],
                                weight_decay=config["weight_decay"])
        per_worker = max(1, math.ceil(config["batch_size"] / world))
        rng = np.random.default_rng([config["seed"], job, rank])
        order, pos, losses = rng.permutation(len(mine)), 0, []
        for _ in range(config["steps"]):
            if pos + per_worker > len(order):
                order, pos = rng.permutation(len(mine)), 0
            idx = order[pos:pos + per_worker]
            pos += per_worker
            if linear:
                logits = ddp(inputs[idx])
            else:
                logits = ddp(torch.from_numpy(np.ascontiguousarray(images[idx])).to(device))
            loss = masked_bce(logits, targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        states[job] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        metrics[f"job{job}_loss_first"] = losses[0]
        metrics[f"job{job}_loss_final"] = float(np.mean(losses[-5:]))
        metrics[f"job{job}_rows_per_worker"] = len(mine)

    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(states, os.path.join(tmp, "classifiers.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


def _load_data(cfg: FinetuneConfig, storage, image_size, train_data, test_data):
    if train_data is None:
        train_data = load_labeled(cfg.studies, cfg.train_split, storage, image_size)
    if test_data is None:
        test_data = load_labeled(cfg.studies, cfg.test_split, storage, image_size)
    return train_data, test_data


def finetune_models(models: Sequence, studies: str = "", fractions: Sequence[float] = (0.01, 0.1, 1.0),
                    mode: str = "linear", steps: int = 100, *, storage: StorageConfig | None = None,
                    train_data: LabeledSet | None = None, test_data: LabeledSet | None = None,
                    **kwargs) -> list[list[dict]]:
    """Fine-tune one classifier per (model, label fraction), all in one Ray Train run.

    ``models``: VLP folders, ``tiny://`` uris or loaded ``VLPModel``s. ``train_data`` /
    ``test_data`` (``zeroshot.load_labeled`` results) skip re-reading the table. Other keywords:
    ``FinetuneConfig`` fields. Returns, per model, one result per fraction: {"mean_auc",
    "mean_auc_chexpert5", "classes", "fraction", "mode", "n_train", "n_train_patients",
    "loss_first", "loss_final", "seconds", ...}.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pairaug_ray.models.vlp import load_vlp

    fractions, models = list(fractions), list(models)
    if not models or not fractions:
        raise ValueError("finetune_models needs at least one model and one fraction")
    names = [str(m) if isinstance(m, (str, os.PathLike)) else "in-memory model" for m in models]
    cfg = FinetuneConfig(model=names[0], studies=studies, fraction=fractions[0], mode=mode,
                         steps=steps, **kwargs)
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {f}")
    t0 = time.perf_counter()
    vlps = [load_vlp(m) if isinstance(m, (str, os.PathLike)) else m for m in models]
    classes = list(cfg.classes or OBSERVATIONS)
    # One copy of the images at the first model's size; each model's preprocess resizes if needed.
    train, test = _load_data(cfg, storage, vlps[0].config.image_size, train_data, test_data)
    rows_of = [fraction_index(train.patient_ids, f, cfg.seed) for f in fractions]
    jobs = [(m, rows) for m in range(len(vlps)) for rows in rows_of]
    targets = label_matrix(train.labels, classes, cfg.uncertain)

    classifiers = []
    for vlp in vlps:
        torch.manual_seed(cfg.seed)
        classifiers.append(ImageClassifier(vlp, len(classes)))
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    data_ref = ray.put({"images": train.images, "targets": targets})
    model_refs = [ray.put(c) for c in classifiers]
    tmp_storage = tempfile.mkdtemp(prefix="pairaug-finetune-") if cfg.storage_path is None else None
    storage_path = cfg.storage_path or tmp_storage
    fs = None
    if split_protocol(storage_path)[0] != "file":
        fs = Store(storage_path, storage).pyarrow_filesystem()
        storage_path = storage_path.split("://", 1)[1]
    run_name = f"finetune-{cfg.mode}-{hashlib.sha1(repr((cfg, names, fractions)).encode()).hexdigest()[:10]}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"data_ref": data_ref, "model_refs": model_refs, "mode": cfg.mode,
                           "jobs": jobs, "steps": cfg.steps, "batch_size": cfg.batch_size,
                           "lr": cfg.lr or DEFAULT_LR[cfg.mode], "weight_decay": cfg.weight_decay,
                           "seed": cfg.seed},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=fs),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            states = torch.load(os.path.join(d, "classifiers.pt"), map_location="cpu")
        metrics = dict(result.metrics or {})
    finally:
        if tmp_storage:
            shutil.rmtree(tmp_storage, ignore_errors=True)
    train_seconds = time.perf_counter() - t0

    y_test = label_matrix(test.labels, classes, cfg.uncertain)
    results: list[list[dict]] = [[] for _ in vlps]
    frozen: dict[int, torch.Tensor] = {}  # linear: test features per model, encoded once
    for job, (m, rows) in enumerate(jobs):
        model = classifiers[m]
        model.load_state_dict(states[job])
        model.eval()
        with torch.no_grad():
            feats = frozen.get(m)
            if feats is None:
                feats = _features(model, test.images, "cpu")
                if cfg.mode == "linear":
                    frozen[m] = feats
            scores = torch.sigmoid(model.classify(feats)).numpy()
        res = score_classes(y_test, scores, classes, bootstrap=cfg.bootstrap, seed=cfg.seed)
        res.update({
            "mode": cfg.mode, "fraction": fractions[job % len(fractions)], "steps": cfg.steps,
            "model": names[m], "n_train": len(rows),
            "n_train_patients": len({train.patient_ids[i] for i in rows}),
            "n_train_patients_total": len(set(train.patient_ids)), "n_test": len(test),
            "loss_first": metrics.get(f"job{job}_loss_first"),
            "loss_final": metrics.get(f"job{job}_loss_final")})
        results[m].append(res)
    total = time.perf_counter() - t0
    for per_model in results:
        for res in per_model:
            res.update({"train_seconds": round(train_seconds, 2), "seconds": round(total, 2)})
    return results


def finetune_fractions(model_uri="tiny://vlp?seed=0", studies: str = "",
                       fractions: Sequence[float] = (0.01, 0.1, 1.0), mode: str = "linear",
                       steps: int = 100, **kwargs) -> list[dict]:
    """One model, one classifier per label fraction (see `finetune_models`)."""
    return finetune_models([model_uri], studies, fractions, mode, steps, **kwargs)[0]


def finetune(model_uri="tiny://vlp?seed=0", studies: str = "", fraction: float = 1.0,
             mode: str = "linear", steps: int = 100, **kwargs) -> dict:
    """Fine-tune on `fraction` of the training patients; per-class test AUC (see `finetune_models`)."""
    return finetune_models([model_uri], studies, [fraction], mode, steps, **kwargs)[0][0]

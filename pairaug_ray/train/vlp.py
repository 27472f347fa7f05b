"""VLP pre-training on Ray Train: CLIP loss over the global batch, checkpoints, resume, metrics.

Usage::

    from pairaug_ray.train.vlp import TrainConfig, train_vlp
    out = train_vlp(TrainConfig(studies="runs/ingest", pairs="runs/augment",
                                mix=["original", "inter", "intra"], steps=200, out="runs/train"))
    model = load_vlp(out["model_dir"])

    pairaug train --studies runs/ingest --pairs runs/augment --mix original,inter,intra \\
        --out runs/train --name pairaug train.steps=500

One `TorchTrainer` run (DDP; gloo on CPU, NCCL on GPU). Each worker encodes its share of the
global batch, the embeddings are all-gathered (`gather_features`) and every worker computes the
symmetric CLIP loss over the whole global batch, so the loss is the single-process loss of that
batch. The local shard's gradient is scaled by the world size before the gather: DDP averages the
gradients of the workers, and each worker only holds the gradient through its own shard, so the
average of the scaled gradients is exactly the single-process gradient (the logit scale, seen
whole by every worker, is unscaled).

Run folder (``out/name``, local or ``s3://``): Ray Train's ``checkpoint_<step>/`` folders (each a
`save_vlp` folder + ``train_state.pt``), ``metrics.jsonl`` (one line per step), ``model/`` (the
final `save_vlp` folder) and Ray Train's own state files. See docs/training.md.
Re-running with the same ``out`` and ``name`` resumes from the latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pairaug_ray.console import SEP, StepProgress
from pairaug_ray.io.store import StorageConfig, Store, split_protocol
from pairaug_ray.models.vlp import clip_loss, gather_features, load_vlp, save_vlp
from pairaug_ray.train.data import SOURCES

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"


class TrainConfig(BaseModel):
    """One VLP training run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    studies: str = Field("pairaug_out/ingest",
                         description="ingest output folder (local or s3://) with studies/")
    pairs: str | None = Field(None, description="augment output folder with pairs/ (kept pairs)")
    mix: list[str] = Field(default_factory=lambda: ["original"],
                           description=f"training sources, any of {list(SOURCES)}")
    ratio: dict[str, float] = Field(default_factory=dict,
                                    description="sampling weight per source (default: natural counts)")
    model: str = Field("tiny://vlp?seed=0", description="load_vlp URI to start from")
    out: str = Field("pairaug_out/train", description="Ray Train storage_path (local or s3://)")
    name: str = Field("vlp", description="run name; re-running with the same out+name resumes")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=2, description="global batch (split over the workers)")
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = Field(20, ge=0)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    checkpoint_every: int = Field(50, ge=1)
    report_every: int = Field(10, ge=1, description="steps between progress lines (rank 0); "
                              "metrics.jsonl gets every step")
    report_metrics: bool = Field(False, description="also call ray.train.report every report_every "
                                 "steps (not only with checkpoints and at the end): each report is a "
                                 "barrier across the workers and waits for the controller's next poll "
                                 "(every 2 s in Ray 2.60), which cost 10-50% of the steps at 0.1 s "
                                 "a step (benchmarks/train_throughput.py)")
    keep_checkpoints: int | None = Field(3, ge=1, description="newest checkpoints kept (None = all)")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1 = always)")
    seed: int = 0
    image_size: int = Field(64, ge=8)
    augment_images: bool = Field(True, description="on-the-fly random crop/intensity jitter")
    splits: list[str] = Field(default_factory=lambda: ["train"])
    log_level: str = Field("WARNING", description="Ray Train's own log level (INFO logs every report)")
    stop_at_step: int | None = Field(None, ge=1, description="end this run (checkpointed) at this "
                                     "step; re-running the same out+name continues to `steps`")
    fail_at_step: int | None = Field(None, ge=1, description="fault injection (tests): the last "
                                     "rank raises once at this step")
    fail_marker: str | None = Field(None, description="file the injected fault creates so that it "
                                    "fires only once (a local path all workers see)")

    @model_validator(mode="after")
    def _check(self):
        unknown = set(self.mix) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown mix sources {sorted(unknown)}; known: {list(SOURCES)}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by num_workers "
                             f"{self.num_workers}")
        if self.fail_at_step is not None and not self.fail_marker:
            raise ValueError("fail_at_step needs fail_marker")
        return self


# ----------------------------------------------------------------------------------------------
# Loss and schedule


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as ``x``; the gradient flowing back through it is multiplied by ``factor``."""
    return x + (factor - 1.0) * (x - x.detach())


def global_contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor,
                            logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss over the embeddings of all workers (see the module docstring for the gradient)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        img_emb, txt_emb = _gather_pair(_scale_grad(img_emb, world), _scale_grad(txt_emb, world))
    return clip_loss(img_emb, txt_emb, logit_scale)


def _gather_pair(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``models.vlp.gather_features`` in ONE all-gather: image and text embeddings [b, D] are
    gathered side by side ([b, 2D]) instead of one collective each; this worker's slice keeps its
    autograd history, the others come without (same result and gradients as gather_features)."""
    if img_emb.dim() != 2 or txt_emb.dim() != 2 or img_emb.shape[0] != txt_emb.shape[0] \
            or img_emb.dtype != txt_emb.dtype:
        return gather_features(img_emb, txt_emb)
    world, rank = dist.get_world_size(), dist.get_rank()
    both = torch.cat([img_emb, txt_emb], dim=1)
    parts = [torch.zeros_like(both) for _ in range(world)]
    dist.all_gather(parts, both.contiguous())
    parts[rank] = both
    gathered = torch.cat(parts, dim=0)
    return gathered[:, :img_emb.shape[1]], gathered[:, img_emb.shape[1]:]


class ContrastiveStep(nn.Module):
    """What DDP wraps: pixels + texts of this worker's shard -> the global-batch loss."""

    def __init__(self, vlp: nn.Module):
        super().__init__()
        self.vlp = vlp

    def forward(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        img, txt = self.vlp.encode_image(pixels), self.vlp.encode_text(texts)
        return global_contrastive_loss(img.float(), txt.float(), self.vlp.scale().float())


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.0):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """CLIP convention: no weight decay on biases, norms, embeddings' gains and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in name or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def step_seed(seed: int, step: int, rank: int) -> int:
    """Torch's global RNG (dropout) is reseeded every step from (seed, step, rank), so the RNG
    state of any step is known without saving it and a resumed run draws the same masks."""
    return (seed * 1_000_003 + step * 8191 + rank) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# Worker side


def _write_text(run_uri: str, storage: StorageConfig, rel: str, text: str) -> None:
    Store(run_uri, storage).write_bytes(rel, text.encode())


def _upload_dir(local: str, run_uri: str, storage: StorageConfig, rel: str) -> str:
    """Copy a local folder to ``run_uri/rel`` (replacing it); returns its URI."""
    store = Store(run_uri, storage)
    dest = store.path(rel)
    if store.is_local:
        tmp = f"{dest}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            store.write_bytes(posixpath.join(rel, path.relative_to(local).as_posix()), path.read_bytes())
    return store.uri_of(rel)


def _maybe_fail(cfg: TrainConfig, step: int, rank: int, world: int) -> None:
    if cfg.fail_at_step == step and rank == world - 1 and not os.path.exists(cfg.fail_marker):
        Path(cfg.fail_marker).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.fail_marker).write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected worker failure at step {step} (rank {rank})")


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    from pairaug_ray.train.data import collate

    cfg = TrainConfig.model_validate(loop_config["train"])
    storage = StorageConfig.model_validate(loop_config["storage"])
    run_uri = loop_config["run_uri"]
    end = loop_config["end_step"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"

    vlp = load_vlp(cfg.model)
    vlp.train()
    opt = torch.optim.AdamW(param_groups(vlp, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    amp_dtype = (torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float16)
    scaler = torch.amp.GradScaler("cuda", enabled=gpu and amp_dtype == torch.float16)

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            vlp.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            state = torch.load(os.path.join(d, TRAIN_STATE_FILE), map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, history = int(state["step"]), list(state["history"])
    vlp.to(device)
    # Buffers are broadcast from rank 0 before every forward unless told otherwise: one more
    # collective (a synchronisation point) per step. Only running statistics (batch norm) need it;
    # the VLP's buffers are constant position / token-type ids.
    sync_buffers = any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                       for m in vlp.modules())
    step_module = ray.train.torch.prepare_model(
        ContrastiveStep(vlp), parallel_strategy_kwargs={"broadcast_buffers": sync_buffers})
    if rank == 0:  # the metrics file holds exactly the steps this run's state has seen
        _write_text(run_uri, storage, METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))

    def save_checkpoint(step: int, metrics: dict) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_vlp(vlp, tmp)
            torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "history": history, "seed": cfg.seed, "world_size": world},
                       os.path.join(tmp, TRAIN_STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
        _write_text(run_uri, storage, METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))

    local_metrics = None
    if rank == 0 and Store(run_uri, storage).is_local:
        local_metrics = open(Store(run_uri, storage).path(METRICS_FILE), "a")
    shard = ray.train.get_dataset_shard("train")
    local_batch = cfg.batch_size // world
    # One line per report, from rank 0 only: the driver shows each worker's stderr once.
    bar = StepProgress(f"train {cfg.name}", total=end, unit="steps", every_s=None, initial=start,
                       interactive=False) if rank == 0 else None
    step, t_prev, run_samples, run_time = start, None, 0, 0.0
    metrics = {"step": start, "resumed_from_step": start}
    # Where a step's time goes (seconds summed over the steps after this run's first):
    # waiting for the batch from Ray Data, collate (PNG decode + augmentation), compute (forward,
    # backward with DDP's all-reduce, optimizer), and bookkeeping (metrics, progress, reports,
    # checkpoints: what the step after them waits for).
    split = dict.fromkeys(("wait_data", "collate", "compute", "bookkeeping"), 0.0)
    batches = iter(shard.iter_batches(batch_size=local_batch, batch_format="numpy", prefetch_batches=2))
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        s = int(batch["step"][0])
        if s < start:          # already trained before the checkpoint we resumed from
            continue
        _maybe_fail(cfg, s + 1, rank, world)
        t0 = time.perf_counter() if t_prev is None else t_prev
        t_got = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, s, rank))
        pixels, texts = collate(batch, cfg.image_size, cfg.augment_images, cfg.seed)
        t_collated = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=gpu):
            loss = step_module(pixels.to(device), texts)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(vlp.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        with torch.no_grad():
            vlp.logit_scale.clamp_(0, math.log(100.0))
        step = s + 1
        t_prev = time.perf_counter()
        dt = t_prev - t0
        if step > start + 1:  # the first step of a (re)start pays start-up costs
            run_samples, run_time = run_samples + cfg.batch_size, run_time + dt
            split["bookkeeping"] += max(0.0, t_wait - t0)  # the previous step's tail
            split["wait_data"] += t_got - t_wait
            split["collate"] += t_collated - t_got
            split["compute"] += t_prev - t_collated
        metrics = {"step": step, "loss": float(loss.detach()), "lr": lr,
                   "logit_scale": float(vlp.scale().detach()), "samples_per_s": cfg.batch_size / dt,
                   "resumed_from_step": start,
                   "run_samples_per_s": run_samples / run_time if run_time else None,
                   **{f"sec_{k}": round(v, 4) for k, v in split.items()}}
        if rank == 0:
            line = {k: metrics[k] for k in ("step", "loss", "lr", "logit_scale", "samples_per_s")}
            line["time"] = time.time()
            history.append(line)
            if local_metrics:
                local_metrics.write(json.dumps(line) + "\n")
                local_metrics.flush()
        # Progress lines come from rank 0 alone. ray.train.report is a barrier across the workers
        # and waits while the controller has not yet taken the previous report (it polls every
        # 2 s in Ray 2.60), so it is called with checkpoints and at the end only (and every
        # report_every steps with report_metrics).
        progress = step % cfg.report_every == 0
        if bar is not None and (progress or step == end):
            bar.update(step - bar.done)
            bar.emit(f"loss {metrics['loss']:.4f}{SEP}lr {lr:.2e}{SEP}{metrics['samples_per_s']:.1f} samples/s")
        if step % cfg.checkpoint_every == 0 or step == end:
            save_checkpoint(step, metrics)
        elif progress and cfg.report_metrics:
            ray.train.report(metrics)
    if local_metrics:
        local_metrics.close()
    if step < end:
        raise RuntimeError(f"the data ran out at step {step} of {end}")
    if start == end:  # nothing left to train: report once so the result carries the metrics
        metrics.update(final_loss=history[-1]["loss"] if history else None)
        ray.train.report(metrics)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_vlp(vlp, tmp)
            _upload_dir(tmp, run_uri, storage, MODEL_DIR)


# ----------------------------------------------------------------------------------------------
# Driver side


def _storage_target(out: str, storage: StorageConfig):
    """(storage_path, storage_filesystem) for RunConfig: plain local path, or s3 via fsspec."""
    proto = split_protocol(out)[0]
    if proto == "file":
        return os.path.abspath(out), None
    store = Store(out, storage)
    return store.root, store.pyarrow_filesystem()


def train_vlp(cfg: TrainConfig, storage: StorageConfig | None = None) -> dict:
    """Train (or resume) the run ``cfg.out/cfg.name``; returns where things are and how it went."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from pairaug_ray.train.data import build_dataset, load_items, plan_batches, source_counts

    storage = storage or StorageConfig()
    if not ray.is_initialized():
        ray.init()
    items = load_items(cfg.studies, cfg.pairs, cfg.mix, cfg.splits, storage)
    end = min(cfg.steps, cfg.stop_at_step or cfg.steps)
    plan = plan_batches(items, cfg.mix, cfg.ratio, end, cfg.batch_size, cfg.seed)
    dataset = build_dataset(items, plan, cfg.num_workers)
    counts = source_counts(items)
    if len(items) < cfg.batch_size:
        log.warning("only %d training items for a batch of %d: batches repeat items, whose "
                    "copies count as negatives of each other", len(items), cfg.batch_size)
    log.info("training items per source: %s", counts)

    out = cfg.out.rstrip("/")
    run_uri = posixpath.join(out, cfg.name) if "://" in out else os.path.join(os.path.abspath(out), cfg.name)
    storage_path, filesystem = _storage_target(out, storage)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"train": cfg.model_dump(), "storage": storage.model_dump(),
                           "run_uri": run_uri, "end_step": end},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level)),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                            enable_shard_locality=False),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    metrics = result.metrics or {}
    ckpt = result.checkpoint
    ckpt_uri = None
    if ckpt is not None:
        ckpt_uri = ckpt.path if filesystem is None else f"{split_protocol(out)[0]}://{ckpt.path}"
    store = Store(run_uri, storage)
    return {
        "model_dir": store.uri_of(MODEL_DIR),
        "run_dir": run_uri,
        "steps": int(metrics.get("step", 0)),
        "final_loss": metrics.get("loss", metrics.get("final_loss")),
        "metrics_file": store.uri_of(METRICS_FILE),
        "samples_per_s": metrics.get("run_samples_per_s"),
        "step_seconds": {k[4:]: metrics[k] for k in ("sec_wait_data", "sec_collate", "sec_compute",
                                                     "sec_bookkeeping") if k in metrics},
        "checkpoint": ckpt_uri,
        "resumed_from_step": int(metrics.get("resumed_from_step", 0)),
        "items_per_source": counts,
        "seconds": round(seconds, 2),
    }


def read_metrics(run_uri: str, storage: StorageConfig | None = None) -> list[dict]:
    """The per-step lines of a run's metrics.jsonl."""
    text = Store(run_uri, storage).read_bytes(METRICS_FILE).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------

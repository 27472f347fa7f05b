"""Text-to-image generator training (the RoentGen recipe) as a Ray Train job.

Usage::

    from pairaug_ray.train.t2i import T2IConfig, train_t2i
    out = train_t2i(T2IConfig(studies="runs/ingest", out="runs/t2i"))     # tiny://sd, from scratch
    pipe = load_sd_pipeline(out["model_dir"])      # what augment.generate.model / edit.model load

    # a real Stable Diffusion folder (RoentGen-style fine-tuning, GPU workers)
    train_t2i(T2IConfig(studies="s3://b/ingest", out="s3://b/t2i", init="/models/sd-v1-5",
                        image_size=512, steps=20000, batch_size=256, lr=5e-6, warmup_steps=500,
                        num_workers=8, use_gpu=True, mixed_precision="bf16", ema=True))

The recipe (RoentGen, Chambon et al. 2022, "Adapting pretrained vision-language foundational
models to medical imaging domains"; the diffusers ``train_text_to_image.py`` example): fine-tune
the UNet, and optionally the CLIP text encoder, of a diffusers Stable Diffusion pipeline on the
studies table's image-report pairs with the standard denoising loss. Per sample: the image is
encoded by the (frozen) VAE and a latent drawn from its posterior, times the VAE's
``scaling_factor``; a timestep t uniform over the init model's training timesteps and Gaussian
noise are drawn; the init model's DDPM noise schedule (``DDPMScheduler.from_config`` of its
scheduler config) noises the latent (``add_noise``); the UNet, conditioned on the text encoder's
last hidden state of the report, predicts the noise (``epsilon``) or the velocity
(``v_prediction``, ``get_velocity``) as the init model's ``prediction_type`` says; loss = mean
squared error, optionally min-SNR-gamma weighted (Hang et al. 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy"), or with ``snr_sampling`` the same objective by importance
sampling: t drawn in proportion to its min-SNR weight, every sample weighed alike. With
probability ``cond_dropout`` the prompt is replaced by the empty prompt, which is what the
pipelines use as the unconditional branch of classifier-free guidance (Ho & Salimans 2022).
AdamW, linear warm-up then cosine decay (``diffusers.optimization.get_scheduler``), gradient
clipping, optional EMA of the UNet (``diffusers.training_utils.EMAModel``; the saved model carries
the EMA weights).

The prompt is the studies row's ``report`` (readable findings + impression, what the augment job
rewrites) cut to the text encoder's length by ``models.diffusion.truncate_prompt``, as the
generate and edit stages cut theirs, then tokenized as the pipelines do (padded to
``model_max_length``, no attention mask).

From ``tiny://sd?...`` (random weights) the job first trains the tiny VAE on the images for
``vae_steps`` (reconstruction MSE + 0.5 L1 + ``vae_kl_weight`` x KL per latent element), then
sets its ``scaling_factor`` to 1 / std of the training latents (as Stable Diffusion's 0.18215 was
chosen, Rombach et al. 2022), then trains the UNet and the text encoder. A local init folder keeps
its VAE (``keep_vae`` None = keep for a folder, train for tiny://).

Determinism and scale-out: the batches are ``train.data.plan_batches`` plans (one for the VAE
phase, one for the UNet phase) streamed to the workers by Ray Data (``train.data.build_dataset``:
one block per step and worker). Every random number of a sample (posterior noise, timestep,
noise, prompt drop, noise offset) comes from a generator seeded by (seed, phase, step, slot in the
global batch), so the global batch's loss and gradient do not depend on how many workers share it:
each worker takes the mean over its equal shard, DDP averages the gradients, and the logged loss
is the all-reduced mean. A resumed run therefore continues the same loss curve.

Run folder ``out`` (local or ``s3://``): Ray Train's ``checkpoint_<step>/`` folders (a
``pipeline/`` ``save_pretrained`` folder + ``train_state.pt``), ``metrics.jsonl`` (one line per
step, both phases; UNet lines also carry the global batch's mean timestep, ``timestep_mean``),
``t2i_run.json`` (the settings fingerprint, written before training: a re-run with other settings
is refused), ``model/`` (the final pipeline) and ``manifest.json`` (time, steps, losses,
fingerprint). Re-running the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pairaug_ray.io.store import StorageConfig, Store, content_hash, split_protocol
from pairaug_ray.labeler import OBSERVATIONS
from pairaug_ray.models.uri import is_tiny
from pairaug_ray.vocab import NO_FINDING

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
PIPELINE_DIR = "pipeline"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "t2i_run.json"
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Fields added after runs and demo caches existed: at this value they train what the code did
# before them, so they stay out of the fingerprint (an older run folder resumes, a cache is reused).
_ADDED_FIELDS = {"finding_balance": 0.0, "finding_weights": {}, "snr_floor": 0.0, "snr_start": 0.0,
                 "snr_stop": 1.0, "snr_sampling": False}
# Fields that do not change what is trained (a resume may change them).
_RUNTIME_FIELDS = frozenset({
    "out", "num_workers", "cpus_per_worker", "use_gpu", "torch_threads", "checkpoint_every",
    "keep_checkpoints", "report_every", "report_metrics", "max_failures", "log_level", "stop_at_step", "fail_at_step",
    "fail_marker", "cache_latents", "mixed_precision", "channels_last",
})


class T2IError(ValueError):
    """A bad input of ``train_t2i``: no usable rows, an init that is not a Stable Diffusion
    pipeline, a resume with other settings. Raised before anything is written."""


class T2IConfig(BaseModel):
    """One text-to-image training run (``pairaug train-t2i``). Defaults: the tiny recipe measured
    on PhantomCXR at 64 px on 2 CPUs (docs/t2i.md); for a real SD checkpoint see the docs."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    studies: str = Field("pairaug_out/ingest",
                         description="ingest output folder (local or s3://) with studies/ (image_png + report)")
    out: str = Field("pairaug_out/t2i", description="run folder (local or s3://): checkpoints, "
                     "metrics.jsonl, manifest.json and model/ (the trained pipeline); re-running "
                     "with the same out resumes")
    init: str = Field("tiny://sd?size=64&seed=0&channels=32,64&cross=64",
                      description="model to start from: tiny://sd?... (random tiny weights) or a "
                      "local diffusers Stable Diffusion folder (model_index.json, unet/, vae/, "
                      "text_encoder/, tokenizer/, scheduler/)")
    splits: list[str] = Field(default_factory=lambda: ["train"], description="studies splits trained on")
    image_size: int | None = Field(None, ge=8, description="training resolution in pixels (images "
                                   "are resized to it); None = the init model's native size")
    steps: int = Field(800, ge=1, description="UNet (+ text encoder) optimisation steps")
    batch_size: int = Field(32, ge=1, description="global batch of the UNet phase (split evenly "
                            "over the workers)")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate of the UNet (RoentGen used "
                      "5e-6 for SD 1.x fine-tuning; tiny models from scratch want ~1e-3)")
    text_encoder_lr: float | None = Field(None, gt=0, description="peak learning rate of the text "
                                          "encoder; None = lr")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="diffusers.optimization.get_scheduler name: warm-up then this decay")
    warmup_steps: int = Field(50, ge=0, description="linear learning-rate warm-up steps")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="what the UNet learns to predict; auto = the init folder's own "
        "(scheduler config), v_prediction for a tiny:// init trained from scratch (measured: an "
        "epsilon-prediction tiny UNet ignored the prompt after 600 steps, a v-prediction one drew "
        "it; docs/t2i.md). Saved in the model's scheduler config")
    train_text_encoder: bool = Field(True, description="also fine-tune the CLIP text encoder")
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="probability of replacing a prompt by "
                                "the empty prompt (classifier-free guidance training)")
    noise_offset: float = Field(0.0, ge=0, description="std of a per-sample, per-channel constant "
                                "added to the noise (Guttenberg 2023); 0 = off")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting "
                                    "(Hang et al. 2023; 5.0 is their default); None = plain MSE. "
                                    "Measured on PhantomCXR (docs/t2i.md): over all UNet steps it "
                                    "drew pneumothorax better and lost the effusion side; for the "
                                    "first half only (snr_stop=0.5) it raised pneumothorax at each "
                                    "of three seeds and kept the effusion side at two")
    snr_floor: float = Field(0.0, ge=0, le=1, description="with snr_gamma: the smallest loss "
                             "weight a timestep gets (min-SNR also cuts the noisiest timesteps, "
                             "weight SNR / (SNR + 1) for v-prediction, to near 0; a floor keeps "
                             "part of them); 0 = min-SNR as published")
    snr_start: float = Field(0.0, ge=0, le=1, description="with snr_gamma: the share of the UNet "
                             "steps trained with plain MSE before min-SNR weighting starts")
    snr_stop: float = Field(1.0, ge=0, le=1, description="with snr_gamma: the share of the UNet "
                            "steps after which min-SNR weighting stops (plain MSE again)")
    snr_sampling: bool = Field(False, description="with snr_gamma: min-SNR as importance sampling. "
                               "Each sample's timestep is drawn with probability ∝ its min-SNR "
                               "weight and every sample weighs the same (the mean weight): the "
                               "same expected loss, but no sample counts for almost nothing (the "
                               "weighted uniform batch's effective size is 0.56 of it at gamma 20, "
                               "v-prediction); off = uniform timesteps, weighted. Measured on "
                               "PhantomCXR (docs/t2i.md): a lower loss, the same fidelity at two "
                               "seeds")
    ema: bool = Field(False, description="keep an exponential moving average of the UNet weights; "
                      "the saved model carries the EMA weights")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay (with EMAModel's warm-up)")
    keep_vae: bool | None = Field(None, description="keep the init model's VAE; None = keep a "
                                  "folder init's, train a tiny:// init's first")
    vae_steps: int = Field(300, ge=0, description="VAE steps before the UNet phase (when the VAE "
                           "is trained)")
    vae_batch_size: int = Field(16, ge=1, description="global batch of the VAE phase")
    vae_lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate of the VAE phase "
                          "(warm-up 20 steps, cosine)")
    vae_kl_weight: float = Field(1e-4, ge=0, description="weight of the KL term (per latent "
                                 "element) against the per-pixel reconstruction loss")
    finding_balance: float = Field(0.0, ge=0, le=1, description="class-balanced sampling of the "
                                   "UNet phase: each image is drawn with probability ∝ n^-beta, n = "
                                   "the training images sharing its rarest positive CheXpert finding "
                                   "(studies labels; none = 'No Finding'); 0 = every image equally "
                                   "often (shuffled epochs), 1 = every finding equally often")
    finding_weights: dict[str, float] = Field(default_factory=dict, description="oversampling of "
                                              "the UNet phase per CheXpert finding: an image positive "
                                              "for a listed finding (labeler state 1) is drawn w times "
                                              "as often (the largest w among its listed findings; "
                                              "others 1), on top of finding_balance; e.g. "
                                              "{Pneumothorax: 4} for a finding that is rare and small")
    augment_images: bool = Field(False, description="train.data.random_augment per sample (crop, "
                                 "rotation, intensity); off by default: PhantomCXR's probes are "
                                 "position-dependent")
    cache_latents: bool = Field(True, description="keep each image's VAE posterior (mean, std) in "
                                "worker memory once the VAE is frozen (8 KB per image at 64 px; "
                                "off for large datasets); ignored with augment_images")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast dtype on "
                                                          "CUDA workers (fp16 adds a GradScaler); CPU "
                                                          "workers train in float32")
    channels_last: bool = Field(True, description="channels_last memory format for the UNet and "
                                "VAE on CUDA")
    num_workers: int = Field(1, ge=1, description="Ray Train DDP workers")
    cpus_per_worker: float = Field(2.0, gt=0, description="CPUs reserved per worker")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker; None = "
                                      "floor(cpus_per_worker), at least 1")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL)")
    seed: int = Field(0, description="seeds the plan of batches and every per-sample draw")
    checkpoint_every: int = Field(200, ge=1, description="steps (VAE + UNet) between checkpoints; "
                                  "the end of the VAE phase and the last step always checkpoint")
    keep_checkpoints: int | None = Field(2, ge=1, description="newest checkpoints kept (None = all)")
    report_every: int = Field(10, ge=1, description="steps between progress lines (rank 0); "
                              "metrics.jsonl gets every step")
    report_metrics: bool = Field(False, description="also call ray.train.report every report_every "
                                 "steps (each report is a barrier that waits for the Train "
                                 "controller's 2 s poll; checkpoints and the end always report)")
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1 = always)")
    log_level: str = Field("WARNING", description="Ray Train's own log level")
    stop_at_step: int | None = Field(None, ge=1, description="end this run (checkpointed) at this "
                                     "global step (VAE steps count first); re-running continues")
    fail_at_step: int | None = Field(None, ge=1, description="fault injection (tests): the last "
                                     "rank raises once at this global step")
    fail_marker: str | None = Field(None, description="file the injected fault creates so that it "
                                    "fires only once")

    @model_validator(mode="after")
    def _check(self):
        for name in ("batch_size", "vae_batch_size"):
            if getattr(self, name) % self.num_workers:
                raise ValueError(f"{name} {getattr(self, name)} must be divisible by num_workers "
                                 f"{self.num_workers}")
        if self.fail_at_step is not None and not self.fail_marker:
            raise ValueError("fail_at_step needs fail_marker")
        if not self.splits:
            raise ValueError("splits must name at least one split")
        unknown = sorted(set(self.finding_weights) - set(OBSERVATIONS))
        if unknown:
            raise ValueError(f"finding_weights names unknown finding(s) {unknown}; "
                             f"known: {list(OBSERVATIONS)}")
        bad = {k: v for k, v in self.finding_weights.items() if not v > 0}
        if bad:
            raise ValueError(f"finding_weights must be > 0, got {bad}")
        if self.snr_start >= self.snr_stop:
            raise ValueError(f"snr_start {self.snr_start} must be below snr_stop {self.snr_stop}")
        return self

    def snr_gamma_at(self, unet_step: int) -> float | None:
        """The min-SNR gamma of UNet step ``unet_step`` (0-based): ``snr_gamma`` inside
        [snr_start, snr_stop) of the UNet steps, else None (plain MSE)."""
        if self.snr_start * self.steps <= unet_step < self.snr_stop * self.steps:
            return self.snr_gamma
        return None

    def trains_vae(self) -> bool:
        """Whether the VAE phase runs (``keep_vae`` None: only for a tiny:// init)."""
        keep = self.keep_vae if self.keep_vae is not None else not is_tiny(self.init)
        return not keep and self.vae_steps > 0

    def resolved_prediction_type(self, init_prediction_type: str) -> str:
        """``prediction_type`` with "auto" resolved for an init whose own type is given."""
        if self.prediction_type != "auto":
            return self.prediction_type
        return "v_prediction" if is_tiny(self.init) else init_prediction_type

    def total_steps(self) -> int:
        return (self.vae_steps if self.trains_vae() else 0) + self.steps


# ----------------------------------------------------------------------------------------------
# Init model: checks, loading, saving


def inspect_init(init: str) -> dict:
    """What the job needs to know about ``init`` before any worker starts.

    Returns {"kind": "tiny" | "folder", "image_size": native pixels, "scheduler": the noise
    scheduler config (dict), "prediction_type"}. Raises ``FileNotFoundError`` for a missing folder
    and ``T2IError`` for a folder that is not a Stable Diffusion pipeline (no ``model_index.json``,
    or a component folder missing) or a bad tiny:// URI. Only local folders (and tiny://) are
    accepted: a hub id or s3:// model must be downloaded first.
    """
    if is_tiny(init):
        from pairaug_ray.models.diffusion import parse_tiny_uri
        from pairaug_ray.models.schedulers import ddim_scheduler

        try:
            kwargs = parse_tiny_uri(init)
        except ValueError as exc:
            raise T2IError(f"bad init {init!r}: {exc}") from None
        sched = dict(ddim_scheduler().config)
        return {"kind": "tiny", "image_size": int(kwargs.get("image_size", 64)), "scheduler": sched,
                "prediction_type": sched.get("prediction_type", "epsilon")}
    if "://" in init:
        raise T2IError(f"init {init!r}: only a local Stable Diffusion folder or tiny://sd?... can "
                       "start a run (download or copy the model folder first)")
    folder = Path(init).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"init model folder {init!r} does not exist")
    index = folder / "model_index.json"
    if not index.is_file():
        raise T2IError(f"init folder {init!r} is not a Stable Diffusion pipeline: no model_index.json "
                       "(expected a diffusers save_pretrained folder)")
    try:
        meta = json.loads(index.read_text())
    except ValueError as exc:
        raise T2IError(f"init folder {init!r}: model_index.json is not JSON ({exc})") from None
    missing = [c for c in SD_COMPONENTS if not meta.get(c) or not (folder / c).is_dir()]
    if missing:
        raise T2IError(f"init folder {init!r} is not a Stable Diffusion pipeline: missing "
                       f"component(s) {missing} (model_index.json class {meta.get('_class_name')!r})")
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
        vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise T2IError(f"init folder {init!r} is not a Stable Diffusion pipeline: {exc}") from None
    size = int(unet_cfg.get("sample_size", 64)) * 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    return {"kind": "folder", "image_size": size, "scheduler": sched,
            "prediction_type": sched.get("prediction_type", "epsilon")}


def _load_pipeline(model: str):
    """The init (or checkpointed) pipeline on CPU in float32, via ``load_sd_pipeline``."""
    from pairaug_ray.models.diffusion import load_sd_pipeline

    return load_sd_pipeline(model, device="cpu", dtype="float32")


def _save_pipeline(pipe, scheduler_config: dict, path: str, unet_state: dict | None = None) -> None:
    """``save_pretrained`` of ``pipe`` with the init's own scheduler config (``load_sd_pipeline``
    swaps in its DDIM sampler on load). ``unet_state``: weights to save instead of the UNet's
    current ones (the EMA weights)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    unet = pipe.unet
    if unet_state is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(pipe.unet.config)
        unet.load_state_dict(unet_state)
    import diffusers

    try:   # the init's own scheduler class (its config names it), with the trained prediction type
        cls = getattr(diffusers, str(scheduler_config.get("_class_name", "")), None) or DDPMScheduler
        scheduler = cls.from_config(scheduler_config)
    except Exception:  # noqa: BLE001 - a scheduler class the config does not fit
        scheduler = DDPMScheduler.from_config(scheduler_config)
    out = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=unet, scheduler=scheduler, safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    out.save_pretrained(path, safe_serialization=True)


# ----------------------------------------------------------------------------------------------
# Data: the training items and the settings fingerprint


def load_t2i_items(cfg: T2IConfig, storage: StorageConfig | None = None):
    """The studies rows of ``cfg.splits`` with an image and a report, as ``train.data`` items.

    Raises ``FileNotFoundError`` when ``cfg.studies`` has no studies table and ``T2IError`` when
    none of its rows is usable (naming the splits present)."""
    import pyarrow.compute as pc

    from pairaug_ray import schema as S
    from pairaug_ray.train.data import load_items

    table = Store(cfg.studies, storage).read_table(S.STUDIES_DIR, columns=["split", "image_png", "report"])
    if table is None:
        raise FileNotFoundError(f"no studies table under {cfg.studies}/{S.STUDIES_DIR} "
                                "(expected an ingest output folder)")
    try:
        items = load_items(cfg.studies, None, ["original"], cfg.splits, storage)
    except ValueError:
        items = None
    if items is None or len(items) == 0:
        splits = sorted({s or "" for s in table["split"].to_pylist()})
        usable = int(pc.sum(pc.and_(pc.greater(pc.binary_length(pc.fill_null(table["image_png"], b"")), 0),
                                    pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(
                                        pc.fill_null(table["report"], ""))), 0))).as_py() or 0)
        raise T2IError(f"studies table {cfg.studies} has no usable rows (an image and a non-empty "
                       f"report) in splits {cfg.splits}: {len(table)} rows, {usable} usable in any "
                       f"split, splits present {splits}")
    return items


def finding_positives(cfg: T2IConfig, items, storage: StorageConfig | None = None) -> list[list[str]]:
    """Per item (``load_t2i_items`` order): its positive CheXpert findings (labeler state 1 in the
    studies table's ``labels``; "No Finding" left out)."""
    from pairaug_ray import schema as S

    table = Store(cfg.studies, storage).read_table(S.STUDIES_DIR, columns=["row_id", "labels"])
    labels = dict(zip(table["row_id"].to_pylist(), table["labels"].to_pylist()))
    positives = []
    for item_id in items["item_id"].to_pylist():
        raw = labels.get(item_id.split(":", 1)[1])
        obs = json.loads(raw) if raw else {}
        positives.append([o for o, v in obs.items() if v == 1 and o != NO_FINDING])
    return positives


def finding_groups(cfg: T2IConfig, items, storage: StorageConfig | None = None,
                   positives: list[list[str]] | None = None) -> list[str]:
    """Per item (``load_t2i_items`` order): its rarest positive CheXpert finding among these items
    (labeler state 1 in the studies table's ``labels``), or "No Finding" when it has none."""
    if positives is None:
        positives = finding_positives(cfg, items, storage)
    counts: dict[str, int] = {}
    for pos in positives:
        for o in pos:
            counts[o] = counts.get(o, 0) + 1
    return [min(pos, key=lambda o: (counts[o], o)) if pos else NO_FINDING for pos in positives]


def finding_multipliers(positives: list[list[str]], finding_weights: dict[str, float]) -> np.ndarray:
    """Per item: the largest ``finding_weights`` value among its positive findings (1 when none is
    listed), the factor ``T2IConfig.finding_weights`` puts on its sampling weight."""
    return np.array([max((finding_weights[o] for o in pos if o in finding_weights), default=1.0)
                     for pos in positives], dtype=np.float64)


def balanced_weights(groups: list[str], beta: float,
                     multipliers: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """(per-item sampling weights summing to 1, {group: {"images": share of the images,
    "samples": expected share of the draws}}), weight ∝ n_group^-beta (class-balanced sampling,
    e.g. Cui et al. 2019 use the same power family) × the item's multiplier (None = 1); beta 0
    and no multipliers = uniform."""
    names, inverse, counts = np.unique(np.asarray(groups, dtype=object), return_inverse=True,
                                       return_counts=True)
    w = counts[inverse].astype(np.float64) ** -beta
    if multipliers is not None:
        w = w * np.asarray(multipliers, dtype=np.float64)
    w /= w.sum()
    shares = {str(n): {"images": round(float(c / len(groups)), 4),
                       "samples": round(float(w[inverse == k].sum()), 4)}
              for k, (n, c) in enumerate(zip(names, counts))}
    return w, dict(sorted(shares.items(), key=lambda kv: -kv[1]["images"]))


def trained_settings(cfg: T2IConfig) -> dict:
    """The config fields that change what is trained, as JSON values: not ``out`` or ``studies``
    (the data is identified by its content, not by the folder it was read from: the same studies
    ingested into another demo output are the same training data), not the runtime fields (worker
    counts, checkpoint cadence, fault injection, precision), and not a field added after runs and
    caches existed while it has the value that trains what the code did before it."""
    return {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in _RUNTIME_FIELDS and k != "studies"
            and not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}


def settings_fingerprint(cfg: T2IConfig, items) -> tuple[str, dict]:
    """(fingerprint, settings): every config field that changes what is trained (not ``out`` or
    ``studies``, worker counts, checkpoint cadence, fault injection, precision), the init, and the
    training data (item count + a hash of the item ids and texts)."""
    settings = trained_settings(cfg)
    ids = items["item_id"].to_pylist()
    texts = items["text"].to_pylist()
    settings["data"] = {"items": len(ids), "hash": content_hash(f"{i}\0{t}" for i, t in zip(ids, texts))}
    return content_hash([json.dumps(settings, sort_keys=True)]), settings


def _check_run_file(run_uri: str, storage: StorageConfig, fingerprint: str, settings: dict) -> bool:
    """Refuse a run folder made with other settings (``T2IError`` naming the fields that differ);
    True when the folder already holds this run (a resume)."""
    store = Store(run_uri, storage)
    if not store.exists(RUN_FILE):
        return False
    try:
        prev = store.read_json(RUN_FILE)
    except ValueError:
        raise T2IError(f"{store.uri_of(RUN_FILE)} is not valid JSON; move the run folder away or "
                       "use another out") from None
    if prev.get("fingerprint") == fingerprint:
        return True
    old = prev.get("settings", {})
    diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
            if old.get(k) != settings.get(k)]
    raise T2IError(f"out folder {run_uri} holds a text-to-image run made with other settings "
                   f"({'; '.join(diff) or 'fingerprint differs'}); re-run with the same settings "
                   "to resume, or choose another out")


# ----------------------------------------------------------------------------------------------
# The two losses (what DDP wraps)


def _sample_seed(seed: int, phase: str, step: int, slot: int) -> int:
    from pairaug_ray.train.data import _seed64

    return _seed64("t2i", seed, phase, step, slot)


def to_vae_input(pixels: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Grayscale [B,1,S,S] in [0,1] -> the VAE's input [B,C,S,S] in [-1,1] (gray repeated)."""
    return (pixels * 2 - 1).repeat(1, channels, 1, 1)


class VAEStep(nn.Module):
    """VAE loss of a batch: encode, draw z = mean + std * ``eps`` (per-sample noise given), decode;
    loss = MSE + 0.5 * L1 (per pixel, images in [-1, 1]) + ``kl_weight`` * KL (per latent element).
    Returns (loss, reconstruction term, KL term), each a batch mean."""

    def __init__(self, vae: nn.Module, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * eps
        rec = self.vae.decode(z).sample.float()
        x = x.float()
        rec_loss = torch.nn.functional.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean()
        kl = (0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float())).mean()
        return rec_loss + self.kl_weight * kl, rec_loss.detach(), kl.detach()


class DenoiseStep(nn.Module):
    """Denoising loss of a batch: text encoder on ``input_ids`` (last hidden state, as the
    pipelines condition), UNet on (``noisy``, ``timesteps``); per-sample MSE to ``target`` times
    ``weights`` (min-SNR), mean over the batch."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text_encoder: bool):
        super().__init__()
        self.unet, self.text_encoder, self.train_text_encoder = unet, text_encoder, train_text_encoder

    def forward(self, noisy, timesteps, input_ids, target, weights):
        if self.train_text_encoder:
            hidden = self.text_encoder(input_ids)[0]
        else:
            with torch.no_grad():
                hidden = self.text_encoder(input_ids)[0]
        pred = self.unet(noisy, timesteps, hidden).sample
        per = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
        return (per * weights).mean()


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None,
                prediction_type: str, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape ``[len(timesteps)]``: min(SNR, gamma)
    / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction (as diffusers'
    train_text_to_image), each raised to at least ``floor``; ones when ``gamma`` is None."""
    if gamma is None:
        return torch.ones(len(timesteps))
    ac = alphas_cumprod[timesteps].double()
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=gamma)
    w = w / (snr + 1) if prediction_type == "v_prediction" else w / snr
    return torch.clamp(w, min=floor).float()


def snr_sampling_distribution(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str,
                              floor: float = 0.0) -> tuple[torch.Tensor, float]:
    """Min-SNR as importance sampling (``T2IConfig.snr_sampling``): ``(probs, weight)``, ``probs`` of
    shape ``[T]`` (T = len(alphas_cumprod), the training timesteps) proportional to each timestep's
    :func:`snr_weights`, ``weight`` their mean. Drawing t ~ probs and weighing every sample by
    ``weight`` has the expected loss of drawing t uniformly and weighing it by its min-SNR weight
    (E_uniform[w L] = mean(w) E_probs[L]), with every sample of a batch counting fully; weighted
    uniform draws have an effective batch of (sum w)^2 / (T sum w^2) of theirs (Kish's effective
    sample size: 0.56 for gamma 20, v-prediction, Stable Diffusion's scaled-linear betas)."""
    w = snr_weights(alphas_cumprod, torch.arange(len(alphas_cumprod)), gamma, prediction_type, floor).double()
    return (w / w.sum()).float(), float(w.mean())


def timestep_plan(cfg: T2IConfig, alphas_cumprod: torch.Tensor, prediction_type: str,
                  unet_step: int) -> tuple[torch.Tensor | None, float | None, float | None]:
    """How UNet step ``unet_step`` (0-based) draws and weighs timesteps: ``(probs, weight, gamma)``.
    ``probs`` [T] and ``weight`` are set when ``snr_sampling`` is on inside the min-SNR span (draw t
    from probs, weigh each sample by weight); otherwise both are None and t is uniform, weighted by
    :func:`snr_weights` with ``gamma`` (None = plain MSE)."""
    gamma = cfg.snr_gamma_at(unet_step)
    if gamma is None or not cfg.snr_sampling:
        return None, None, gamma
    probs, weight = snr_sampling_distribution(alphas_cumprod, gamma, prediction_type, cfg.snr_floor)
    return probs, weight, gamma


def draw_timestep(g: torch.Generator, n_train_timesteps: int, probs: torch.Tensor | None) -> torch.Tensor:
    """One sample's timestep, shape [1]: uniform over [0, n_train_timesteps), or from ``probs``."""
    if probs is None:
        return torch.randint(0, n_train_timesteps, (1,), generator=g)
    return torch.multinomial(probs, 1, generator=g)


def _all_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the workers (e.g. the loss of the global batch); itself on one worker."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x / dist.get_world_size()
    return x.detach()


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# ----------------------------------------------------------------------------------------------
# Worker side


def _maybe_fail(cfg: T2IConfig, step: int, rank: int, world: int) -> None:
    if cfg.fail_at_step == step and rank == world - 1 and not os.path.exists(cfg.fail_marker):
        Path(cfg.fail_marker).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.fail_marker).write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected worker failure at step {step} (rank {rank})")


class _Tokens:
    """Prompt -> input ids as the pipelines make them (truncate_prompt, pad to max length)."""

    def __init__(self, tokenizer):
        from pairaug_ray.models.diffusion import truncate_prompt

        self.tok, self.cut, self.cache = tokenizer, truncate_prompt, {}
        self.empty = self(["" ])[0]

    def __call__(self, texts) -> torch.Tensor:
        out = []
        for t in texts:
            ids = self.cache.get(t)
            if ids is None:
                ids = self.tok(self.cut(self.tok, str(t)) if t else "", padding="max_length",
                               max_length=self.tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids[0]
                if len(self.cache) < 200_000:
                    self.cache[t] = ids
            out.append(ids)
        return torch.stack(out)


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from pairaug_ray.console import SEP, StepProgress
    from pairaug_ray.train.data import collate
    from pairaug_ray.train.vlp import _upload_dir, _write_text

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # No "Loading weights" / "Writing model shards" bars per checkpoint in the job's console.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    cfg = T2IConfig.model_validate(loop_config["train"])
    storage = StorageConfig.model_validate(loop_config["storage"])
    run_uri, size = loop_config["run_uri"], int(loop_config["image_size"])
    sched_cfg, pred_type = loop_config["scheduler"], loop_config["prediction_type"]
    vae_end, end = int(loop_config["vae_end"]), int(loop_config["end_step"])
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    use_amp = gpu and amp_dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    fmt = torch.channels_last if gpu and cfg.channels_last else torch.contiguous_format

    start, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            pipe = _load_pipeline(os.path.join(d, PIPELINE_DIR))
            state = torch.load(os.path.join(d, TRAIN_STATE_FILE), map_location="cpu", weights_only=False)
        start, history = int(state["step"]), list(state["history"])
    else:
        pipe = _load_pipeline(cfg.init)
    vae, unet, text_encoder, tokens = pipe.vae, pipe.unet, pipe.text_encoder, _Tokens(pipe.tokenizer)
    for m in (vae, unet, text_encoder):
        m.requires_grad_(False)
        m.eval()
    vae.to(device, memory_format=fmt)
    unet.to(device, memory_format=fmt)
    text_encoder.to(device)
    store = Store(run_uri, storage)
    if rank == 0:  # the metrics file holds exactly the steps this run's state has seen
        _write_text(run_uri, storage, METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))
    local_metrics = open(store.path(METRICS_FILE), "a") if rank == 0 and store.is_local else None
    phase_state: dict = {}

    def save_checkpoint(step: int, metrics: dict, train_state: dict) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _save_pipeline(pipe, sched_cfg, os.path.join(tmp, PIPELINE_DIR))
            torch.save({"step": step, "history": history, "seed": cfg.seed, "world_size": world,
                        **train_state}, os.path.join(tmp, TRAIN_STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")
        _write_text(run_uri, storage, METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))

    # One progress line per report_every steps, from rank 0 only (the driver shows each
    # worker's stderr once).
    bar = StepProgress("train-t2i", total=end, unit="steps", every_s=None, initial=start,
                       interactive=False) if rank == 0 else None

    def log_step(step: int, line: dict) -> dict:
        line = {"step": step, **line, "time": time.time()}
        if rank == 0:
            history.append(line)
            if local_metrics:
                local_metrics.write(json.dumps(line) + "\n")
                local_metrics.flush()
        if bar is not None and (step % cfg.report_every == 0 or step == end):
            bar.update(step - bar.done)
            extra = f"{SEP}rec {line['rec']:.4f}" if "rec" in line else ""
            bar.emit(f"{line['phase']}{SEP}loss {line['loss']:.4f}{extra}{SEP}lr {line['lr']:.2e}"
                     f"{SEP}{line['samples_per_s']:.1f} samples/s")
        return {**line, "resumed_from_step": start}

    def after_step(step: int, metrics: dict, train_state) -> None:
        # ray.train.report is a barrier across the workers that waits for the controller's poll
        # (2 s in Ray 2.60): every rank reports at the same steps, and only with checkpoints
        # (every checkpoint_every steps, at the end of the VAE phase, at the end) unless
        # report_metrics asks for the progress steps too.
        if step % cfg.checkpoint_every == 0 or step == end or step == vae_end:
            save_checkpoint(step, metrics, train_state())
        elif cfg.report_metrics and step % cfg.report_every == 0:
            ray.train.report(metrics)

    metrics = {"step": start, "resumed_from_step": start}
    step = start
    # ---------------------------------------------------------------- phase 1: the VAE
    if start < min(vae_end, end):
        vae.requires_grad_(True)
        vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=cfg.adam_betas, weight_decay=0.0)
        lrs = get_scheduler("cosine", opt, num_warmup_steps=min(20, vae_end // 10), num_training_steps=vae_end)
        if state and state.get("phase") == "vae":
            opt.load_state_dict(state["optimizer"])
            lrs.load_state_dict(state["scheduler"])
        # No running statistics anywhere (GroupNorm, LayerNorm): DDP need not broadcast buffers
        # before every forward (one collective less per step).
        vae_step = ray.train.torch.prepare_model(VAEStep(vae, cfg.vae_kl_weight), move_to_device=False,
                                                 parallel_strategy_kwargs={"broadcast_buffers": False})
        local = cfg.vae_batch_size // world
        t_prev = None
        shard = ray.train.get_dataset_shard("vae")
        for batch in shard.iter_batches(batch_size=local, batch_format="numpy", prefetch_batches=2):
            s = int(batch["step"][0])
            if s < start:
                continue
            if s >= min(vae_end, end):
                break
            _maybe_fail(cfg, s + 1, rank, world)
            t0 = time.perf_counter() if t_prev is None else t_prev
            pixels, _ = collate(batch, size, cfg.augment_images, cfg.seed)
            gens = [torch.Generator().manual_seed(_sample_seed(cfg.seed, "vae", s, int(sl)))
                    for sl in batch["slot"]]
            x = to_vae_input(pixels, vae.config.in_channels)
            lat = size // (2 ** (len(vae.config.block_out_channels) - 1))
            eps = torch.stack([torch.randn(vae.config.latent_channels, lat, lat, generator=g) for g in gens])
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                loss, rec, kl = vae_step(x.to(device, memory_format=fmt), eps.to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]
            lrs.step()
            step = s + 1
            t_prev = time.perf_counter()
            metrics = log_step(step, {"phase": "vae", "loss": float(_all_mean(loss)),
                                      "rec": float(_all_mean(rec)), "kl": float(_all_mean(kl)), "lr": lr,
                                      "samples_per_s": cfg.vae_batch_size / (t_prev - t0)})
            if step == vae_end:
                # Stable Diffusion's latent scale: 1 / std of the training latents, i.e. of
                # posterior samples (variance of the means + mean posterior variance), over the
                # last global batch (every worker's shard) after the last update.
                vae.eval()
                with torch.no_grad():
                    post = vae.encode(x.to(device, memory_format=fmt)).latent_dist
                    mu, var = post.mean.double().cpu(), post.var.double().cpu()
                stats = _all_sum(torch.tensor([mu.numel(), mu.sum(), (mu ** 2).sum(), var.sum()],
                                              dtype=torch.float64))
                n, s1, s2, sv = stats.tolist()
                std = math.sqrt(max(s2 / n - (s1 / n) ** 2 + sv / n, 1e-12))
                vae.register_to_config(scaling_factor=float(1.0 / std))
                metrics["vae_scaling_factor"] = 1.0 / std
                if rank == 0:
                    history[-1]["vae_scaling_factor"] = 1.0 / std
            after_step(step, metrics, lambda: {"phase": "vae", "optimizer": opt.state_dict(),
                                               "scheduler": lrs.state_dict()})
        vae.requires_grad_(False)
        vae.eval()
        del vae_step, opt
    # ---------------------------------------------------------------- phase 2: UNet + text encoder
    if step < end and step >= vae_end:
        noise_sched = DDPMScheduler.from_config(sched_cfg)
        alphas = noise_sched.alphas_cumprod
        n_train_t = int(noise_sched.config.num_train_timesteps)
        unet.requires_grad_(True)
        unet.train()
        groups = [{"params": [p for p in unet.parameters()], "lr": cfg.lr}]
        if cfg.train_text_encoder:
            text_encoder.requires_grad_(True)
            text_encoder.train()
            groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_lr or cfg.lr})
        opt = torch.optim.AdamW(groups, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        lrs = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                            num_training_steps=cfg.steps)
        ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
        if state and state.get("phase") == "unet":
            opt.load_state_dict(state["optimizer"])
            lrs.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            if state.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.to(device)
        denoise = ray.train.torch.prepare_model(DenoiseStep(unet, text_encoder, cfg.train_text_encoder),
                                                move_to_device=False,
                                                parallel_strategy_kwargs={"broadcast_buffers": False})
        trainable = [p for g in groups for p in g["params"]]
        scale = float(vae.config.scaling_factor)
        shift = vae.config.get("shift_factor", None) or 0.0
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        use_cache = cfg.cache_latents and not cfg.augment_images
        local = cfg.batch_size // world
        t_prev = None
        shard = ray.train.get_dataset_shard("unet")
        for batch in shard.iter_batches(batch_size=local, batch_format="numpy", prefetch_batches=2):
            s = int(batch["step"][0]) + vae_end
            if s < start:
                continue
            if s >= end:
                break
            _maybe_fail(cfg, s + 1, rank, world)
            t0 = time.perf_counter() if t_prev is None else t_prev
            items = [int(i) for i in batch["item"]]
            todo = [k for k, i in enumerate(items) if not use_cache or i not in cache]
            posts = {}
            if todo:
                sub = {k: v[todo] for k, v in batch.items()}
                pixels, _ = collate(sub, size, cfg.augment_images, cfg.seed)
                with torch.no_grad():
                    d = vae.encode(to_vae_input(pixels, vae.config.in_channels).to(device, memory_format=fmt)).latent_dist
                    mean, std = d.mean.float().cpu(), d.std.float().cpu()
                for j, k in enumerate(todo):
                    posts[k] = (mean[j], std[j])
                    if use_cache:
                        cache[items[k]] = posts[k]
            mus, sds = zip(*[posts[k] if k in posts else cache[i] for k, i in enumerate(items)])
            latents, noises, ts, drop = [], [], [], []
            probs, t_weight, gamma = timestep_plan(cfg, alphas, pred_type, s - vae_end)
            for k, sl in enumerate(batch["slot"]):
                g = torch.Generator().manual_seed(_sample_seed(cfg.seed, "unet", s, int(sl)))
                t = draw_timestep(g, n_train_t, probs)
                u = torch.rand(1, generator=g)
                eps = torch.randn(mus[k].shape, generator=g)
                noise = torch.randn(mus[k].shape, generator=g)
                if cfg.noise_offset:
                    noise = noise + cfg.noise_offset * torch.randn(mus[k].shape[0], 1, 1, generator=g)
                latents.append(((mus[k] + sds[k] * eps) - shift) * scale)
                noises.append(noise)
                ts.append(t)
                drop.append(bool(u < cfg.cond_dropout))
            latents, noise, timesteps = torch.stack(latents), torch.stack(noises), torch.cat(ts)
            noisy = noise_sched.add_noise(latents, noise, timesteps)
            if pred_type == "v_prediction":
                target = noise_sched.get_velocity(latents, noise, timesteps)
            elif pred_type == "epsilon":
                target = noise
            else:
                raise ValueError(f"unsupported prediction_type {pred_type!r} (epsilon or v_prediction)")
            texts = ["" if dr else t for dr, t in zip(drop, batch["text"])]
            ids = tokens(texts)
            weights = (torch.full((len(timesteps),), t_weight) if probs is not None
                       else snr_weights(alphas, timesteps, gamma, pred_type, cfg.snr_floor))
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                loss = denoise(noisy.to(device, memory_format=fmt), timesteps.to(device), ids.to(device),
                               target.to(device), weights.to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]
            lrs.step()
            if ema is not None:
                ema.step(unet.parameters())
            step = s + 1
            t_prev = time.perf_counter()
            # one all-reduce for both: the global batch's loss and mean timestep
            loss_g, t_mean = _all_mean(torch.stack([loss.detach().float(),
                                                    timesteps.float().mean().to(loss.device)])).tolist()
            metrics = log_step(step, {"phase": "unet", "loss": loss_g, "lr": lr, "timestep_mean": t_mean,
                                      "samples_per_s": cfg.batch_size / (t_prev - t0)})
            after_step(step, metrics, lambda: {
                "phase": "unet", "optimizer": opt.state_dict(), "scheduler": lrs.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None})
        phase_state["ema"] = ema
    if local_metrics:
        local_metrics.close()
    if bar is not None:
        bar.close()
    if step < end:
        raise RuntimeError(f"the data ran out at step {step} of {end}")
    if start == end:  # nothing left to train: report once so the result carries the metrics
        last = history[-1] if history else {}
        metrics.update(loss=last.get("loss"), phase=last.get("phase"))
        ray.train.report(metrics)
    if rank == 0:
        unet.eval()
        text_encoder.eval()
        ema = phase_state.get("ema")
        if ema is None and cfg.ema and state and state.get("ema"):   # resumed at the end
            from diffusers.training_utils import EMAModel

            ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
            ema.load_state_dict(state["ema"])
        unet_state = None
        if ema is not None:
            shadow = [p.detach().clone().cpu() for p in ema.shadow_params]
            unet_state = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
            for (name, _), p in zip(((n, q) for n, q in unet.named_parameters()), shadow):
                unet_state[name] = p
        pipe.to("cpu")
        with tempfile.TemporaryDirectory() as tmp:
            _save_pipeline(pipe, sched_cfg, tmp, unet_state)
            _upload_dir(tmp, run_uri, storage, MODEL_DIR)


# ----------------------------------------------------------------------------------------------
# Driver side


def _run_uri(out: str) -> str:
    out = out.rstrip("/")
    return out if "://" in out else os.path.abspath(out)


def _latest_step(run_uri: str, storage: StorageConfig) -> int:
    """Step of the newest ``checkpoint_*`` folder in the run folder (0 when none)."""
    store = Store(run_uri, storage)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in store.fs.ls(store.root, detail=False)]
    except (FileNotFoundError, OSError):
        return 0
    steps = [int(n.split("_")[1]) for n in names if n.startswith("checkpoint_") and n.split("_")[1].isdigit()]
    return max(steps, default=0)


def train_t2i(cfg: T2IConfig, storage: StorageConfig | None = None) -> dict:
    """Train (or resume) the text-to-image run in ``cfg.out``; assumes Ray is up (else
    ``ray.init()``).

    Returns {"model_dir", "run_dir", "steps" (UNet steps done), "vae_steps", "final_loss",
    "metrics_file", "checkpoint", "resumed_from_step", "items", "image_size", "prediction_type",
    "fingerprint", "seconds"}. Raises ``FileNotFoundError`` (no studies table, missing init
    folder) or ``T2IError`` (no usable rows, init not a Stable Diffusion pipeline, a run folder
    made with other settings) before anything is written.
    """
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from pairaug_ray.train.data import build_dataset, plan_batches, plan_weighted
    from pairaug_ray.train.vlp import _storage_target

    storage = storage or StorageConfig()
    init = inspect_init(cfg.init)
    pred_type = cfg.resolved_prediction_type(init["prediction_type"])
    if pred_type not in ("epsilon", "v_prediction"):
        raise T2IError(f"init {cfg.init!r} predicts {pred_type!r}; only epsilon and "
                       "v_prediction models can be trained")
    if pred_type != init["prediction_type"] and init["kind"] == "folder":
        log.warning("training %s with prediction_type %s (the init predicts %s): expect a long "
                    "re-adaptation", cfg.init, pred_type, init["prediction_type"])
    init["scheduler"] = {**init["scheduler"], "prediction_type": pred_type}
    init["prediction_type"] = pred_type
    size = int(cfg.image_size or init["image_size"])
    items = load_t2i_items(cfg, storage)
    fingerprint, settings = settings_fingerprint(cfg, items)
    run_uri = _run_uri(cfg.out)
    if run_uri.split("://", 1)[-1].strip("/").count("/") < (1 if "://" in run_uri else 0):
        raise T2IError(f"out {cfg.out!r} needs a folder inside the bucket (s3://bucket/run)")
    resuming = _check_run_file(run_uri, storage, fingerprint, settings)
    store = Store(run_uri, storage)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if not resuming:
        store.write_json(RUN_FILE, {"fingerprint": fingerprint, "settings": settings,
                                    "created_at": started})
    if not ray.is_initialized():
        ray.init()

    vae_end = cfg.vae_steps if cfg.trains_vae() else 0
    end = min(cfg.total_steps(), cfg.stop_at_step or cfg.total_steps())
    datasets = {}
    n_vae = min(vae_end, end)
    latest = _latest_step(run_uri, storage) if resuming else 0
    if n_vae > latest:   # the VAE phase still has steps to run
        datasets["vae"] = build_dataset(items, plan_batches(items, ["original"], {}, n_vae,
                                                            cfg.vae_batch_size, cfg.seed + 7919),
                                        cfg.num_workers)
    shares = None
    if end > vae_end:
        if cfg.finding_balance or cfg.finding_weights:
            positives = finding_positives(cfg, items, storage)
            weights, shares = balanced_weights(finding_groups(cfg, items, positives=positives),
                                               cfg.finding_balance,
                                               finding_multipliers(positives, cfg.finding_weights))
            plan = plan_weighted(weights, end - vae_end, cfg.batch_size, cfg.seed)
        else:
            plan = plan_batches(items, ["original"], {}, end - vae_end, cfg.batch_size, cfg.seed)
        datasets["unet"] = build_dataset(items, plan, cfg.num_workers)
    if len(items) < cfg.batch_size:
        log.warning("only %d training images for a batch of %d: batches repeat images", len(items),
                    cfg.batch_size)
    parent, name = posixpath.split(run_uri) if "://" in run_uri else os.path.split(run_uri)
    storage_path, filesystem = _storage_target(parent, storage)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"train": cfg.model_dump(mode="json"), "storage": storage.model_dump(),
                           "run_uri": run_uri, "image_size": size, "scheduler": init["scheduler"],
                           "prediction_type": init["prediction_type"], "vae_end": vae_end,
                           "end_step": end},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=cfg.log_level)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                            enable_shard_locality=False),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
    )
    t0, wall0 = time.perf_counter(), time.time()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    metrics = result.metrics or {}
    ckpt = result.checkpoint
    ckpt_uri = None
    if ckpt is not None:
        ckpt_uri = ckpt.path if filesystem is None else f"{split_protocol(run_uri)[0]}://{ckpt.path}"
    history = read_t2i_metrics(run_uri, storage)
    unet_losses = [h["loss"] for h in history if h.get("phase") == "unet"]
    vae_losses = [h.get("rec") for h in history if h.get("phase") == "vae"]
    step = int(metrics.get("step", 0))
    new_lines = [h for h in history if h.get("time", 0) >= wall0]
    # Ray Train's share of the wall time: before this run's first step (workers, data, model
    # load) and after its last one (final checkpoint and model upload, shutdown).
    overhead = ({"startup_s": round(new_lines[0]["time"] - wall0, 1),
                 "teardown_s": round(wall0 + seconds - new_lines[-1]["time"], 1)} if new_lines else {})
    out = {
        "model_dir": store.uri_of(MODEL_DIR),
        "run_dir": run_uri,
        "steps": max(0, step - vae_end),
        "vae_steps": min(step, vae_end),
        "complete": step >= cfg.total_steps(),
        "final_loss": unet_losses[-1] if unet_losses else None,
        "metrics_file": store.uri_of(METRICS_FILE),
        "checkpoint": ckpt_uri,
        # A run with nothing left to train reports no checkpoint, and Ray Train's result then
        # carries the restored checkpoint's metrics: the step found on storage says it.
        "resumed_from_step": latest,
        "items": len(items),
        "image_size": size,
        "prediction_type": init["prediction_type"],
        "fingerprint": fingerprint,
        "seconds": round(seconds, 2),
        **overhead,
    }
    manifest = {**out, "started_at": started,
                "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "config": cfg.model_dump(mode="json"), "settings": settings,
                "loss_summary": loss_summary(unet_losses),
                "vae_rec_first_last": [vae_losses[0], vae_losses[-1]] if vae_losses else None,
                "finding_shares": shares,
                "vae_scaling_factor": next((h["vae_scaling_factor"] for h in history
                                            if "vae_scaling_factor" in h), None),
                "versions": _versions()}
    store.write_json(MANIFEST_FILE, manifest)
    return out


def default_cache_dir() -> str:
    """The user's cache folder for trained generators: ``$PAIRAUG_CACHE/t2i`` when set, else
    ``~/.cache/pairaug/t2i`` (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get("PAIRAUG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pairaug")
    return os.path.join(root, "t2i")


def cache_key(cfg: T2IConfig, items) -> str:
    """``cached_t2i``'s folder name: a hash of ``trained_settings`` and of the training items'
    content (each report text and image bytes, in sorted order; ``load_t2i_items`` columns)."""
    import hashlib

    content = sorted(hashlib.sha256(t.encode()).hexdigest() + hashlib.sha256(b).hexdigest()
                     for t, b in zip(items["text"].to_pylist(), items["image_png"].to_pylist()))
    return content_hash([json.dumps(trained_settings(cfg), sort_keys=True), *content])


def cached_t2i(cfg: T2IConfig, storage: StorageConfig | None = None, cache_dir: str | None = None) -> dict:
    """Train the generator once per data and settings, and reuse it afterwards (the demo's way).

    The run folder is ``<cache_dir>/<key>`` (``cfg.out`` is ignored): ``key`` hashes the settings
    that change what is trained (as ``settings_fingerprint``) with the training items' CONTENT (each
    report text and image bytes, in sorted order), not their ids or folder, so the same studies
    ingested into another output folder find the same generator, and other images, reports or
    settings train a new one. A complete run there is reused without starting Ray Train; an
    incomplete one (an interrupted demo) resumes. Returns ``train_t2i``'s result with ``"reused"``
    (bool) and ``"key"``; a reused result's ``seconds`` is the original training time."""
    storage = storage or StorageConfig()
    key = cache_key(cfg, load_t2i_items(cfg, storage))
    run = os.path.join(cache_dir or default_cache_dir(), key)
    store = Store(run)
    if store.exists(MANIFEST_FILE) and store.exists(f"{MODEL_DIR}/model_index.json"):
        manifest = store.read_json(MANIFEST_FILE)
        if manifest.get("complete"):
            keep = ("model_dir", "run_dir", "steps", "vae_steps", "complete", "final_loss", "metrics_file",
                    "items", "image_size", "prediction_type", "fingerprint", "seconds")
            return {**{k: manifest.get(k) for k in keep}, "reused": True, "key": key}
    return {**train_t2i(cfg.model_copy(update={"out": run}), storage), "reused": False, "key": key}


def loss_summary(losses: list[float], points: int = 10) -> dict:
    """First / last / min of a loss curve, means of its first and last 10%, and ``points``
    evenly spaced window means (the curve in brief)."""
    if not losses:
        return {}
    x = np.asarray(losses, dtype=np.float64)
    k = max(1, len(x) // 10)
    edges = np.linspace(0, len(x), min(points, len(x)) + 1).astype(int)
    return {"n": len(x), "first": float(x[0]), "last": float(x[-1]), "min": float(x.min()),
            "mean_first_10pct": float(x[:k].mean()), "mean_last_10pct": float(x[-k:].mean()),
            "curve": [round(float(x[a:b].mean()), 5) for a, b in zip(edges[:-1], edges[1:])]}


def _versions() -> dict:
    import diffusers
    import transformers

    from pairaug_ray import __version__

    return {"pairaug_ray": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def read_t2i_metrics(run_uri: str, storage: StorageConfig | None = None) -> list[dict]:
    """The per-step lines of a run's metrics.jsonl (both phases; ``phase`` says which)."""
    store = Store(run_uri, storage)
    if not store.exists(METRICS_FILE):
        return []
    text = store.read_bytes(METRICS_FILE).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


__all__ = ["DenoiseStep", "T2IConfig", "T2IError", "VAEStep", "balanced_weights", "cache_key",
           "cached_t2i", "default_cache_dir", "finding_groups", "finding_multipliers",
           "finding_positives", "inspect_init", "load_t2i_items", "loss_summary", "read_t2i_metrics",
           "settings_fingerprint", "snr_weights", "to_vae_input", "train_t2i", "trained_settings"]

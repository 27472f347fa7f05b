"""Configuration: one pydantic model per job, loaded from YAML with dotted command-line overrides.

Usage::

    cfg = load_config("jobs/configs/demo.yaml", ["ingest.decode.image_size=128", "ray.num_cpus=2"])
    cfg.ingest.source        # "phantom://48?seed=0"

Every stage's actor pool (min/max actors, batch size, CPUs, GPUs, accelerator type, custom
resources) is a field of its stage config, so one YAML maps the stages onto a cluster.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.io.store import StorageConfig
from pairaug_ray.stages.base import StageConfig
from pairaug_ray.stages.decode import DecodeConfig
from pairaug_ray.stages.edit import EditConfig
from pairaug_ray.stages.generate import GenerateConfig
from pairaug_ray.stages.label import LabelConfig
from pairaug_ray.stages.prune import PruneConfig
from pairaug_ray.stages.rewrite import RewriteConfig
from pairaug_ray.stages.score import ScoreConfig
from pairaug_ray.estimate import EstimateConfig
from pairaug_ray.train.ablate import AblateConfig
from pairaug_ray.train.evaluate import EvaluateConfig
from pairaug_ray.train.vlp import TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray address; None starts (or joins) a local cluster")
    num_cpus: int | None = Field(None, description="CPUs of a local cluster; None = all")
    progress_bars: bool = True


class WritePoolConfig(StageConfig):
    batch_size: int = 64
    num_cpus: float = 0.25


class IngestConfig(_Strict):
    source: str = "phantom://48?seed=0"
    out: str = "pairaug_out/ingest"
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    write: WritePoolConfig = Field(default_factory=WritePoolConfig)


class AugmentConfig(_Strict):
    studies: str = Field("pairaug_out/ingest", description="an ingest output folder (local or s3://)")
    out: str = "pairaug_out/augment"
    seed: int = 0
    splits: list[str] = Field(default_factory=lambda: ["train"],
                              description="splits to augment; never the test split you evaluate on")
    inter_variants: int = Field(1, ge=0, description="InterAug candidates per study")
    intra_variants: int = Field(2, ge=0, description="IntraAug candidates per study (reference: 10)")
    limit: int | None = Field(None, ge=1, description="augment at most this many studies")
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    write: WritePoolConfig = Field(default_factory=WritePoolConfig)
    report: bool = Field(True, description="write report.html with example grids and score histograms")


class PairAugConfig(_Strict):
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type[BaseModel] = PairAugConfig) -> Any:
    """Config from a YAML file (optional) with ``a.b.c=value`` overrides applied on top."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must be a YAML mapping")
    for ov in overrides or []:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
    return cls.model_validate(data)


# Settings that change where and how fast a stage runs, not what it outputs: they do not enter
# the output fingerprint, so re-running with another pool size or timeout keeps the pair ids.
RESOURCE_FIELDS = {"batch_size", "min_actors", "max_actors", "num_cpus", "num_gpus",
                   "accelerator_type", "resources", "device", "dtype", "request_timeout_s",
                   "concurrency", "max_retries", "backoff_s", "backoff_max_s", "api_key_env",
                   "max_variants_per_call", "retry_max_actors", "max_concurrent_batches",
                   "helper_num_cpus", "log_engine_metrics"}


def fingerprint(model: BaseModel, exclude: set[str] | None = None) -> str:
    """A short stable hash of what determines the outputs (resources and paths excluded by caller)."""
    blob = json.dumps(model.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def output_fingerprint(*stage_configs: BaseModel) -> str:
    """Hash of the stage settings that change outputs; pool sizes and devices do not count."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in RESOURCE_FIELDS}
        return node

    parts = [strip(cfg.model_dump(mode="json")) for cfg in stage_configs]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]

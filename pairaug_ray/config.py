"""Configuration: the job sections composed into one model, loaded from YAML with dotted overrides.

Usage::

    cfg = load_config("jobs/configs/demo.yaml", ["ingest.decode.image_size=128", "ray.num_cpus=2"])
    cfg.ingest.source        # "phantom://48?seed=0"

Each section is defined next to the job that reads it (``runtime.RayConfig``,
``io.store.StorageConfig``, ``pipeline.IngestConfig`` / ``AugmentConfig``, ``train.vlp.TrainConfig``,
...); this module only composes them. Every stage's actor pool (min/max actors, batch size, CPUs,
GPUs, accelerator type, custom resources) is a field of its stage config, so one YAML maps the
stages onto a cluster. Unknown keys are errors, at any depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.estimate import EstimateConfig
from pairaug_ray.io.store import StorageConfig
from pairaug_ray.pipeline import AugmentConfig, IngestConfig, WritePoolConfig  # noqa: F401
from pairaug_ray.runtime import RayConfig
from pairaug_ray.serve.config import ServeConfig
from pairaug_ray.stages.base import RESOURCE_FIELDS, fingerprint, output_fingerprint  # noqa: F401
from pairaug_ray.train.ablate import AblateConfig
from pairaug_ray.train.evaluate import EvaluateConfig
from pairaug_ray.train.vlp import TrainConfig


class PairAugConfig(BaseModel):
    """Every job's settings: one YAML file can hold any subset of these sections."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ablate: AblateConfig = Field(default_factory=AblateConfig)
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


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


def load_with_estimate(path: str | None, overrides: list[str] | None = None):
    """(PairAugConfig, its EstimateConfig) from a YAML file; the ``estimate:`` section is optional."""
    cfg = load_config(path, overrides)
    return cfg, cfg.estimate

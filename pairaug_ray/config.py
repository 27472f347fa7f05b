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
from pairaug_ray.train.fidelity import FidelityConfig
from pairaug_ray.train.t2i import T2IConfig
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
    t2i: T2IConfig = Field(default_factory=T2IConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)


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


# ----------------------------------------------------------------------------- `pairaug config show`

# Descriptions of fields that carry none of their own (by field name; same meaning in every section).
FIELD_NOTES = {
    "batch_size": "rows per batch handed to one call of the stage (training: the global batch)",
    "min_actors": "actors the stage's pool starts with",
    "max_actors": "actors the stage's pool may grow to",
    "num_cpus": "CPUs each actor (or task) reserves; fractions share a CPU",
    "num_gpus": "GPUs each actor reserves; fractions share a GPU",
    "endpoint_url": "S3 endpoint (e.g. a MinIO or moto server); None = AWS or AWS_ENDPOINT_URL",
    "region": "S3 region; None = the environment's",
    "anon": "S3 without credentials (public buckets)",
    "image_size": "image side in pixels the stage or model works at; None = the model's own",
    "id_key": "secret key of the HMAC that turns DICOM patient/study ids into pseudonymous ids",
    "frontal_only": "quarantine lateral views (non_frontal_view), as the reference keeps PA/AP only",
    "min_words": "reports with fewer words are quarantined (report_too_short)",
    "guidance_scale": "classifier-free guidance scale (the reference uses 4)",
    "negative_prompt": "text the sampler steers away from ('' = none)",
    "edit": "prompt-to-prompt edit kind: refine (reference) or replace",
    "blend_threshold": "local blend: attention-mask threshold of the edited region",
    "model": "model URI: a local folder or tiny://...",
    "reference_image_column": "column with the source image the IntraAug scores compare against",
    "device": '"auto" = cuda when the stage has GPUs, else cpu',
    "inter_threshold": "InterAug keeps a pair iff cos(new image, new text) > this (paper: 0.3)",
    "intra_margin": "IntraAug keeps a pair iff each score > its global mean − this (paper: 0.003)",
    "steps": "optimiser (or sampler) steps",
    "lr": "peak learning rate (AdamW, warm-up then cosine)",
    "weight_decay": "AdamW weight decay (not on biases, norms, logit scale)",
    "warmup_steps": "linear warm-up steps",
    "num_workers": "Ray Train workers",
    "cpus_per_worker": "CPUs each Ray Train worker reserves",
    "use_gpu": "one GPU per Ray Train worker",
    "checkpoint_every": "steps between checkpoints",
    "seed": "random seed: same seed, same result",
    "splits": "splits of the studies table to use",
    "split": "split to evaluate on ('all' = every row)",
    "classes": "observations to evaluate (None = all 14 CheXpert ones)",
    "templates": "zero-shot prompts: 'pos {}|neg {};...' or 'ensemble' (None = '{}|no {}')",
    "uncertain": "uncertain labels: ignore, or count as zeros / ones",
    "bootstrap": "bootstrap resamples for the confidence intervals",
    "finetune_mode": "linear probe on frozen image features, or the whole image tower",
    "finetune_steps": "optimiser steps per fine-tuning run",
    "finetune_train_split": "split the fine-tuning trains on",
    "fractions": "label fractions to fine-tune on, e.g. [0.01, 0.1, 1.0]",
    "num_replicas": "Serve replicas of the deployment",
}


def _type_name(annotation) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _show(value) -> str:
    import json

    return json.dumps(value, default=str, ensure_ascii=False)


def config_rows(cfg: BaseModel, section: str | None = None) -> list[dict]:
    """One row per key of ``cfg`` (a loaded ``PairAugConfig``), optionally under ``section``
    (``"augment"``, ``"augment.generate"``): ``key`` (dotted), ``value`` (effective), ``default``
    (the field's own default), ``type``, ``description`` (the field's, else ``FIELD_NOTES``) and
    ``title`` of the section a row opens. Raises ``ValueError`` for an unknown section."""
    node, prefix = cfg, ""
    for part in (section.split(".") if section else []):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            known = sorted(type(node).model_fields) if isinstance(node, BaseModel) else []
            raise ValueError(f"no config section {section!r}; {prefix.rstrip('.') or 'top level'} has "
                             f"{', '.join(known)}")
        node, prefix = getattr(node, part), f"{prefix}{part}."
    if not isinstance(node, BaseModel):
        raise ValueError(f"{section!r} is a key, not a section: `pairaug config show "
                         f"{section.rpartition('.')[0] or ''}` shows it")
    rows: list[dict] = []

    def walk(model: BaseModel, path: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = f"{path}{name}"
            if isinstance(value, BaseModel):
                doc = (type(value).__doc__ or "").strip().split("\n")[0]
                rows.append({"section": key, "title": field.description or doc})
                walk(value, key + ".")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append({"key": key, "value": value.model_dump(mode="json") if isinstance(value, BaseModel)
                         else value, "default": default, "type": _type_name(field.annotation),
                         "description": field.description or FIELD_NOTES.get(name, "")})

    walk(node, prefix)
    return rows


def format_config(cfg: BaseModel, section: str | None = None) -> str:
    """``config_rows`` as text: a ``# section: title`` line per section, then per key
    ``key = value  # type; default D[ (changed)]; description``."""
    lines = []
    for row in config_rows(cfg, section):
        if "section" in row:
            lines.append(f"\n# {row['section']}" + (f": {row['title']}" if row["title"] else ""))
            continue
        value, default = _show(row["value"]), _show(row["default"])
        changed = " (changed)" if value != default else ""
        lines.append(f"{row['key']} = {value}  # {row['type']}; default {default}{changed}; {row['description']}")
    return "\n".join(lines).lstrip("\n")

"""Driver-side checks that run before Ray starts: what a first run gets wrong, said in seconds
instead of after a cluster has started (20–40 s) or a job has run on zero rows.

Usage::

    from pairaug_ray.checks import check_augment, check_split_selection
    check_augment(cfg.augment, cfg.storage, cfg.ray)       # raises ConfigError listing every problem
    check_split_selection(table.column("split").to_pylist(), ["train"], "/runs/ingest")

What is checked:

- rewrite backend names (``llm.backends.check_backend``);
- model strings by kind: a ``tiny://`` URI must parse (``models.uri``); a diffusers folder needs
  ``model_index.json``; a VLP folder (scorer, training start point, evaluated model) needs
  ``config.json`` and ``model.safetensors``; an LLM folder needs ``config.json``. A hub id
  (``org/name``) is accepted for diffusion and LLM models (their loaders take one);
- input folders: the ingest ``studies`` table, the augment ``pairs`` table a training mix needs;
- splits: ``augment.splits`` / ``train.splits`` must select at least one study (the message names
  the splits that exist and how to change them).

A folder that is missing on this machine is an error for a local cluster; when the job joins an
existing cluster (``ray.address`` or ``RAY_ADDRESS``) it is only logged, since the model may live
on the worker nodes only. A folder that exists but is of the wrong kind is always an error.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal

from pairaug_ray import schema as S
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.models.uri import is_tiny, parse_tiny_uri
from pairaug_ray.runtime import RayConfig, joins_existing_cluster

log = logging.getLogger(__name__)

ModelKind = Literal["sd", "vlp", "llm"]
KIND_NAMES = {"sd": "Stable Diffusion (diffusers)", "vlp": "VLP", "llm": "LLM (transformers)"}
TINY_KINDS = {"sd": ("sd",), "vlp": ("vlp", "vlp-minilm"), "llm": ("llm",)}
# Files a folder of each kind must hold (what each loader reads first).
REQUIRED_FILES = {"sd": ("model_index.json",), "vlp": ("config.json", "model.safetensors"),
                  "llm": ("config.json",)}
HUB_OK = {"sd": True, "vlp": False, "llm": True}


class ConfigError(ValueError):
    """One or more settings cannot work; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)


def model_problem(key: str, model: str, kind: ModelKind, *, remote: bool = False) -> str | None:
    """Why ``model`` (the value of config key ``key``) cannot be loaded as ``kind``; None if it can
    (or might: a hub id, or a folder missing here while joining a cluster, which is logged)."""
    model = str(model or "").strip()
    if not model:
        return f"{key} is empty: give a {KIND_NAMES[kind]} folder or a tiny:// URI"
    if is_tiny(model):
        try:
            parse_tiny_uri(model, kinds=TINY_KINDS[kind])
        except ValueError as exc:
            return f"{key}: {exc}"
        return None
    if "://" in model:
        return (f"{key}={model!r}: a {KIND_NAMES[kind]} model is a local folder"
                + (", a hub id (org/name)" if HUB_OK[kind] else "") + " or a tiny:// URI")
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [f for f in REQUIRED_FILES[kind] if not (path / f).is_file()]
        if missing:
            have = sorted(p.name for p in path.iterdir())[:8]
            return (f"{key}={model!r} is not a {KIND_NAMES[kind]} folder: it lacks {', '.join(missing)} "
                    f"(it holds {', '.join(have) or 'nothing'})")
        return None
    if path.exists():
        return f"{key}={model!r} is a file; a {KIND_NAMES[kind]} model is a folder"
    hub_id = HUB_OK[kind] and not model.startswith((".", "/", "~")) and model.count("/") == 1
    if hub_id:
        return None
    if remote:
        log.warning("%s=%r does not exist on this machine; the job joins a cluster, so it must exist "
                    "on the nodes that run the stage", key, model)
        return None
    return f"{key}={model!r} does not exist"


def table_problem(key: str, uri: str, table: str, storage: StorageConfig | None, hint: str) -> str | None:
    """Why ``uri`` holds no ``table`` (a Parquet table folder of shards); None when it does."""
    try:
        store = Store(uri, storage)
        if store.shards(table):
            return None
        where = store.uri_of(table)
        if not store.exists(""):
            return f"{key}={uri!r} does not exist ({hint})"
    except (OSError, ValueError) as exc:
        return f"{key}={uri!r} cannot be read: {exc}"
    return f"{key}={uri!r} holds no {table} table ({where} has no .parquet shard; {hint})"


def split_counts(splits: Iterable[str | None]) -> Counter:
    """Rows per split value (None counted as "")."""
    return Counter("" if s is None else str(s) for s in splits)


def describe_splits(counts: Counter) -> str:
    """``train 40, test 8, '' (no split) 3``."""
    return ", ".join(f"{k} {v}" if k else f"'' (no split) {v}" for k, v in counts.most_common()) or "none"


def check_split_selection(splits_of_rows: Iterable[str | None], wanted: list[str], where: str,
                          key: str = "augment.splits") -> int:
    """Number of rows whose split is in ``wanted``; raises ``ConfigError`` when that is zero,
    naming the splits that exist and how to select or assign them."""
    counts = split_counts(splits_of_rows)
    selected = sum(counts[s] for s in wanted)
    if selected:
        return selected
    total = sum(counts.values())
    if not total:
        raise ConfigError([f"the studies table in {where} is empty: nothing to select with {key}"])
    named = sorted(k for k in counts if k)
    fix = [f"set {key} to splits that exist" + (f", e.g. {key}=[{','.join(named)}]" if named else "")]
    if counts.get(""):
        fix.append("or give the studies a split: a split file at the source root (MIMIC's "
                   "*split.csv[.gz] with dicom_id and split columns) or a `split` column in a manifest, "
                   "or ingest with ingest.split_by=patient_hash (train/validate/test by a hash of the "
                   "patient id), into a new --out")
    raise ConfigError([f"{key}={list(wanted)} selects none of the {total} studies in {where}; their "
                       f"splits: {describe_splits(counts)}. To fix: " + "; ".join(fix)])


def _remote(ray_cfg: RayConfig | None) -> bool:
    return ray_cfg is not None and joins_existing_cluster(ray_cfg)


def augment_problems(acfg, storage: StorageConfig | None = None, ray_cfg: RayConfig | None = None, *,
                     studies: bool = True) -> list[str]:
    """Problems of an ``augment:`` section (``pipeline.AugmentConfig``): the rewrite backend, the
    generator, editor and scorer models and, with ``studies``, the studies table."""
    from pairaug_ray.llm.backends import check_backend

    remote = _remote(ray_cfg)
    problems = []
    try:
        check_backend(acfg.rewrite.backend)
    except ValueError as exc:
        problems.append(f"augment.rewrite.backend: {exc}")
    else:
        if acfg.rewrite.backend in ("transformers", "vllm") and acfg.rewrite.model:
            problems.append(model_problem("augment.rewrite.model", acfg.rewrite.model, "llm", remote=remote))
    if acfg.inter_variants:
        problems.append(model_problem("augment.generate.model", acfg.generate.model, "sd", remote=remote))
    if acfg.intra_variants:
        problems.append(model_problem("augment.edit.model", acfg.edit.model, "sd", remote=remote))
    problems.append(model_problem("augment.score.model", acfg.score.model, "vlp", remote=remote))
    if studies:
        problems.append(table_problem("augment.studies", acfg.studies, S.STUDIES_DIR, storage,
                                      "run `pairaug ingest SOURCE --out DIR` first and pass that DIR"))
    return [p for p in problems if p]


def check_augment(acfg, storage: StorageConfig | None = None, ray_cfg: RayConfig | None = None, *,
                  studies: bool = True) -> None:
    """Raise ``ConfigError`` with every problem of ``augment_problems``."""
    problems = augment_problems(acfg, storage, ray_cfg, studies=studies)
    if problems:
        raise ConfigError(problems)


def check_train(tcfg, storage: StorageConfig | None = None, ray_cfg: RayConfig | None = None) -> None:
    """A ``train:`` section (``train.vlp.TrainConfig``): the start model, the studies table (and its
    ``train.splits``), the pairs table when the mix has augmented sources."""
    problems = [model_problem("train.model", tcfg.model, "vlp", remote=_remote(ray_cfg)),
                table_problem("train.studies", tcfg.studies, S.STUDIES_DIR, storage,
                              "run `pairaug ingest SOURCE --out DIR` first")]
    if {"inter", "intra", "text_only"} & set(tcfg.mix):
        if not tcfg.pairs:
            problems.append(f"train.mix={list(tcfg.mix)} needs train.pairs (--pairs: an augment output folder)")
        else:
            problems.append(table_problem("train.pairs", tcfg.pairs, S.PAIRS_DIR, storage,
                                          "run `pairaug augment` first and pass its --out"))
    problems = [p for p in problems if p]
    if not problems:
        splits = Store(tcfg.studies, storage).read_column(S.STUDIES_DIR, "split")
        try:
            check_split_selection(splits, list(tcfg.splits), tcfg.studies, key="train.splits")
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)


def check_models(key: str, models: Iterable[str], ray_cfg: RayConfig | None = None) -> None:
    """VLP models given as ``NAME=URI`` or ``URI`` (``pairaug evaluate --model``)."""
    problems = []
    for spec in models or []:
        uri = spec.split("=", 1)[1] if "=" in spec and not is_tiny(spec.split("=", 1)[0]) else spec
        problems.append(model_problem(key, uri, "vlp", remote=_remote(ray_cfg)))
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(problems)


def check_studies_source(key: str, studies: str, storage: StorageConfig | None = None) -> None:
    """An evaluation's studies: an ingest folder with a studies table, or a label CSV."""
    if str(studies).lower().endswith((".csv", ".csv.gz")):
        store = Store(os.path.dirname(studies) or ".", storage)
        if not store.exists(os.path.basename(studies)):
            raise ConfigError([f"{key}={studies!r} does not exist"])
        return
    problem = table_problem(key, studies, S.STUDIES_DIR, storage, "run `pairaug ingest` first")
    if problem:
        raise ConfigError([problem])

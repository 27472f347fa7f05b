"""The stage contract: a config with the actor pool's resources + a row-accounting Ray Data UDF.

Usage::

    class MyConfig(StageConfig):
        model: str = "tiny://sd"

    class MyStage(RowStage):
        def __init__(self, config: MyConfig):
            super().__init__(config)
            self.model = load(config.model)          # once per actor

        def process(self, rows):                     # one entry per input row
            return [[{**r, "out": f(r)}] for r in rows]

    ds = ds.map_batches(MyStage, **cfg.map_batches_kwargs(MyStage))

Every input row comes out exactly once: as >= 1 result rows (fan-out is allowed) or as one error
row (``status="error"`` with ``error_class``, ``error`` and ``stage``). Rows that arrive with
``status="error"`` skip the stage untouched. ``RowStage.__call__`` enforces this; a stage that
returns the wrong number of entries is a bug and raises. ``errors.StorageError`` (object storage
down after its retries) is no row's fault: it is raised, not turned into error rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.errors import StageError, StorageError  # noqa: F401 (stages raise it; re-exported)

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
ERROR_COLUMNS = ("status", "error_class", "error", "stage")
TIMING_PREFIX = "_sec_"


ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"  # Ray turns accelerator_type=X into this resource


@dataclass(frozen=True)
class PlacementRequirement:
    """What one actor of a stage's pool needs from the node it lands on (``runtime.check_placement``).

    ``resources``: Ray resources per actor (``CPU``, ``GPU``, custom ones such as ``diffusion_node``;
    zero amounts left out). ``accelerator_type``: the GPU model (Ray schedules it as the resource
    ``accelerator_type:<X>``). ``label_selector``: Ray node-label selector (values ``v``, ``!v``,
    ``in(a,b)``, ``!in(a,b)``). ``min_actors``: actors Ray Data starts before any row flows.
    """

    stage: str
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    label_selector: dict[str, str] = field(default_factory=dict)
    min_actors: int = 1

    def describe(self) -> str:
        """``{'CPU': 1.0, 'GPU': 1.0, 'diffusion_node': 1.0}, accelerator A100, labels {...}``"""
        parts = [str(dict(sorted(self.resources.items())))]
        if self.accelerator_type:
            parts.append(f"accelerator_type {self.accelerator_type}")
        if self.label_selector:
            parts.append(f"label_selector {dict(sorted(self.label_selector.items()))}")
        return ", ".join(parts)


class StageConfig(BaseModel):
    """Resources and placement of a stage's actor pool. Every stage config subclasses this.

    Placement on a heterogeneous cluster (README "Placement"): the default is a custom resource of
    the node type, e.g. ``resources: {diffusion_node: 1}`` with ``num_gpus: 1`` (fractions share a
    GPU); ``accelerator_type`` (``A100``, ``L40S``) and ``label_selector`` (``{"pairaug.io/node-type":
    "diffusion"}``, Ray's beta label scheduling) are passed to Ray as well when set.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    batch_size: int = Field(8, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = Field(None, description="GPU model the actors need (A100, L40S, ...)")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom resources per actor, e.g. {diffusion_node: 1}")
    label_selector: dict[str, str] = Field(
        default_factory=dict, description='Ray node labels the actors need, e.g. {"pairaug.io/node-type": '
        '"diffusion"}; values v | !v | in(a,b) | !in(a,b) (beta in Ray 2.60)')

    def placement_requirement(self, stage: str) -> PlacementRequirement:
        """What one actor of this pool asks of its node, named ``stage`` (e.g. ``augment.generate``)."""
        res = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus),
               **{k: float(v) for k, v in self.resources.items()}}
        return PlacementRequirement(
            stage=stage, resources={k: v for k, v in res.items() if v > 0},
            accelerator_type=self.accelerator_type or None, label_selector=dict(self.label_selector),
            min_actors=self.min_actors)

    def map_batches_kwargs(self, udf: type, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``Dataset.map_batches(udf, **kwargs)``."""
        import ray.data

        kwargs: dict[str, Any] = dict(
            fn_constructor_kwargs={"config": self},
            batch_size=self.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(
                min_size=self.min_actors, max_size=max(self.min_actors, self.max_actors)
            ),
            num_cpus=self.num_cpus,
        )
        if self.num_gpus:
            kwargs["num_gpus"] = self.num_gpus
        if self.accelerator_type:
            kwargs["accelerator_type"] = self.accelerator_type
        if self.resources:
            kwargs["resources"] = dict(self.resources)
        if self.label_selector:
            kwargs["label_selector"] = dict(self.label_selector)
        kwargs.update(extra)
        return kwargs


def resolve_device(device: str, num_gpus: float = 0.0) -> str:
    """The torch device a stage computes on: ``device`` unless it is ``"auto"``.

    ``"auto"`` = ``"cuda"`` when this process was given a GPU (the stage asks for ``num_gpus > 0``,
    or Ray assigned GPU ids to this worker: ``ray.get_gpu_ids()``) and torch sees CUDA; else
    ``"cpu"``. So a pool with ``num_gpus: 0.25`` computes on its GPU slice, and one without GPUs
    stays on CPU even on a GPU node.
    """
    if device != "auto":
        return device
    got_gpu = num_gpus > 0
    ray = sys.modules.get("ray")  # only asked when Ray is already imported (always inside a worker)
    if not got_gpu and ray is not None and ray.is_initialized():
        try:
            got_gpu = bool(ray.get_gpu_ids())
        except Exception:  # noqa: BLE001 - e.g. a client-mode driver: fall back to the config
            got_gpu = False
    if not got_gpu:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def error_row(row: dict, stage: str, exc: BaseException) -> dict:
    """The error row for ``row``: everything the row had plus the reason."""
    error_class = getattr(exc, "error_class", None) or type(exc).__name__
    return {
        **row,
        "status": STATUS_ERROR,
        "error_class": str(error_class),
        "error": str(exc) or repr(exc),
        "stage": stage,
    }


class RowStage:
    """Base Ray Data UDF: subclasses implement ``process``; ``__call__`` keeps the books."""

    name: str = "stage"

    def __init__(self, config: StageConfig):
        self.config = config
        self.rows_in = 0
        self.seconds = 0.0

    def process(self, rows: list[dict]) -> list[list[dict] | BaseException]:
        raise NotImplementedError

    def _process_checked(self, rows: list[dict]) -> list[list[dict] | BaseException]:
        try:
            results = self.process(rows)
        except StorageError:
            raise  # storage failed after its retries: no row's fault, so the job stops (a re-run resumes)
        except Exception as batch_exc:  # noqa: BLE001 - isolate the failing rows one by one
            if len(rows) == 1:
                log.debug("stage %s failed on a row:\n%s", self.name, traceback.format_exc())
                return [batch_exc]
            results = []
            for row in rows:
                results.extend(self._process_checked([row]))
            return results
        if len(results) != len(rows):
            raise RuntimeError(
                f"stage {self.name} returned {len(results)} results for {len(rows)} rows"
            )
        for res in results:
            if not isinstance(res, BaseException) and (not isinstance(res, list) or not res):
                raise RuntimeError(f"stage {self.name} returned an empty result for a row")
        return results

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        rows = batch.to_dict("records")
        if "status" not in batch.columns:
            for r in rows:
                r["status"] = STATUS_OK
        todo = [i for i, r in enumerate(rows) if r.get("status") != STATUS_ERROR]
        results = self._process_checked([rows[i] for i in todo]) if todo else []
        by_index = dict(zip(todo, results))
        out: list[dict] = []
        for i, row in enumerate(rows):
            if i not in by_index:
                out.append(row)
            elif isinstance(by_index[i], BaseException):
                out.append(error_row(row, self.name, by_index[i]))
            else:
                out.extend(by_index[i])
        elapsed = time.perf_counter() - t0
        self.rows_in += len(rows)
        self.seconds += elapsed
        frame = rows_to_frame(out)
        # Per-row share of this batch's time, summed by the driver into per-stage throughput.
        frame[f"{TIMING_PREFIX}{self.name}"] = elapsed / max(len(frame), 1)
        return frame


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows → DataFrame with the error columns always present and never null."""
    frame = pd.DataFrame.from_records(rows)
    # Rows of another branch lack a stage's binary columns (NaN there); Arrow needs None.
    for col in frame.columns:
        if frame[col].dtype == object and any(isinstance(v, (bytes, bytearray)) for v in frame[col]):
            frame[col] = [v if isinstance(v, (bytes, bytearray)) else None for v in frame[col]]
    # Empty strings rather than nulls: an all-null column in one block and strings in the next
    # would give blocks with different Arrow schemas.
    for col in ERROR_COLUMNS:
        default = STATUS_OK if col == "status" else ""
        if col not in frame.columns:
            frame[col] = default
        else:
            frame[col] = frame[col].fillna(default).astype(str)
    return frame


def is_error(batch: pd.DataFrame) -> np.ndarray:
    return (batch["status"] == STATUS_ERROR).to_numpy() if "status" in batch else np.zeros(len(batch), bool)


# Settings that change where and how fast a stage runs, not what it outputs: they do not enter
# the output fingerprint, so re-running with another pool size or timeout keeps the pair ids.
RESOURCE_FIELDS = {"batch_size", "min_actors", "max_actors", "num_cpus", "num_gpus",
                   "accelerator_type", "resources", "label_selector", "device", "dtype", "request_timeout_s",
                   "concurrency", "max_retries", "backoff_s", "backoff_max_s", "api_key_env",
                   "max_variants_per_call", "retry_max_actors", "max_concurrent_batches",
                   "helper_num_cpus", "log_engine_metrics"}


def fingerprint(model: BaseModel, exclude: set[str] | None = None) -> str:
    """A short stable hash of what determines the outputs (resources and paths excluded by caller)."""
    blob = json.dumps(model.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def output_fingerprint(*stage_configs: BaseModel) -> str:
    """Hash of the stage settings that change outputs; pool sizes and devices do not count.

    A config with a ``fingerprint_dump()`` method (e.g. ``RewriteConfig``: only the selected
    backend's options) is hashed through it.
    """
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in RESOURCE_FIELDS}
        return node

    parts = [strip(cfg.fingerprint_dump() if hasattr(cfg, "fingerprint_dump") else cfg.model_dump(mode="json"))
             for cfg in stage_configs]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]

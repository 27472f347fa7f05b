"""The four model deployments: Rewriter, Generator (InterAug), Editor (IntraAug), Scorer.

Each replica builds its pipeline stage once, in ``__init__`` (``RewriteStage``, ``GenerateStage``,
``EditStage``, ``ScoreStage``, the same classes as the batch job), and answers a list of rows per
call: ``await handle.remote(rows) -> rows`` (at most the stage config's ``batch_size`` rows, one
output row per input row, in order). Rows follow the batch pipeline's contract (``pair_id``,
``branch``, ``variant``, ``seed``, ``report``, ... in; the stage's columns out; a failed row comes
back with ``status="error"``, ``error_class``, ``error``, ``stage``).

``@serve.batch`` gathers concurrent calls up to ``batch_size`` rows in all (``batch_size_fn``
counts rows) and runs them in a worker thread, so the replica keeps answering health checks while
the model works. What a gathered batch becomes is ``DeploymentOptions.share_batches``:

* ``False`` (default): each call is its own stage call, so the rows of one request (e.g. the 10
  IntraAug variants of a report in one prompt-to-prompt run) are batched together and never with
  another request's: an answer depends only on its request, bit for bit, whatever the load.
* ``True``: the calls' rows go through the model together (more throughput for many small requests
  on a GPU). Batched float arithmetic depends on the batch's shape, so images and scores then equal
  a lone request's only up to float rounding (measured on CPU with the tiny models: other PNG bits
  and scores in the 7th digit for a batch of 1 vs 2).

Device: ``device: auto`` is resolved on the replica to ``cuda`` when Ray gave it a GPU
(``ray.get_gpu_ids()`` non-empty and CUDA visible), else ``cpu``; the stage config's ``num_gpus``
is set to match, so every stage (including the scorer, whose own default is ``cpu``) computes where
its resources are.

Health: ``check_health`` fails (and Serve replaces the replica) after ``max_failed_batches``
consecutive batches in which every row failed with a model error (an exception class such as
``OutOfMemoryError``, not a classified per-row ``StageError`` like ``rewrite_rejected``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re

from ray import serve

from pairaug_ray.serve.options import EDITOR, GENERATOR, REWRITER, SCORER

log = logging.getLogger("ray.serve")

SLOT = "_serve_slot"
# The request's own image, handed to the editor as the source of an IntraAug edit (16-bit PNG at
# the editor's size). An editor that edits it sets the row's EDIT_SOURCE to "real"; one that draws
# the source from the report sets "noise" (or nothing: read as "noise").
STUDY_IMAGE_COLUMN = "study_image_png"
EDIT_SOURCE = "edit_source"
_STAGE_ERROR_CLASS = re.compile(r"^[a-z0-9_]+$")  # StageError classes; exception names are CamelCase


def plain(value):
    """A row value as JSON-able Python: numpy scalars → int/float, NaN → None."""
    if hasattr(value, "item") and not isinstance(value, (bytes, bytearray, str)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fit_device(cfg):
    """The stage config with ``num_gpus`` following the GPUs this replica actually got, so that
    ``device: auto`` means CUDA exactly when Ray gave the replica a GPU."""
    import ray

    has_gpu = bool(ray.get_gpu_ids())
    update: dict = {}
    if has_gpu and not cfg.num_gpus:
        update["num_gpus"] = 1.0
    elif not has_gpu and cfg.num_gpus:
        update["num_gpus"] = 0.0
    if getattr(cfg, "device", None) == "auto":
        cuda = False
        if has_gpu:  # only then is torch worth importing here
            import torch

            cuda = torch.cuda.is_available()
        update["device"] = "cuda" if cuda else "cpu"
    return cfg.model_copy(update=update) if update else cfg


class _StageReplica:
    """A stage loaded once; rows in, rows out, in order, one output row per input row."""

    deployment = ""

    def __init__(self, stage_cfg, options):
        self.cfg = _fit_device(stage_cfg)
        self.options = options
        self.stage = self._build(self.cfg)
        self.batch_rows.set_max_batch_size(self.cfg.batch_size)
        self.batch_rows.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.failed_batches = 0
        self.last_failure = ""
        self.rows_done = 0
        log.info("%s replica ready: model %s on %s, batches of <= %d", self.deployment,
                 self.model_name(), self.device(), self.cfg.batch_size)

    # -- subclass hooks
    def _build(self, cfg):
        raise NotImplementedError

    def model_name(self) -> str:
        return str(getattr(self.cfg, "model", "") or "")

    def device(self) -> str:
        dev = getattr(self.cfg, "device", "cpu")
        if dev == "auto":
            return "cuda" if self.cfg.num_gpus else "cpu"
        return str(dev)

    # -- the work
    def run_rows(self, rows: list[dict]) -> list[dict]:
        """Rows through the stage (blocking); one output row per input row, in input order."""
        import pandas as pd

        frame = pd.DataFrame.from_records([{**row, SLOT: i} for i, row in enumerate(rows)])
        try:
            out = self.stage(frame)
        except Exception as exc:  # the stage's own bookkeeping failed: every row fails with it
            self._count(failed=True, why=type(exc).__name__)
            raise
        by_slot: dict[int, dict] = {}
        for rec in out.to_dict("records"):
            slot = int(rec.pop(SLOT))
            by_slot.setdefault(slot, {k: plain(v) for k, v in rec.items() if not k.startswith("_sec_")})
        results = [by_slot[i] for i in range(len(rows))]
        model_errors = [r for r in results if r.get("status") == "error"
                        and not _STAGE_ERROR_CLASS.match(str(r.get("error_class", "")))]
        self._count(failed=bool(results) and len(model_errors) == len(results),
                    why=str(model_errors[0].get("error_class")) if model_errors else "")
        self.rows_done += len(rows)
        return results

    def _count(self, failed: bool, why: str) -> None:
        if failed:
            self.failed_batches += 1
            self.last_failure = why
            log.warning("%s: a whole batch failed (%s), %d in a row", self.deployment, why,
                        self.failed_batches)
        else:
            self.failed_batches = 0

    async def __call__(self, rows: list[dict]) -> list[dict]:
        """``rows`` (at most ``batch_size``) through the stage; one output row per input row."""
        return await self.batch_rows(rows)

    def run_calls(self, calls: list[list[dict]]) -> list[list[dict]]:
        """A gathered batch of calls: one stage call each, or one for all (``share_batches``)."""
        if not self.options.share_batches:
            return [self.run_rows(rows) for rows in calls]
        out = self.run_rows([row for rows in calls for row in rows])
        answers, start = [], 0
        for rows in calls:
            answers.append(out[start:start + len(rows)])
            start += len(rows)
        return answers

    # -- introspection and health
    def info(self) -> dict:
        """Model, device, batch size and (image models) the pixel size the model works at."""
        return {"deployment": self.deployment, "model": self.model_name(), "device": self.device(),
                "batch_size": self.cfg.batch_size, "image_size": self.image_size(),
                "rows_done": self.rows_done}

    def image_size(self) -> int | None:
        return None

    def ping(self) -> str:
        return "ok"

    def check_health(self) -> None:
        """Serve's health check: raises after ``max_failed_batches`` whole-batch model failures."""
        if self.stage is None:
            raise RuntimeError(f"{self.deployment}: no model loaded")
        if self.failed_batches >= self.options.max_failed_batches:
            raise RuntimeError(f"{self.deployment}: {self.failed_batches} batches in a row failed "
                               f"({self.last_failure})")


def _rows_in(calls: list[list[dict]]) -> int:
    """@serve.batch's batch size: rows, not calls."""
    return sum(len(rows) for rows in calls)


def _pipeline_size(stage, cfg) -> int | None:
    """Pixel size a diffusion stage draws at: its config's image_size, else the model's native."""
    if getattr(cfg, "image_size", None):
        return int(cfg.image_size)
    for holder in (stage, getattr(stage, "generator", None)):
        size = getattr(holder, "image_size", None)
        if isinstance(size, int):
            return size
        pipe = getattr(holder, "pipe", None)
        if pipe is not None:
            return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return None


class RewriterReplica(_StageReplica):
    """``RewriteStage``: rows with ``report``, ``branch``, ``seed`` → ``rewritten_report``,
    ``change``, ``labels``, ``findings``, ``rewrite_backend``, ``rewrite_model``, ``prompt_id``."""

    deployment = REWRITER

    def _build(self, cfg):
        from pairaug_ray.stages.rewrite import RewriteStage

        return RewriteStage(cfg)

    def model_name(self) -> str:
        backend = getattr(self.stage, "backend", None)
        return f"{self.cfg.backend}:{getattr(backend, 'model', '') or self.cfg.model}"

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02, batch_size_fn=_rows_in)
    async def batch_rows(self, calls: list[list[dict]]) -> list[list[dict]]:
        return await asyncio.to_thread(self.run_calls, calls)


class GeneratorReplica(_StageReplica):
    """``GenerateStage`` (InterAug): ``inter`` rows with ``rewritten_report``, ``seed`` →
    ``image_png`` (16-bit grayscale PNG), ``generator_model``."""

    deployment = GENERATOR

    def _build(self, cfg):
        from pairaug_ray.stages.generate import GenerateStage

        return GenerateStage(cfg)

    def image_size(self) -> int | None:
        return _pipeline_size(self.stage, self.cfg)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_rows_in)
    async def batch_rows(self, calls: list[list[dict]]) -> list[list[dict]]:
        return await asyncio.to_thread(self.run_calls, calls)


class EditorReplica(_StageReplica):
    """``EditStage`` (IntraAug): ``intra`` rows with ``report``, ``rewritten_report``, ``seed`` (and
    the request's image as ``study_image_png`` when given) → ``image_png``, ``source_image_png``,
    ``generator_model``; all variants of a report in one batch share one prompt-to-prompt run."""

    deployment = EDITOR

    def _build(self, cfg):
        from pairaug_ray.stages.edit import EditStage

        return EditStage(cfg)

    def image_size(self) -> int | None:
        return _pipeline_size(self.stage, self.cfg)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_rows_in)
    async def batch_rows(self, calls: list[list[dict]]) -> list[list[dict]]:
        return await asyncio.to_thread(self.run_calls, calls)


class ScorerReplica(_StageReplica):
    """``ScoreStage``: rows with ``image_png``, ``rewritten_report`` (and for ``intra`` the
    ``source_image_png`` and ``report``) → ``score_align``, ``score_delta``, ``score_img``
    (cosines in [-1, 1]; the last two None for inter), ``score_model``."""

    deployment = SCORER

    def _build(self, cfg):
        from pairaug_ray.stages.score import ScoreStage

        return ScoreStage(cfg)

    def image_size(self) -> int | None:
        return getattr(self.stage, "image_size", None)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=_rows_in)
    async def batch_rows(self, calls: list[list[dict]]) -> list[list[dict]]:
        return await asyncio.to_thread(self.run_calls, calls)


Rewriter = serve.deployment(name=REWRITER)(RewriterReplica)
Generator = serve.deployment(name=GENERATOR)(GeneratorReplica)
Editor = serve.deployment(name=EDITOR)(EditorReplica)
Scorer = serve.deployment(name=SCORER)(ScorerReplica)
MODEL_DEPLOYMENT_CLASSES = {REWRITER: Rewriter, GENERATOR: Generator, EDITOR: Editor, SCORER: Scorer}

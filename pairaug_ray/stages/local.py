"""The ``local`` augmentation profile: every model stage of a batch in one actor (laptop, one node).

Usage::

    # augment.profile: local (jobs/configs/demo.yaml); the pool is augment.local
    kwargs = local_map_kwargs(acfg.local, stages=[acfg.rewrite, acfg.generate, acfg.edit, acfg.score],
                              write=WriteConfig(out=..., table="candidates", schema_name="pair"))
    summary = planned.map_batches(LocalStage, **kwargs)

The ``cluster`` profile (the default) gives each stage its own actor pool: the right shape when a
stage has its own GPUs or node type. On a small machine those pools cost more than they earn: each
is a Python process that imports torch + diffusers + transformers (~7-8 s of CPU each on a 2-core
box) and holds a CPU share while it waits for the stage before it. ``LocalStage`` runs the same
stage classes (``RewriteStage`` → ``GenerateStage`` → ``EditStage`` → ``ScoreStage`` →
``WriteStage``, so outputs, pair ids, error rows and ``_sec_<stage>`` timings are those of the
cluster profile) one after the other on each batch, in one process:

- each model is loaded once per actor: the generate and edit stages share one diffusion pipeline
  when they name the same model, device and dtype (``share_models``; prompt-to-prompt installs its
  attention processors only for its own call and uses a private scheduler);
- torch's intra-op threads are set from the actor's CPU share (``torch_threads``; default
  ``max(1, floor(num_cpus))``): on a shared 2-core box a second OpenMP thread per process made the
  tiny UNet 10-20x *slower* (spinning threads), so both cores are used by two single-thread
  actors (``max_actors: 2``), not by one actor with two threads;
- the candidates are written from the actor (``WriteStage``), so only the small summary rows go
  back to the driver;
- a rewrite through ``ray.data.llm`` (``rewrite.backend: vllm`` with the default engine) stays a
  chain of its own before this stage (``include_rewrite=False``).

Pool sizing is ``augment.local`` (``batch_size``, ``min_actors``/``max_actors``, ``num_cpus``,
``num_gpus``...); the per-stage pool fields of ``augment.generate`` etc. are ignored in this
profile, their model settings are not. Errors: whatever the sub-stages raise for a whole batch
(``StorageError``); per-row failures become error rows as in the cluster profile.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from pairaug_ray.stages.base import TIMING_PREFIX, StageConfig


class LocalConfig(StageConfig):
    """The one actor pool of the ``local`` profile (``augment.local``)."""

    batch_size: int | None = Field(None, ge=1, description="rows per batch through all model stages; "
                                   "None = the smallest batch_size of the stages it runs (rewrite, "
                                   "generate, edit, score). The job rounds it down to whole studies")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1, description="2 on a 2-core box: one single-thread actor per core")
    num_cpus: float = Field(0.75, ge=0, description="CPUs per actor; two actors + the planning "
                            "tasks (0.25) fit a 2-CPU cluster")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per actor; "
                                      "None = max(1, floor(num_cpus))")
    share_models: bool = Field(True, description="generate and edit share one diffusion pipeline "
                               "when they name the same model, device and dtype")


def local_batch_rows(local: LocalConfig, stages: list, per_study: int) -> int:
    """Rows per batch of the local pool: ``local.batch_size`` (None = the smallest ``batch_size``
    of ``stages``), rounded down to whole studies of ``per_study`` candidates (at least one study),
    so a batch holds every variant of its studies and the blocks planned per study fill it."""
    rows = local.batch_size or min((s.batch_size for s in stages), default=per_study)
    per_study = max(1, per_study)
    return max(per_study, rows // per_study * per_study)


def torch_threads_for(cfg: LocalConfig) -> int:
    """The intra-op thread count of a local actor: ``cfg.torch_threads`` or its CPU share."""
    return cfg.torch_threads or max(1, math.floor(cfg.num_cpus + 1e-9))


class LocalStageArgs(BaseModel):
    """What a ``LocalStage`` actor is built from (``fn_constructor_kwargs``)."""

    local: LocalConfig
    rewrite: Any = None        # RewriteConfig, or None when the rewrite runs before this stage
    generate: Any
    edit: Any
    score: Any
    write: Any                 # WriteConfig of the candidates table


@contextlib.contextmanager
def _shared_pipelines(modules):
    """While open, ``load_sd_pipeline`` in ``modules`` returns one pipeline per (model, device,
    dtype, seed): the generate and edit stages built inside share their model."""
    cache: dict = {}
    originals = {m: m.load_sd_pipeline for m in modules}

    def wrap(original):
        def load(model, device="cpu", dtype=None, seed=0):
            key = (model, str(device), str(dtype), seed)
            if key not in cache:
                cache[key] = original(model, device=device, dtype=dtype, seed=seed)
            return cache[key]
        return load

    for m, original in originals.items():
        m.load_sd_pipeline = wrap(original)
    try:
        yield cache
    finally:
        for m, original in originals.items():
            m.load_sd_pipeline = original


class LocalStage:
    """Ray Data UDF: rewrite → generate → edit → score → write of a batch in one actor.

    In: planned candidate rows (``stages/plan.py``; already rewritten when ``rewrite`` is None).
    Out: the write stage's summary rows (``row_id``, ``status``, ``error_class``, ``stage``, the
    ``summary_columns`` and a ``_sec_<stage>`` column per sub-stage, ``_sec_write`` included).
    """

    name = "local"

    def __init__(self, config: LocalStageArgs):
        import torch

        from pairaug_ray.stages import edit as edit_mod
        from pairaug_ray.stages import generate as generate_mod
        from pairaug_ray.stages.edit import EditStage
        from pairaug_ray.stages.generate import GenerateStage
        from pairaug_ray.stages.rewrite import RewriteStage
        from pairaug_ray.stages.score import ScoreStage
        from pairaug_ray.stages.write import WriteStage

        self.cfg = config
        self.threads = torch_threads_for(config.local)
        torch.set_num_threads(self.threads)
        gpus = {"num_gpus": config.local.num_gpus}  # the sub-stages pick their device from it
        share = _shared_pipelines([generate_mod, edit_mod]) if config.local.share_models \
            else contextlib.nullcontext({})
        self.stages = []
        with share as cache:
            if config.rewrite is not None:
                self.stages.append(RewriteStage(config.rewrite.model_copy(update=gpus)))
            self.stages.append(GenerateStage(config.generate.model_copy(update=gpus)))
            self.stages.append(EditStage(config.edit.model_copy(update=gpus)))
        self.pipelines_loaded = len(cache) if config.local.share_models else None
        self.stages.append(ScoreStage(config.score.model_copy(update=gpus)))
        self.writer = WriteStage(config.write)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frame = batch
        for stage in self.stages:
            frame = stage(frame)
        t0 = time.perf_counter()
        summary = self.writer(frame)
        summary[f"{TIMING_PREFIX}write"] = (time.perf_counter() - t0) / max(len(summary), 1)
        return summary


def local_map_kwargs(local: LocalConfig, *, rewrite, generate, edit, score, write) -> dict[str, Any]:
    """``Dataset.map_batches(LocalStage, **kwargs)`` for the ``local`` profile's pool.

    ``rewrite`` None = the rows arrive rewritten (a ``ray.data.llm`` chain ran before)."""
    args = LocalStageArgs(local=local, rewrite=rewrite, generate=generate, edit=edit, score=score,
                          write=write)
    kwargs = local.map_batches_kwargs(LocalStage)
    kwargs["fn_constructor_kwargs"] = {"config": args}
    return kwargs

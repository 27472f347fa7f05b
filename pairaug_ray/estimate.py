"""`pairaug estimate`: expected GPU-hours and wall time per augmentation stage for a study count.

Usage::

    pairaug estimate --config jobs/configs/mimic.yaml --studies 220000
    pairaug estimate --config jobs/configs/demo.yaml --studies 10000 --measure-sample 8
    pairaug estimate --config jobs/configs/mimic.yaml --json

Per-stage throughput comes from the config or from a measurement:

- config: an ``estimate:`` section (``EstimateConfig``)::

      estimate:
        studies: 220000            # default study count (--studies overrides)
        rows_per_s:                # rows/s of ONE actor of the stage with its configured
          rewrite: 40              # resources (num_gpus, num_cpus): for an LLM replica that spans
          generate: 0.6            # 2 GPUs, the rate of the 2-GPU replica
          edit: 0.09
          score: 300

- ``--measure-sample K``: runs ``run_ingest`` on ``phantom://K`` and ``run_augment`` with the
  config's augment settings on a local Ray cluster here, and takes each stage's rate from the run
  manifest's ``stage_throughput`` (busy seconds summed over the stage's batches). Custom resources
  and accelerator types are dropped for the local run (and GPUs when this machine has none), so
  the figures are for this machine's hardware; run it on a node of the target type for GPU figures.

Rows per study: rewrite / score / write = inter + intra variants, generate = inter variants,
edit = intra variants. Per stage: busy actor-hours = rows / rows_per_s / 3600; GPU-hours = that
times the stage's ``num_gpus``; wall at the configured ``max_actors``. The stages stream into each
other, so the job's wall time is the slowest stage's, and every pool holds its GPUs for all of it:
``reserved_gpu_hours`` = wall * max_actors * num_gpus. ``balanced_actors`` is the pool size each
stage needs to keep up with the bottleneck stage at its ``max_actors``; set the pools to it so no
GPU waits.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STAGES = ("rewrite", "generate", "edit", "score", "write")


class EstimateConfig(BaseModel):
    """The ``estimate:`` section of a job config: per-stage throughputs for `pairaug estimate`."""

    model_config = ConfigDict(extra="forbid")

    studies: int | None = Field(None, ge=1, description="default study count")
    rows_per_s: dict[str, float] = Field(
        default_factory=dict,
        description="rows/s of one actor of each stage (rewrite, generate, edit, score, write) with "
                    "the stage's configured resources")


def rows_per_study(acfg) -> dict[str, int]:
    both = acfg.inter_variants + acfg.intra_variants
    return {"rewrite": both, "generate": acfg.inter_variants, "edit": acfg.intra_variants,
            "score": both, "write": both}


def estimate(acfg, rates: dict[str, float], studies: int) -> dict[str, Any]:
    """Per-stage GPU-hours and wall time for ``studies`` studies at ``rates`` rows/s per actor."""
    per_study = rows_per_study(acfg)
    stages: dict[str, dict] = {}
    for name in STAGES:
        scfg = getattr(acfg, name)
        rows = studies * per_study[name]
        rate = rates.get(name)
        fig: dict[str, Any] = {"rows": rows, "rows_per_s_per_actor": rate, "num_gpus": scfg.num_gpus,
                               "max_actors": scfg.max_actors}
        if rows and rate:
            actor_h = rows / rate / 3600
            fig.update(actor_hours=actor_h, gpu_hours=actor_h * scfg.num_gpus,
                       wall_hours=actor_h / scfg.max_actors,
                       studies_per_s=rate * scfg.max_actors / per_study[name])
        stages[name] = fig
    timed = {n: f for n, f in stages.items() if "wall_hours" in f}
    missing = [n for n in STAGES if stages[n]["rows"] and n not in timed]
    out: dict[str, Any] = {"studies": studies, "per_study": per_study, "stages": stages,
                           "missing_rates": missing}
    if timed:
        bottleneck = max(timed, key=lambda n: timed[n]["wall_hours"])
        wall = timed[bottleneck]["wall_hours"]
        target = timed[bottleneck]["studies_per_s"]  # studies/s the whole pipeline sustains
        for name, fig in timed.items():
            fig["reserved_gpu_hours"] = wall * fig["max_actors"] * fig["num_gpus"]
            fig["balanced_actors"] = max(1, math.ceil(
                target * per_study[name] / fig["rows_per_s_per_actor"] - 1e-9))
        out.update(bottleneck=bottleneck, wall_hours=wall,
                   gpu_hours=sum(f["gpu_hours"] for f in timed.values()),
                   reserved_gpu_hours=sum(f["reserved_gpu_hours"] for f in timed.values()))
    return out


def measure_rates(cfg, sample: int, overrides_local: bool = True, workdir: str | None = None) -> dict:
    """Rows/s per actor of each stage from a ``run_augment`` on ``sample`` PhantomCXR studies."""
    import torch

    from pairaug_ray.pipeline import run_augment, run_ingest

    cfg = cfg.model_copy(deep=True)
    with tempfile.TemporaryDirectory(prefix="pairaug-estimate-") as tmp:
        work = workdir or tmp
        cfg.ingest.source = f"phantom://{sample}?seed=0"
        cfg.ingest.out = cfg.augment.studies = os.path.join(work, "ingest")
        cfg.augment.out = os.path.join(work, "augment")
        cfg.augment.splits = ["train", "validate", "test"]
        cfg.augment.report = False
        cfg.augment.limit = None
        if overrides_local:
            cfg.ray.address = None
            cfg.ray.num_cpus = cfg.ray.num_cpus or os.cpu_count()
            cfg.ray.progress_bars = False
            gpus = torch.cuda.is_available()
            pools = [cfg.ingest.decode, cfg.ingest.label, cfg.ingest.write,
                     *(getattr(cfg.augment, s) for s in STAGES)]
            for scfg in pools:
                scfg.resources = {}
                scfg.accelerator_type = None
                scfg.min_actors = 1
                scfg.max_actors = 1
                scfg.num_cpus = min(scfg.num_cpus, 0.25)
                if not gpus:
                    scfg.num_gpus = 0.0
        studies = run_ingest(cfg)["totals"]["studies"]
        manifest = run_augment(cfg)
    per_study = rows_per_study(cfg.augment)
    # A stage's busy seconds over the rows of its own branch: pass-through rows cost ~nothing.
    rates = {}
    for name, fig in manifest["stage_throughput"].items():
        if name in per_study and fig["busy_seconds"]:
            rates[name] = round(studies * per_study[name] / fig["busy_seconds"], 4)
    return {"rows_per_s": rates, "sample_studies": sample, "stage_throughput": manifest["stage_throughput"]}


def how_to_measure(result: dict) -> str:
    """What to run (or put in the config) to get the rates ``result["missing_rates"]`` lacks."""
    cfg = result.get("config_path") or "FILE"
    missing = result["missing_rates"]
    example = {"rewrite": 40, "generate": 0.6, "edit": 0.09, "score": 300, "write": 500}
    return "\n".join([
        f"No throughput for {', '.join(missing)}: an estimate needs each stage's rows/s per actor, "
        "measured on the hardware the job will run on. On a node of the target type (the GPU node "
        "type of the diffusion stages), measure them with",
        f"    pairaug estimate --config {cfg} --studies {result['studies']} --measure-sample 8",
        "(ingest + augment of 8 PhantomCXR studies there with this config's stage settings; each "
        "stage's rate comes from the run's busy seconds), or write measured rates into the config:",
        "    estimate:",
        "      rows_per_s: {" + ", ".join(f"{k}: {example[k]}" for k in missing) + "}   # rows/s of ONE actor",
    ])


def format_table(result: dict) -> str:
    """The estimate as text: a table of the stages with a rate, the bottleneck, and for stages
    without a rate how to measure them (never a row of dashes)."""
    lines = [f"studies: {result['studies']}  (rows per study: "
             + ", ".join(f"{k} {v}" for k, v in result["per_study"].items()) + ")"]
    timed = {n: f for n, f in result["stages"].items() if "wall_hours" in f}
    if timed:
        lines.append(f"{'stage':<9} {'rows':>10} {'rows/s/actor':>13} {'GPUs/actor':>10} {'actors':>6} "
                     f"{'GPU-h':>9} {'actor-h':>9} {'wall h':>8} {'balanced actors':>15}")
        for name, f in timed.items():
            lines.append(f"{name:<9} {f['rows']:>10} {f['rows_per_s_per_actor']:>13.4g} {f['num_gpus']:>10g} "
                         f"{f['max_actors']:>6} {f['gpu_hours']:>9.2f} {f['actor_hours']:>9.2f} "
                         f"{f['wall_hours']:>8.2f} {f.get('balanced_actors', ''):>15}")
    if "bottleneck" in result:
        lines.append(f"bottleneck: {result['bottleneck']}; wall {result['wall_hours']:.2f} h; "
                     f"busy GPU-hours {result['gpu_hours']:.1f}; GPU-hours reserved by the pools "
                     f"for the wall time {result['reserved_gpu_hours']:.1f}")
    if result["missing_rates"]:
        if timed:
            lines.append("The wall time above covers only the stages with a rate.")
        lines.append(how_to_measure(result))
    return "\n".join(lines)

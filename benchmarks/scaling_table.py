"""Pairs/s of the augmentation pipeline against the actor pool size of each stage, with the
bottleneck stage at each point.

Usage::

    python benchmarks/scaling_table.py                                  # 16 studies, the grid below
    python benchmarks/scaling_table.py --studies 32 --grid generate=1,2 --grid edit=1,2,3

Each point runs ``pipeline.run_augment`` (``augment.profile=cluster``: a pool per stage) on the
same studies with the named stages' pools fixed to
the given sizes (``min_actors = max_actors``; the other stages keep the config's). Every pool's
``num_cpus`` is scaled so the pools always fit the cluster (``--num-cpus``): on a small machine
more actors share the same cores, which is exactly what the table shows. The bottleneck is the
stage with the most busy seconds per actor (``stage_throughput`` of the run's manifest: the summed
wall time of its batches / its pool size): the stage the others wait for.
Prints one JSON line per point, then the table as Markdown.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    bench_config, emit, init_ray, machine, make_studies, run_pipeline,
)

STAGES = ("rewrite", "generate", "edit", "score", "write")
DEFAULT_GRID = ["generate=1,2", "edit=1,2,3"]


def parse_grid(specs: list[str]) -> dict[str, list[int]]:
    grid: dict[str, list[int]] = {}
    for spec in specs:
        stage, _, sizes = spec.partition("=")
        if stage not in STAGES or not sizes:
            raise SystemExit(f"--grid wants STAGE=N,M,... with STAGE in {STAGES}, got {spec!r}")
        grid[stage] = [int(x) for x in sizes.split(",")]
    return grid


def point_overrides(cfg, sizes: dict[str, int], num_cpus: float) -> list[str]:
    """Pool sizes for this point + CPU shares that keep every pool placeable on ``num_cpus``."""
    acfg = cfg.augment
    actors = {s: sizes.get(s, getattr(acfg, s).max_actors) for s in STAGES}
    # plan_candidates' tasks hold 0.25 CPU; leave room for them and for the read of pass 2.
    budget = num_cpus - 0.5
    want = {s: getattr(acfg, s).num_cpus * actors[s] for s in STAGES}
    scale = min(1.0, budget / sum(want.values()))
    out = []
    for s in STAGES:
        share = max(0.05, round(getattr(acfg, s).num_cpus * scale, 3))
        out += [f"augment.{s}.min_actors={actors[s]}", f"augment.{s}.max_actors={actors[s]}",
                f"augment.{s}.num_cpus={share}"]
    return out


def bottleneck(stage_throughput: dict, actors: dict[str, int]) -> tuple[str, dict]:
    per_actor = {}
    for stage, fig in stage_throughput.items():
        if stage in actors:
            per_actor[stage] = round(fig["busy_seconds"] / max(actors[stage], 1), 2)
    return max(per_actor, key=per_actor.get), per_actor


def markdown(rows: list[dict], grid: dict[str, list[int]]) -> str:
    stages = list(grid)
    head = "| " + " | ".join(f"{s} actors" for s in stages) + \
        " | pairs/s | wall s | bottleneck | busy s per actor (" + ", ".join(STAGES[:4]) + ") |"
    lines = [head, "|" + "---|" * (len(stages) + 4)]
    for r in rows:
        busy = ", ".join(str(r["busy_s_per_actor"].get(s, "-")) for s in STAGES[:4])
        lines.append("| " + " | ".join(str(r["actors"][s]) for s in stages) +
                     f" | {r['pairs_per_s']:.3f} | {r['seconds']} | {r['bottleneck']} | {busy} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=16)
    p.add_argument("--grid", action="append", help="STAGE=N,M,... (repeatable); default: "
                   + " ".join(DEFAULT_GRID))
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    grid = parse_grid(args.grid or DEFAULT_GRID)

    rows = []
    with tempfile.TemporaryDirectory(prefix="pairaug-scale-") as tmp:
        work = args.workdir or tmp
        # per-stage pools are the cluster profile's (the demo config runs the local profile)
        args.overrides = ["augment.profile=cluster", *args.overrides]
        cfg = bench_config(work, args.studies, args.overrides)
        init_ray(args.num_cpus)
        make_studies(cfg)
        for k, combo in enumerate(itertools.product(*grid.values())):
            sizes = dict(zip(grid, combo))
            pcfg = bench_config(work, args.studies, args.overrides + point_overrides(cfg, sizes, args.num_cpus))
            run = run_pipeline(pcfg, os.path.join(work, f"point-{k}"))
            actors = {s: getattr(pcfg.augment, s).max_actors for s in STAGES}
            stage, per_actor = bottleneck(run["stage_throughput"], actors)
            row = {"benchmark": "scaling_table", "studies": args.studies, "actors": actors,
                   "num_cpus": {s: getattr(pcfg.augment, s).num_cpus for s in STAGES},
                   "pairs_per_s": round(run["pairs_per_s"], 4), "seconds": run["seconds"],
                   "candidates": run["candidates"], "bottleneck": stage, "busy_s_per_actor": per_actor,
                   "loadavg_1_5_15": machine()["loadavg_1_5_15"]}
            emit(row)
            rows.append(row)
    print(markdown(rows, grid), flush=True)
    return rows


if __name__ == "__main__":
    main()

"""Peak memory of the augmentation pipeline for N and 10*N studies with the same config.

Usage::

    python benchmarks/memory_scaling.py                      # N = 8: 8 and 80 studies
    python benchmarks/memory_scaling.py --studies 16 --factor 10 augment.edit.steps=4

For each size: write the studies table (``run_ingest`` on ``phantom://N``, not measured), then run
``pipeline.run_augment`` while a sampler thread records, every ``--every`` seconds, the RSS of the
driver, of every Ray worker process and of the Ray daemons (GCS, raylet: all descendants of this
process, since the benchmark starts the local cluster), and the object store's used bytes. A
streaming pipeline holds a bounded number of blocks in flight whatever the input size, so its peak
should not grow with N; the JSON line gives the growth ratio of each peak (goal: <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    MemorySampler, bench_config, emit, init_ray, machine, make_studies, run_pipeline,
)

MIB = 2**20


def measure(work: str, n: int, overrides: list[str], every_s: float) -> dict:
    cfg = bench_config(work, n, overrides)
    studies = make_studies(cfg)
    with MemorySampler(every_s) as sampler:
        run = run_pipeline(cfg, os.path.join(work, f"augment-{n}"))
    peak = sampler.peak()
    return {"studies": studies, "candidates": run["candidates"], "seconds": run["seconds"],
            "pairs_per_s": round(run["pairs_per_s"], 4),
            "memory_samples": peak.pop("samples"),
            **{f"peak_{k}_mib": (round(v / MIB, 1) if v is not None else None) for k, v in peak.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=8, help="the small size N")
    p.add_argument("--factor", type=int, default=10, help="the large size is factor * N")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--every", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pairaug-mem-") as tmp:
        work = args.workdir or tmp
        init_ray(args.num_cpus)
        before = machine()
        # Each run starts (and ends) its own actor pools; the cluster and the driver's imports stay.
        small = measure(work, args.studies, args.overrides, args.every)
        large = measure(work, args.studies * args.factor, args.overrides, args.every)

    def growth(key: str):
        a, b = small.get(key), large.get(key)
        return round(b / a, 3) if a and b is not None else None

    result = {
        "benchmark": "memory_scaling",
        "small": small,
        "large": large,
        "growth": {k: growth(f"peak_{k}_mib") for k in
                   ("total_rss", "driver_rss", "workers_rss", "ray_daemons_rss", "object_store_used")},
        "overrides": args.overrides,
        "machine_before": before,
        "machine_after": machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()

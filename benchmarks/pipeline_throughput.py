"""Pairs/s of the Ray Data augmentation pipeline against the reference's one-at-a-time approach.

Usage::

    python benchmarks/pipeline_throughput.py                     # 32 PhantomCXR studies, 2 repeats
    python benchmarks/pipeline_throughput.py --studies 64 --repeats 3 augment.edit.steps=20

Both sides work on the same N studies (one ``run_ingest`` of ``phantom://N``), with the same tiny
models and generation settings (jobs/configs/demo.yaml + the overrides given), and produce the same
candidates (same ids, seeds, rewrites) which they score and prune with the same rules:

(a) reference: one process, study by study; one model call per image (``common.run_reference``);
(b) this project: ``pipeline.run_augment`` on a local Ray cluster (started once, not timed).

They run alternating (a, b, a, b, ...) ``--repeats`` times so machine noise hits both; each run
writes into a fresh folder. Prints one JSON line: pairs/s of each (median over repeats), the
ratio, each run's figures, the pipeline's per-stage busy seconds, and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    bench_config, emit, init_ray, machine, make_studies, run_pipeline, run_reference,
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=32, help="PhantomCXR studies (N)")
    p.add_argument("--repeats", type=int, default=2, help="alternating (a, b) rounds")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--skip-reference", action="store_true", help="time only the pipeline")
    p.add_argument("--reference-threads", type=int, default=1,
                   help="torch threads of the reference loop (0 = torch default, one per core); "
                        "1 = as each Ray actor runs, and faster on a busy machine")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (both sides)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pairaug-bench-") as tmp:
        work = args.workdir or tmp
        cfg = bench_config(work, args.studies, args.overrides)
        init_ray(args.num_cpus)
        n = make_studies(cfg)
        before = machine()
        ref_runs, ray_runs = [], []
        for i in range(args.repeats):
            if not args.skip_reference:
                ref_runs.append(run_reference(cfg, os.path.join(work, f"ref-{i}"),
                                             args.reference_threads or None))
                print(f"[bench] reference round {i}: {ref_runs[-1]['pairs_per_s']:.3f} pairs/s",
                      file=sys.stderr, flush=True)
            ray_runs.append(run_pipeline(cfg, os.path.join(work, f"ray-{i}")))
            print(f"[bench] pipeline  round {i}: {ray_runs[-1]['pairs_per_s']:.3f} pairs/s",
                  file=sys.stderr, flush=True)

    ref = statistics.median(r["pairs_per_s"] for r in ref_runs) if ref_runs else None
    ray_ = statistics.median(r["pairs_per_s"] for r in ray_runs)
    acfg = cfg.augment
    result = {
        "benchmark": "pipeline_throughput",
        "studies": n,
        "candidates_per_run": ray_runs[0]["candidates"],
        "settings": {
            "inter_variants": acfg.inter_variants, "intra_variants": acfg.intra_variants,
            "generate": {"model": acfg.generate.model, "steps": acfg.generate.steps,
                         "batch_size": acfg.generate.batch_size, "max_actors": acfg.generate.max_actors},
            "edit": {"model": acfg.edit.model, "steps": acfg.edit.steps,
                     "batch_size": acfg.edit.batch_size, "max_actors": acfg.edit.max_actors},
            "score": {"model": acfg.score.model, "batch_size": acfg.score.batch_size},
            "overrides": args.overrides,
        },
        "reference_pairs_per_s": round(ref, 4) if ref else None,
        "pipeline_pairs_per_s": round(ray_, 4),
        "ratio": round(ray_ / ref, 2) if ref else None,
        "reference_runs": ref_runs,
        "pipeline_runs": ray_runs,
        "machine_before": before,
        "machine_after": machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()

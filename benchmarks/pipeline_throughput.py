"""Pairs/s of the Ray Data augmentation pipeline against the reference's one-at-a-time approach.

Usage::

    python benchmarks/pipeline_throughput.py                     # 32 PhantomCXR studies, 2 repeats
    python benchmarks/pipeline_throughput.py --studies 64 --repeats 3 augment.edit.steps=20
    python benchmarks/pipeline_throughput.py --profiles local,cluster --before-tree /tmp/head

All sides work on the same N studies (one ``run_ingest`` of ``phantom://N``), with the same tiny
models and generation settings (jobs/configs/demo.yaml + the overrides given), and produce the same
candidates (same ids, seeds, rewrites) which they score and prune with the same rules:

(a) reference: one process, study by study; one model call per image (``common.run_reference``);
(b) this project: ``pipeline.run_augment`` on a local Ray cluster (started once, not timed), once
    per ``--profiles`` entry (``augment.profile``: ``local`` = one pool running every model stage,
    the demo's; ``cluster`` = a pool per stage);
(c) optionally ``--before-tree``: ``run_augment`` of another source tree (e.g. ``git archive HEAD``
    unpacked: the code before a change) in a subprocess with its own Ray cluster, same studies.

They run alternating (a, b..., c, a, b..., c, ...) ``--repeats`` times so machine noise hits all;
each run writes into a fresh folder. Each pipeline run is followed by a re-run of the finished job
(``rerun_seconds``: it must exit in seconds without starting a pool). Prints one JSON line: pairs/s
of each side (median over repeats), ratios to the reference, the fixed cost (manifest
``seconds.fixed`` = start of ``run_augment`` to the first candidate written + the pruning pass),
whether candidate and kept pair ids equal the reference's (digests), each run's figures, and the
machine's load before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    bench_config, emit, init_ray, machine, make_studies, run_pipeline, run_pipeline_in_tree, run_reference,
)


def _median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 4) if vals else None


def _fixed(runs: list[dict]):
    vals = [r["manifest_seconds"].get("fixed") for r in runs if r.get("manifest_seconds")]
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 2) if vals else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=32, help="PhantomCXR studies (N)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--skip-reference", action="store_true", help="time only the pipeline")
    p.add_argument("--profiles", default="local,cluster",
                   help="augment.profile values to run, comma-separated (default local,cluster)")
    p.add_argument("--before-tree", help="another source tree to time as well (the code before a change)")
    p.add_argument("--before-overrides", nargs="*", default=[],
                   help="config overrides for --before-tree only (keys that tree knows)")
    p.add_argument("--no-rerun", action="store_true", help="skip the re-run of each finished job")
    p.add_argument("--reference-threads", type=int, default=1,
                   help="torch threads of the reference loop (0 = torch default, one per core); "
                        "1 = as each Ray actor runs, and faster on a busy machine")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (both sides)")
    args = p.parse_args(argv)
    profiles = [x for x in args.profiles.split(",") if x]

    with tempfile.TemporaryDirectory(prefix="pairaug-bench-") as tmp:
        work = args.workdir or tmp
        cfg = bench_config(work, args.studies, args.overrides)
        init_ray(args.num_cpus)
        n = make_studies(cfg)
        before = machine()
        ref_runs: list[dict] = []
        runs: dict[str, list[dict]] = {prof: [] for prof in profiles}
        tree_runs: list[dict] = []
        loads: list[float] = [before["loadavg_1_5_15"][0]]
        for i in range(args.repeats):
            if not args.skip_reference:
                ref_runs.append(run_reference(cfg, os.path.join(work, f"ref-{i}"),
                                              args.reference_threads or None))
                loads.append(machine()["loadavg_1_5_15"][0])
                print(f"[bench] reference       round {i}: {ref_runs[-1]['pairs_per_s']:.3f} pairs/s",
                      file=sys.stderr, flush=True)
            for prof in profiles:
                pcfg = bench_config(work, args.studies, [*args.overrides, f"augment.profile={prof}"])
                runs[prof].append(run_pipeline(pcfg, os.path.join(work, f"ray-{prof}-{i}"),
                                               rerun=not args.no_rerun))
                loads.append(machine()["loadavg_1_5_15"][0])
                r = runs[prof][-1]
                print(f"[bench] pipeline {prof:7s}round {i}: {r['pairs_per_s']:.3f} pairs/s, fixed "
                      f"{r['manifest_seconds'].get('fixed')} s, re-run {r.get('rerun_seconds')} s",
                      file=sys.stderr, flush=True)
            if args.before_tree:
                tree_runs.append(run_pipeline_in_tree(args.before_tree, cfg.augment.studies,
                                                      os.path.join(work, f"tree-{i}"),
                                                      args.before_overrides, args.num_cpus))
                loads.append(machine()["loadavg_1_5_15"][0])
                print(f"[bench] before-tree     round {i}: {tree_runs[-1]['pairs_per_s']:.3f} pairs/s",
                      file=sys.stderr, flush=True)

    ref = _median(ref_runs, "pairs_per_s")
    acfg = cfg.augment
    sides = {}
    for prof, rs in runs.items():
        med = _median(rs, "pairs_per_s")
        sides[prof] = {
            "pairs_per_s": med, "ratio_to_reference": round(med / ref, 2) if ref and med else None,
            "fixed_seconds": _fixed(rs), "to_first_candidate_s": _median(
                [r["manifest_seconds"] for r in rs], "to_first_candidate"),
            "prune_s": _median([r["manifest_seconds"] for r in rs], "prune"),
            "rerun_seconds": _median(rs, "rerun_seconds"),
            "same_candidate_ids_as_reference": (all(r["candidate_ids"] == ref_runs[0]["candidate_ids"] for r in rs)
                                                if ref_runs else None),
            "same_kept_ids_as_reference": (all(r["kept_ids"] == ref_runs[0]["kept_ids"] for r in rs)
                                           if ref_runs else None),
        }
    if tree_runs:
        med = _median(tree_runs, "pairs_per_s")
        sides["before_tree"] = {"tree": args.before_tree, "pairs_per_s": med,
                                "ratio_to_reference": round(med / ref, 2) if ref and med else None,
                                "fixed_seconds": None, "seconds_median": _median(tree_runs, "seconds")}
    first = profiles[0] if profiles else None
    result = {
        "benchmark": "pipeline_throughput",
        "studies": n,
        "candidates_per_run": runs[first][0]["candidates"] if first else None,
        "settings": {
            "inter_variants": acfg.inter_variants, "intra_variants": acfg.intra_variants,
            "generate": {"model": acfg.generate.model, "steps": acfg.generate.steps,
                         "batch_size": acfg.generate.batch_size, "max_actors": acfg.generate.max_actors},
            "edit": {"model": acfg.edit.model, "steps": acfg.edit.steps,
                     "batch_size": acfg.edit.batch_size, "max_actors": acfg.edit.max_actors},
            "score": {"model": acfg.score.model, "batch_size": acfg.score.batch_size},
            "local": acfg.local.model_dump(),
            "overrides": args.overrides,
        },
        "reference_pairs_per_s": ref,
        # the first profile's figures under the names earlier versions printed
        "pipeline_pairs_per_s": sides[first]["pairs_per_s"] if first else None,
        "ratio": sides[first]["ratio_to_reference"] if first else None,
        "sides": sides,
        "reference_runs": ref_runs,
        "pipeline_runs": runs.get(first, []),
        "runs_by_profile": runs,
        "before_tree_runs": tree_runs,
        "load_1min_between_runs": loads,
        "machine_before": before,
        "machine_after": machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()

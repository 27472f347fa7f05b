"""Driver memory of the pruning pass at MIMIC scale: the streaming prune against the old driver-side one.

Usage::

    python benchmarks/prune_memory.py                         # 240 k and 2.4 M synthetic candidates
    python benchmarks/prune_memory.py --sizes 24000,240000 --rows-per-shard 2000

For each size N, a synthetic candidate table (the job's ``candidates/`` layout: Parquet shards of
``--rows-per-shard`` rows with the pair schema's id, branch and score columns and a small image
payload; 1/3 InterAug, 2/3 IntraAug as at 1 + 2 variants; MIMIC: 220 k studies x 11 = 2.4 M) is
written once, then pruned in a fresh process per method, whose peak RSS is the
figure (``VmHWM``):

- ``old``: what ``run_augment`` did before the streaming prune, driver side only (its Ray part,
  which also shipped the dict and the set to every selection task, is left out): read pair_id +
  branch + the three scores of every candidate, ``intra_means``, ``apply_prune`` on the whole
  frame, the kept-id set and the ``pair_id -> prune_reason`` dict;
- ``streaming``: ``stages.prune.streaming_prune`` with Ray tasks (own local Ray cluster of
  ``--num-cpus``): per-shard partial sums, then keep/prune + write of the kept rows in the tasks.

Both report the peak RSS and its growth over the process's RSS just before pruning (imports and,
for streaming, ``ray.init`` done), the seconds, and a digest of the kept ids (equal = same kept
set). Prints one JSON line per (size, method), then one summary line and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit, machine  # noqa: E402

MIB = 2**20


def write_candidates(root: str, n: int, rows_per_shard: int, seed: int = 0) -> int:
    """A synthetic candidates/ table of ``n`` rows under ``root``; returns the shard count."""
    import numpy as np
    import pyarrow as pa

    from pairaug_ray import schema as S
    from pairaug_ray.io.store import Store, content_hash

    store = Store(root)
    rng = np.random.default_rng(seed)
    shards = 0
    for start in range(0, n, rows_per_shard):
        k = min(rows_per_shard, n - start)
        ids = [f"{start + i:024x}" for i in range(k)]
        branch = np.where(np.arange(start, start + k) % 3 == 0, "inter", "intra")
        inter = branch == "inter"
        cols = {
            "row_id": ids, "pair_id": ids, "branch": branch.tolist(),
            "score_align": rng.normal(0.3, 0.1, k),
            "score_delta": np.where(inter, np.nan, rng.normal(0.1, 0.05, k)),
            "score_img": np.where(inter, np.nan, rng.normal(0.8, 0.02, k)),
            "image_png": [b"\x89PNG" + bytes(60)] * k,
        }
        table = pa.table({f.name: (pa.array(cols[f.name], f.type, from_pandas=True) if f.name in cols
                                   else pa.nulls(k, f.type)) for f in S.PAIR_SCHEMA}, schema=S.PAIR_SCHEMA)
        store.write_table(S.CANDIDATES_DIR, table, content_hash(ids))
        shards += 1
    return shards


_CHILD = r"""
import json, os, sys, time
method, root, num_cpus, repo = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo)
import pandas as pd, pyarrow as pa
from pairaug_ray import schema as S
from pairaug_ray.io.store import Store
from pairaug_ray.stages.prune import PruneConfig, StreamPruneConfig, apply_prune, intra_means, streaming_prune
from benchmarks.common import ids_digest

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

rss = lambda: status("VmRSS")

store, cfg = Store(root), PruneConfig(inter_threshold=0.3, intra_margin=0.003)
if method == "streaming":
    import ray
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
base = rss()
t0 = time.perf_counter()
if method == "old":
    scores = store.read_table(S.CANDIDATES_DIR, columns=["pair_id", "branch", "score_align", "score_delta", "score_img"])
    means = intra_means(scores)
    pruned = apply_prune(scores.to_pandas(), means, cfg)
    kept_ids = set(pruned.loc[pruned["kept"], "pair_id"])
    reasons = dict(zip(pruned["pair_id"], pruned["prune_reason"]))
    to_write = frozenset(kept_ids)
    kept, digest = len(kept_ids), ids_digest(kept_ids)
else:
    out = streaming_prune(store, cfg, StreamPruneConfig(ray_min_shards=1))
    kept, digest = out["pairs_total"], ids_digest(store.read_column(S.PAIRS_DIR, "pair_id"))
    means = out["intra_means"]
secs = time.perf_counter() - t0
peak = status("VmHWM")  # this process's peak RSS (ru_maxrss would carry the parent's over exec)
print("RESULT " + json.dumps({"method": method, "peak_rss": peak, "rss_before": base, "seconds": secs,
                              "kept": kept, "kept_ids": digest, "intra_count": means["count"]}))
"""


def measure(method: str, root: str, num_cpus: int) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", _CHILD, method, root, str(num_cpus), repo],
                          capture_output=True, text=True, env=env, cwd=repo)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            return {"method": method, "peak_rss_mib": round(r["peak_rss"] / MIB, 1),
                    "rss_before_mib": round(r["rss_before"] / MIB, 1),
                    "growth_mib": round((r["peak_rss"] - r["rss_before"]) / MIB, 1),
                    "seconds": round(r["seconds"], 2), "kept": r["kept"], "kept_ids": r["kept_ids"],
                    "intra_count": r["intra_count"]}
    raise RuntimeError(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def markdown(rows: list[dict]) -> str:
    lines = ["| candidates | shards | method | driver peak RSS MiB | growth over start MiB | seconds | kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidates']:,} | {r['shards']} | {r['method']} | {r['peak_rss_mib']} | "
                     f"{r['growth_mib']} | {r['seconds']} | {r['kept']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="240000,2400000", help="candidate counts, comma-separated")
    p.add_argument("--rows-per-shard", type=int, default=10000)
    p.add_argument("--methods", default="old,streaming")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the streaming side's Ray cluster")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]

    rows = []
    before = machine()
    with tempfile.TemporaryDirectory(prefix="pairaug-prune-") as tmp:
        work = args.workdir or tmp
        for n in sizes:
            root = os.path.join(work, f"cands-{n}")
            t0 = time.perf_counter()
            shards = write_candidates(root, n, args.rows_per_shard)
            write_s = round(time.perf_counter() - t0, 1)
            for method in methods:
                if method == "streaming":  # fresh pairs/ and state for each streaming run
                    import shutil

                    shutil.rmtree(os.path.join(root, "pairs"), ignore_errors=True)
                    for f in ("prune_state.json",):
                        if os.path.exists(os.path.join(root, f)):
                            os.remove(os.path.join(root, f))
                row = {"benchmark": "prune_memory", "candidates": n, "shards": shards,
                       "table_write_s": write_s, **measure(method, root, args.num_cpus),
                       "loadavg_1": machine()["loadavg_1_5_15"][0]}
                emit(row)
                rows.append(row)

    def growth(method: str, key: str):
        vals = {r["candidates"]: r[key] for r in rows if r["method"] == method}
        if len(vals) < 2:
            return None
        small, large = vals[min(vals)], vals[max(vals)]
        return round(large / small, 3) if small else None

    same = {}
    for n in sizes:
        digests = {r["kept_ids"] for r in rows if r["candidates"] == n}
        same[n] = len(digests) == 1
    summary = {"benchmark": "prune_memory", "summary": True, "sizes": sizes,
               "peak_ratio_large_to_small": {m: growth(m, "peak_rss_mib") for m in methods},
               "growth_ratio_large_to_small": {m: growth(m, "growth_mib") for m in methods},
               "same_kept_ids_across_methods": same,
               "machine_before": before, "machine_after": machine()}
    emit(summary)
    print(markdown(rows), flush=True)
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()

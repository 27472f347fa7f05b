"""Shared helpers of the augmentation benchmarks: configs, the studies table, the reference loop,
memory sampling and machine facts.

Usage::

    from benchmarks.common import bench_config, make_studies, run_reference, run_pipeline
    cfg = bench_config(workdir, n=16)
    make_studies(cfg)                          # pipeline.run_ingest on phantom://N, once
    ref = run_reference(cfg, f"{workdir}/ref")  # one study at a time, one model call per image
    pipe = run_pipeline(cfg, f"{workdir}/ray")  # pipeline.run_augment

Every benchmark augments every split of the studies table (``augment.splits`` = train, validate,
test), so N studies give N * (inter + intra variants) candidates.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"

# The demo's stages and generation settings (tiny models, 64 px, 10 steps, 1 inter + 2 intra
# variants per study), on every split, with the visual report off (neither side draws one).
BASE_OVERRIDES = [
    "augment.splits=[train, validate, test]",
    "augment.limit=null",          # the demo config augments 64 studies; a benchmark's N means all N
    "augment.report=false",
    "ray.progress_bars=false",
]


def bench_config(workdir: str | os.PathLike, n: int, overrides: list[str] | None = None,
                 config: str | os.PathLike = DEMO_CONFIG):
    """The benchmark's PairAugConfig: ``config`` + base overrides + ``overrides``."""
    from pairaug_ray.config import load_config

    workdir = Path(workdir)
    ingest = workdir / f"ingest-{n}"
    return load_config(str(config), [
        f"ingest.source=phantom://{n}?seed=0", f"ingest.out={ingest}",
        "ingest.decode.image_size=64", f"augment.studies={ingest}",
        *BASE_OVERRIDES, *(overrides or []),
    ])


def make_studies(cfg) -> int:
    """Write the studies table once (skipped when it is already there); returns its row count."""
    from pairaug_ray import schema as S
    from pairaug_ray.io.store import Store
    from pairaug_ray.pipeline import run_ingest

    store = Store(cfg.ingest.out, cfg.storage)
    have = len(store.read_column(S.STUDIES_DIR, "row_id"))
    if not have:
        run_ingest(cfg)
        have = len(store.read_column(S.STUDIES_DIR, "row_id"))
    return have


def ids_digest(ids) -> str:
    """12 hex characters naming a set of pair ids (order-free): equal digests = the same set."""
    from pairaug_ray.io.store import content_hash

    return content_hash(sorted(ids), n=12)


def run_pipeline(cfg, out: str, rerun: bool = False) -> dict:
    """This project's Ray Data pipeline (``run_augment``) into ``out``: wall time, pairs/s, the
    manifest's seconds (``to_first_candidate``, ``prune``, ``fixed`` = the two summed), the prune
    pass, digests of the candidate and kept pair ids; ``rerun`` = run the finished job again and
    time it (``rerun_seconds``: nothing to do, so no pool should start)."""
    from pairaug_ray import schema as S
    from pairaug_ray.io.store import Store
    from pairaug_ray.pipeline import run_augment

    cfg = cfg.model_copy(deep=True)
    cfg.augment.out = out
    t0 = time.perf_counter()
    manifest = run_augment(cfg)
    wall = time.perf_counter() - t0
    cands = sum(b["candidates"] for b in manifest["branches"].values())
    store = Store(out, cfg.storage)
    result = {"profile": manifest.get("profile", {}).get("name", "cluster"), "candidates": cands,
              "kept": manifest["pairs_total"], "seconds": round(wall, 2), "pairs_per_s": cands / wall,
              "stage_throughput": manifest["stage_throughput"], "manifest_seconds": manifest["seconds"],
              "prune_pass": manifest.get("prune_pass"),
              "candidate_ids": ids_digest(store.read_column(S.CANDIDATES_DIR, "pair_id")),
              "kept_ids": ids_digest(store.read_column(S.PAIRS_DIR, "pair_id"))}
    if rerun:
        t0 = time.perf_counter()
        again = run_augment(cfg)
        result["rerun_seconds"] = round(time.perf_counter() - t0, 2)
        result["rerun_rows"] = again["this_run_rows"]
    return result


# ----------------------------------------------------------------------------- the reference

def run_reference(cfg, out: str, threads: int | None = None) -> dict:
    """The reference scripts' approach in one process: study by study, row by row.

    For each study: plan its candidates (the same ids and seeds as the pipeline), rewrite each one
    (rule backend, one request per call), draw each InterAug image (one pipeline call per image),
    edit each IntraAug variant with its own prompt-to-prompt call (the pipeline's ``EditStage``
    with the job's edit settings, one row per call: with ``edit.source: real`` a study's image is
    inverted once and kept for its other variants, as the pipeline's actors do), score each pair
    alone, and write a PNG + a .txt per pair; then prune with the same rules. Models are loaded
    once, as the reference scripts do. ``threads``: torch intra-op threads (None = torch's default,
    one per core).
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _reference(cfg, out) | {"threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(previous)


def _reference(cfg, out: str) -> dict:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from pairaug_ray import schema as S
    from pairaug_ray.config import output_fingerprint
    from pairaug_ray.io.dicom import encode_png
    from pairaug_ray.io.store import Store
    from pairaug_ray.pipeline import PLAN_COLUMNS, plan_candidates
    from pairaug_ray.stages.edit import EditStage
    from pairaug_ray.stages.generate import ImageGenerator
    from pairaug_ray.stages.prune import apply_prune, intra_means
    from pairaug_ray.stages.rewrite import RewriteStage
    from pairaug_ray.stages.score import SCORE_COLUMNS, ScoreStage

    acfg = cfg.augment
    t0 = time.perf_counter()
    table = Store(acfg.studies, cfg.storage).read_table(S.STUDIES_DIR, columns=PLAN_COLUMNS)
    table = table.filter(pc.is_in(table.column("split"), pa.array(acfg.splits, pa.string())))
    if acfg.limit:
        table = table.slice(0, acfg.limit)
    fp = output_fingerprint(acfg.rewrite, acfg.generate, acfg.edit, acfg.score)

    rewriter = RewriteStage(acfg.rewrite)
    generator = ImageGenerator(acfg.generate)
    # the pipeline's edit stage with the job's settings (the study images from the studies table),
    # one row per call
    editor = EditStage(acfg.edit.model_copy(update={"studies": acfg.studies, "storage": cfg.storage}))
    scorer = ScoreStage(acfg.score)
    os.makedirs(out, exist_ok=True)
    scored: list[dict] = []
    errors = 0
    for study in table.to_pylist():
        planned = plan_candidates(pd.DataFrame([study]), inter_variants=acfg.inter_variants,
                                  intra_variants=acfg.intra_variants, seed=acfg.seed, fp=fp)
        for row in planned.to_dict("records"):
            res = rewriter.process([row])[0]
            if isinstance(res, BaseException):
                errors += 1
                continue
            row = res[0]
            if row["branch"] == "inter":
                image = generator.generate([row["rewritten_report"]], [int(row["seed"])])[0]
                row["image_png"] = encode_png(image, bits=acfg.generate.png_bits)
            else:
                res = editor.process([row])[0]
                if isinstance(res, BaseException):
                    errors += 1
                    continue
                row = res[0]
            res = scorer.process([row])[0]
            if isinstance(res, BaseException):
                errors += 1
                continue
            row = res[0]
            base = os.path.join(out, row["pair_id"])
            with open(base + ".png", "wb") as f:
                f.write(row["image_png"])
            with open(base + ".txt", "w") as f:
                f.write(row["rewritten_report"])
            scored.append({k: row[k] for k in ("pair_id", "branch", "status", *SCORE_COLUMNS)})
    frame = pd.DataFrame(scored)
    pruned = apply_prune(frame, intra_means(frame), acfg.prune)
    with open(os.path.join(out, "kept.txt"), "w") as f:
        f.write("\n".join(pruned.loc[pruned["kept"], "pair_id"]))
    wall = time.perf_counter() - t0
    return {"candidates": len(scored), "kept": int(pruned["kept"].sum()), "errors": errors,
            "seconds": round(wall, 2), "pairs_per_s": len(scored) / wall,
            "candidate_ids": ids_digest(frame["pair_id"] if len(frame) else []),
            "kept_ids": ids_digest(pruned.loc[pruned["kept"], "pair_id"] if len(frame) else [])}


# ----------------------------------------------------------------------------- memory

class MemorySampler:
    """Samples, every ``every_s`` in a thread, the RSS of this process + all its descendants
    (the local Ray cluster: GCS, raylet, every worker) and the Ray object store's used bytes.

    ``peak()`` gives the maxima; start/stop around the work to measure.
    """

    def __init__(self, every_s: float = 0.5, object_store_every: int = 4):
        self.every_s = every_s
        self.object_store_every = object_store_every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, with_store: bool) -> dict:
        import psutil

        me = psutil.Process()
        driver = me.memory_info().rss
        workers = other = 0
        for child in me.children(recursive=True):
            try:
                rss = child.memory_info().rss
                name = " ".join(child.cmdline()[:1]) or child.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if name.startswith("ray::") or "default_worker" in " ".join(child.cmdline()[:3]):
                workers += rss
            else:
                other += rss
        out = {"t": time.perf_counter(), "driver": driver, "workers": workers, "ray_daemons": other}
        if with_store:
            out["object_store"] = object_store_used_bytes()
        return out

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample(i % self.object_store_every == 0))
            except Exception:  # noqa: BLE001 - a failed sample must not stop the benchmark
                pass
            i += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def peak(self) -> dict:
        def mx(key):
            vals = [s[key] for s in self.samples if s.get(key) is not None]
            return max(vals) if vals else None

        total = [s["driver"] + s["workers"] + s["ray_daemons"] for s in self.samples]
        return {"driver_rss": mx("driver"), "workers_rss": mx("workers"),
                "ray_daemons_rss": mx("ray_daemons"), "total_rss": max(total) if total else None,
                "object_store_used": mx("object_store"), "samples": len(self.samples)}


_PLASMA = re.compile(r"Plasma memory usage\s+([\d.]+)\s*(\w+)")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def object_store_used_bytes() -> int | None:
    """Bytes in the local Ray object store now (from Ray's memory summary), None when unknown."""
    try:
        import ray
        from ray._private.internal_api import memory_summary

        # The address matters: with other Ray clusters on the host, None is ambiguous.
        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # noqa: BLE001 - internal API: absent or changed in this Ray version
        return None
    m = _PLASMA.search(text)
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 2**20))


# ----------------------------------------------------------------------------- reporting

def machine() -> dict:
    import psutil

    load = os.getloadavg()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        gpu = None
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu, "python": platform.python_version(), "loadavg_1_5_15": [round(x, 2) for x in load],
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def init_ray(num_cpus: int | None) -> None:
    from pairaug_ray.runtime import RayConfig
    from pairaug_ray.runtime import init_ray as pipeline_init_ray

    pipeline_init_ray(RayConfig(num_cpus=num_cpus or None, progress_bars=False))


def emit(obj: dict) -> None:
    print(json.dumps(obj, default=str), flush=True)


# ----------------------------------------------------------------------------- another source tree

_TREE_SCRIPT = r"""
import json, os, sys, time
tree, overrides, num_cpus = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
import ray
ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
from pairaug_ray.config import load_config
from pairaug_ray.pipeline import run_augment
cfg = load_config(os.path.join(tree, "jobs", "configs", "demo.yaml"), overrides)
t0 = time.perf_counter()
m = run_augment(cfg)
wall = time.perf_counter() - t0
cands = sum(b["candidates"] for b in m["branches"].values())
print("RESULT " + json.dumps({"candidates": cands, "kept": m["pairs_total"], "seconds": round(wall, 2),
                              "pairs_per_s": cands / wall, "manifest_seconds": m["seconds"]}))
"""


def run_pipeline_in_tree(tree: str, studies: str, out: str, overrides: list[str] | None = None,
                         num_cpus: int = 2, timeout_s: float = 3600) -> dict:
    """``run_augment`` of the source tree ``tree`` (e.g. ``git archive HEAD`` unpacked: the code
    before a change) with that tree's demo.yaml on the ``studies`` folder, into ``out``, in a
    subprocess with its own local Ray cluster of ``num_cpus`` (started before the clock, as in
    ``run_pipeline``); ``PYTHONPATH=tree`` so its Ray workers run that tree's code too.
    ``overrides``: extra config overrides that tree knows. Raises ``RuntimeError`` when it fails."""
    import subprocess
    import sys

    overrides = [f"augment.studies={studies}", f"augment.out={out}", *BASE_OVERRIDES, *(overrides or [])]
    env = {**os.environ, "PYTHONPATH": tree, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", _TREE_SCRIPT, tree, json.dumps(overrides), str(num_cpus)],
                          env=env, capture_output=True, text=True, timeout=timeout_s, cwd=tree)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"profile": f"tree:{os.path.basename(tree.rstrip('/'))}", **json.loads(line[7:])}
    raise RuntimeError(f"run_augment in {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")

"""Samples/s of the Ray Train VLP loop vs a plain single-process torch loop (same model and data).

Usage::

    python benchmarks/train_throughput.py                      # PhantomCXR 48 studies, 40 steps
    python benchmarks/train_throughput.py --studies runs/ingest --steps 100 --batch-size 32 --num-workers 2
    python benchmarks/train_throughput.py --steps 100 --repeats 3 --variants default,report_metrics,1x1

Both loops (the plain one in a fresh process of its own, without Ray) train the same model (`--model`, a load_vlp URI) from the same start on the same plan of
batches (`train.data.plan_batches`), decode and augment the same way (`train.data.collate`) and
compute the same loss (`ContrastiveStep`). The steady-state rate skips each loop's first step; the
Ray Train figure also comes as a wall-clock rate over the whole `fit()` (worker start-up, dataset
split, checkpoints, final model included).

Threads: each Ray variant is compared with the plain loop at the same total torch threads
(workers x max(1, floor(cpus per worker)): the threads Ray gives its workers), so both sides use the
same cores; the plain loop runs once per thread count needed (`--plain-threads` forces one). On a
machine shared with other jobs a 2-thread OpenMP loop can be many times slower than two 1-thread
processes, which would make Ray look free: compare the 1-thread pair (variant 1x1) there.

Ray Train variants (`--variants`, run alternating with the plain loop, `--repeats` rounds):
``default`` (TrainConfig as is), ``report_metrics`` (ray.train.report every report_every steps, the
behaviour before reports were limited to checkpoints), ``WxC`` (W workers x C CPUs each, e.g. 1x1: no
DDP). Each Ray run gives where a step's time went (`step_seconds`, rank 0: waiting for the batch,
collate, compute incl. DDP, bookkeeping incl. reports), the plain loop the same split. Prints one JSON
line with medians and every run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plain_loop(cfg, items, plan, threads: int | None = None) -> dict:
    """The same training step in one process, no Ray: steady-state samples/s and the time split."""
    import numpy as np
    import torch

    from pairaug_ray.models.vlp import load_vlp
    from pairaug_ray.train.data import collate
    from pairaug_ray.train.vlp import ContrastiveStep, param_groups, step_seed, warmup_cosine

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        vlp = load_vlp(cfg.model)
        vlp.train()
        step_module = ContrastiveStep(vlp)
        opt = torch.optim.AdamW(param_groups(vlp, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
        cols = ["image_png", "text", "transform", "transform_seed"]
        times, losses = [], []
        split = {"data": 0.0, "collate": 0.0, "compute": 0.0}
        for step in range(plan.shape[0]):
            t0 = time.perf_counter()
            batch = {k: np.asarray(v.to_pylist(), dtype=object)
                     for k, v in zip(cols, items.take(plan[step]).select(cols).columns)}
            batch["step"] = np.full(plan.shape[1], step)
            batch["slot"] = np.arange(plan.shape[1])
            t1 = time.perf_counter()
            torch.manual_seed(step_seed(cfg.seed, step, 0))
            pixels, texts = collate(batch, cfg.image_size, cfg.augment_images, cfg.seed)
            t2 = time.perf_counter()
            loss = step_module(pixels, texts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vlp.parameters(), 1.0)
            opt.step()
            sched.step()
            t3 = time.perf_counter()
            times.append(t3 - t0)
            losses.append(float(loss.detach()))
            if step:
                split["data"] += t1 - t0
                split["collate"] += t2 - t1
                split["compute"] += t3 - t2
        steady = times[1:] or times
        return {"samples_per_s": plan.shape[1] * len(steady) / sum(steady), "first_loss": losses[0],
                "final_loss": losses[-1], "torch_threads": torch.get_num_threads(),
                "step_seconds": {k: round(v, 3) for k, v in split.items()}}
    finally:
        torch.set_num_threads(previous)


def _plain_child(cfg_json: str, items_ipc: bytes, plan, threads: int) -> dict:
    """``plain_loop`` in a fresh process without Ray, with the thread settings a Ray worker of
    ``threads`` CPUs gets (``OMP_NUM_THREADS`` before torch is imported)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import pyarrow as pa

    from pairaug_ray.train.vlp import TrainConfig

    items = pa.ipc.open_stream(items_ipc).read_all()
    return plain_loop(TrainConfig.model_validate_json(cfg_json), items, plan, threads)


def plain_in_subprocess(cfg, items, plan, threads: int) -> dict:
    """``plain_loop`` in a fresh spawned process: no Ray driver threads beside it, torch threads
    set as in a Ray worker, so the two loops differ only by what Ray Train adds."""
    import concurrent.futures
    import multiprocessing

    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, items.schema) as writer:
        writer.write_table(items)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_plain_child, cfg.model_dump_json(), sink.getvalue().to_pybytes(), plan,
                           threads).result()


def parse_variant(name: str, args) -> dict:
    """``default`` | ``report_metrics`` | ``WxC`` -> TrainConfig overrides."""
    if name == "default":
        return {}
    if name == "report_metrics":
        return {"report_metrics": True}
    if "x" in name:
        w, c = name.split("x", 1)
        return {"num_workers": int(w), "cpus_per_worker": float(c)}
    raise SystemExit(f"unknown variant {name!r}: default, report_metrics or WxC (e.g. 1x1)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", help="an ingest output folder; default: ingest PhantomCXR into a tmp dir")
    p.add_argument("--n", type=int, default=48, help="PhantomCXR studies when --studies is not given")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--plain-threads", type=int, default=None,
                   help="torch threads of the plain loop (default: each variant's total threads)")
    p.add_argument("--variants", default="default", help="Ray Train variants, comma-separated")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds (plain, variants...)")
    p.add_argument("--model", default="tiny://vlp?seed=0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    args = p.parse_args(argv)

    import ray

    from pairaug_ray.train.data import load_items, plan_batches
    from pairaug_ray.train.vlp import TrainConfig, train_vlp

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    tmp = tempfile.mkdtemp(prefix="pairaug-bench-")
    studies = args.studies
    if studies is None:
        from pairaug_ray.config import load_config
        from pairaug_ray.pipeline import run_ingest

        studies = os.path.join(tmp, "ingest")
        run_ingest(load_config(None, [f"ingest.source=phantom://{args.n}?seed=0", f"ingest.out={studies}",
                                      f"ingest.decode.image_size={args.image_size}",
                                      "ingest.decode.num_cpus=0.25", "ray.progress_bars=false"]))
    base = {"studies": studies, "steps": args.steps, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "cpus_per_worker": args.cpus_per_worker, "model": args.model,
            "image_size": args.image_size, "checkpoint_every": max(1, args.steps),
            "warmup_steps": min(20, args.steps // 5)}
    cfg = TrainConfig(out=os.path.join(tmp, "train"), name="plain", **base)
    items = load_items(cfg.studies, None, cfg.mix, cfg.splits)
    plan = plan_batches(items, cfg.mix, cfg.ratio, cfg.steps, cfg.batch_size, cfg.seed)
    variants = [v for v in args.variants.split(",") if v]
    vcfgs = {v: {**base, **parse_variant(v, args)} for v in variants}
    threads_of = {v: args.plain_threads or c["num_workers"] * max(1, math.floor(c["cpus_per_worker"]))
                  for v, c in vcfgs.items()}
    thread_counts = sorted(set(threads_of.values())) or [args.plain_threads or 1]

    loads = [round(os.getloadavg()[0], 2)]
    plain_runs: dict[int, list] = {t: [] for t in thread_counts}
    ray_runs: dict[str, list] = {v: [] for v in variants}
    for i in range(args.repeats):
        for threads in thread_counts:
            plain_runs[threads].append(plain_in_subprocess(cfg, items, plan, threads))
            loads.append(round(os.getloadavg()[0], 2))
            print(f"[bench] plain ({threads} threads) round {i}: "
                  f"{plain_runs[threads][-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
        for v in variants:
            vcfg = TrainConfig(out=os.path.join(tmp, "train"), name=f"{v}-{i}", **vcfgs[v])
            t0 = time.perf_counter()
            result = train_vlp(vcfg)
            wall = time.perf_counter() - t0
            ray_runs[v].append({"samples_per_s": result["samples_per_s"],
                                "wall_samples_per_s": args.steps * args.batch_size / wall,
                                "fit_s": round(wall, 1), "final_loss": result["final_loss"],
                                "step_seconds": result.get("step_seconds"),
                                "workers": vcfg.num_workers, "cpus_per_worker": vcfg.cpus_per_worker})
            loads.append(round(os.getloadavg()[0], 2))
            print(f"[bench] ray {v} round {i}: {result['samples_per_s']:.1f} samples/s "
                  f"{result.get('step_seconds')}", file=sys.stderr, flush=True)

    plain_by_threads = {t: statistics.median(r["samples_per_s"] for r in runs) for t, runs in plain_runs.items()}
    sides = {}
    for v, runs in ray_runs.items():
        rate = statistics.median(r["samples_per_s"] for r in runs)
        plain = plain_by_threads[threads_of[v]]
        sides[v] = {"samples_per_s": round(rate, 2), "plain_threads": threads_of[v],
                    "plain_samples_per_s": round(plain, 2),
                    "wall_samples_per_s": round(statistics.median(r["wall_samples_per_s"] for r in runs), 2),
                    "overhead_pct": round(100 * (plain / rate - 1), 1)}
    first = variants[0] if variants else None
    out = {
        "benchmark": "train_throughput", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": args.model, "items": len(items), "steps": args.steps, "batch_size": args.batch_size,
        "image_size": args.image_size, "num_workers": args.num_workers,
        "cpus_per_worker": args.cpus_per_worker, "cpu_count": os.cpu_count(),
        "plain_samples_per_s": sides[first]["plain_samples_per_s"] if first else None,
        "plain_torch_threads": sides[first]["plain_threads"] if first else None,
        "plain_by_threads": {t: round(r, 2) for t, r in plain_by_threads.items()},
        # the first variant under the names earlier versions printed
        "ray_train_samples_per_s": sides[first]["samples_per_s"] if first else None,
        "ray_train_wall_samples_per_s": sides[first]["wall_samples_per_s"] if first else None,
        "overhead_pct": sides[first]["overhead_pct"] if first else None,
        "variants": sides, "plain_runs": plain_runs, "ray_runs": ray_runs,
        "load_1min_between_runs": loads,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()

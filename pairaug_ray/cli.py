"""The ``pairaug`` command.

Usage::

    pairaug demo                                   # the whole pipeline on PhantomCXR, local Ray
    pairaug phantom --n 64 --out data/phantom      # write a PhantomCXR MIMIC-style DICOM tree
    pairaug ingest data/phantom --out runs/ingest ingest.decode.image_size=128
    pairaug augment --config jobs/configs/demo.yaml --studies runs/ingest --out runs/augment
    pairaug train --studies runs/ingest --pairs runs/augment --mix original,inter,intra --out runs/train
    pairaug evaluate --model original=runs/train/vlp/model --studies runs/ingest --out runs/eval
    pairaug ablate --studies runs/ingest --pairs runs/augment --out runs/ablate --steps 200
    pairaug label < reports.jsonl > labels.jsonl   # {"id","report"} per line → labels per line

Every job command takes ``--config FILE`` (YAML) and trailing ``section.key=value`` overrides.
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


def _config(args, extra: list[str] | None = None):
    from pairaug_ray.config import load_config

    path = args.config
    if path is None and getattr(args, "default_config", None):
        path = args.default_config if os.path.exists(args.default_config) else None
    return load_config(path, list(extra or []) + list(args.overrides or []))


def _with_loaded_config(cmd):
    """Adapts a command that takes ``args.config`` as the loaded PairAugConfig."""

    def run(args) -> int:
        args.config = _config(args)
        return cmd(args)

    return run


def cmd_phantom(args) -> int:
    from pairaug_ray import phantom

    t0 = time.perf_counter()
    counts = phantom.write_dataset(args.out, n=args.n, seed=args.seed, size=args.size,
                                   report_source=args.reports)
    print(json.dumps({"out": os.path.abspath(args.out), **counts,
                      "seconds": round(time.perf_counter() - t0, 2)}, default=str))
    return 0


def cmd_ingest(args) -> int:
    from pairaug_ray.pipeline import run_ingest

    extra = [f"ingest.source={args.source}"] if args.source else []
    if args.out:
        extra.append(f"ingest.out={args.out}")
    manifest = run_ingest(_config(args, extra))
    print(json.dumps(manifest))
    return 0


def cmd_augment(args) -> int:
    from pairaug_ray.pipeline import run_augment

    extra = []
    if args.studies:
        extra.append(f"augment.studies={args.studies}")
    if args.out:
        extra.append(f"augment.out={args.out}")
    manifest = run_augment(_config(args, extra))
    print(json.dumps(manifest))
    if not sum(b["candidates"] for b in manifest["branches"].values()):
        print(f"pairaug augment: no candidate was produced; every row failed: "
              f"{manifest['errors_by_stage_class']} (rewrite rejections: "
              f"{manifest['rewrite_rejections_this_run']}); see the quarantine table", file=sys.stderr)
        return 1
    return 0


def cmd_label(args) -> int:
    from pairaug_ray.labeler import label_jsonl

    src = open(args.input) if args.input and args.input != "-" else sys.stdin
    dst = open(args.output, "w") if args.output and args.output != "-" else sys.stdout
    lines = (json.loads(line) for line in src if line.strip())
    for rec in label_jsonl(lines):
        dst.write(json.dumps(rec) + "\n")
    dst.flush()
    return 0


def cmd_demo(args) -> int:
    from pairaug_ray import phantom
    from pairaug_ray.pipeline import init_ray, run_augment, run_ingest

    out = os.path.abspath(args.out)
    ingest_out, augment_out, train_out = (os.path.join(out, d) for d in ("ingest", "augment", "train"))
    cfg = _config(args, [f"ingest.out={ingest_out}", f"augment.studies={ingest_out}",
                         f"augment.out={augment_out}", f"train.studies={ingest_out}",
                         f"train.pairs={augment_out}", f"train.out={train_out}"])
    train = not args.no_train
    n_steps = 6 if train else 3
    t0 = time.perf_counter()

    def step(i: int, text: str) -> None:
        print(f"[demo] {i}/{n_steps} {text}", flush=True)

    phantom_dir = os.path.join(out, "phantom")
    step(1, f"writing {args.n} PhantomCXR studies as DICOM to {phantom_dir}")
    counts = phantom.write_dataset(phantom_dir, n=args.n, seed=args.seed, size=args.size,
                                   report_source=args.reports)
    print(f"[demo]     {json.dumps(counts, default=str)}", flush=True)
    step(2, "ingest on Ray Data: decode → label → write")
    cfg.ingest.source = phantom_dir
    ingest = run_ingest(cfg)
    scorer = final = None
    if train:
        from pairaug_ray.train.vlp import train_vlp

        init_ray(cfg.ray)
        step(3, "Ray Train: a first VLP on the original pairs, used as the pruning scorer")
        scorer = train_vlp(cfg.train.model_copy(update={"mix": ["original"], "name": "original"}),
                           cfg.storage)
        cfg.augment.score.model = scorer["model_dir"]
    step(4 if train else 3, "augment on Ray Data: rewrite → InterAug generate / IntraAug edit → "
         "score → prune → write")
    aug = run_augment(cfg)
    results = None
    if train:
        from pairaug_ray.train.evaluate import run_evaluate

        step(5, "Ray Train: the final VLP on original + kept InterAug and IntraAug pairs")
        final = train_vlp(cfg.train.model_copy(update={"mix": ["original", "inter", "intra"],
                                                       "name": "pairaug"}), cfg.storage)
        step(6, "zero-shot evaluation of both on the test split")
        results = run_evaluate([f"original={scorer['model_dir']}", f"pairaug={final['model_dir']}"],
                               ingest_out, os.path.join(out, "evaluate"), storage=cfg.storage)
    secs = time.perf_counter() - t0
    b = aug["branches"]
    print()
    print("PairAug demo finished in %.0f s" % secs)
    print(f"  studies ingested    : {ingest['totals']['studies']} "
          f"({ingest['totals']['quarantined']} quarantined)  {ingest_out}/studies")
    print(f"  InterAug candidates : {b['inter']['candidates']}, kept {b['inter']['kept']}")
    print(f"  IntraAug candidates : {b['intra']['candidates']}, kept {b['intra']['kept']}")
    print(f"  training pairs      : {aug['pairs_total']}  {augment_out}/pairs")
    print(f"  manifests           : {ingest_out}/manifest.json, {augment_out}/manifest.json")
    if aug.get("report"):
        print(f"  visual report       : {aug['report']}")
    if results:
        for name in ("original", "pairaug"):
            zs = results["models"][name]["zeroshot"]
            print(f"  zero-shot mean AUC  : {name:<8} {_fmt(zs.get('mean_auc'))}  "
                  f"(VLP {results['models'][name]['uri']})")
        print(f"  evaluation          : {results['files']['results.md']}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairaug", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"pairaug_ray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def job(name: str, help_: str, default_config: str | None = None):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help="YAML config file")
        sp.set_defaults(default_config=default_config)
        return sp

    sp = sub.add_parser("phantom", help="write a PhantomCXR dataset (MIMIC-CXR style DICOM tree)")
    sp.add_argument("--n", type=int, default=64, help="number of studies")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--size", type=int, default=256, help="image size in pixels")
    sp.add_argument("--reports", choices=["auto", "iu", "template"], default="auto",
                    help="report text: IU corpus when installed (auto), or templates")
    sp.set_defaults(func=cmd_phantom)

    sp = job("ingest", "decode, label and write a source's studies as a Parquet table")
    sp.add_argument("source", nargs="?", help="folder, manifest, s3:// URI, iu:// or phantom://N?seed=S")
    sp.add_argument("--out", help="output folder or s3:// URI")
    sp.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    sp.set_defaults(func=cmd_ingest)

    sp = job("augment", "rewrite, generate/edit, score, prune and write augmented pairs")
    sp.add_argument("--studies", help="an ingest output folder (local or s3://)")
    sp.add_argument("--out", help="output folder or s3:// URI")
    sp.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    sp.set_defaults(func=cmd_augment)

    from pairaug_ray.train.vlp import add_train_arguments, cmd_train

    sp = job("train", "train the VLP on Ray Train (studies + kept augmented pairs)")
    add_train_arguments(sp)
    sp.set_defaults(func=cmd_train)

    from pairaug_ray.train.ablate import add_ablate_args, cmd_ablate
    from pairaug_ray.train.evaluate import add_evaluate_args, cmd_evaluate

    sp = job("evaluate", "zero-shot (and optionally fine-tuned) evaluation of VLPs: table + plots")
    add_evaluate_args(sp)
    sp.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    sp.set_defaults(func=_with_loaded_config(cmd_evaluate))

    sp = job("ablate", "the paper's ablation: VLPs on original / +InterAug / +IntraAug / both / "
             "text-only / image-only, each evaluated zero-shot and fine-tuned")
    add_ablate_args(sp)
    sp.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    sp.set_defaults(func=_with_loaded_config(cmd_ablate))

    from pairaug_ray import estimate as est

    sp = sub.add_parser("estimate", help="expected GPU-hours and wall time per augmentation stage")
    est.add_arguments(sp)
    sp.set_defaults(func=est.cmd_estimate, default_config=None)

    sp = sub.add_parser("label", help="label reports: JSONL {id, report} → JSONL of labels")
    sp.add_argument("input", nargs="?", default="-", help="JSONL file (default stdin)")
    sp.add_argument("--output", default="-", help="JSONL file (default stdout)")
    sp.set_defaults(func=cmd_label)

    sp = job("demo", "the whole pipeline at toy scale on PhantomCXR with local Ray", DEMO_CONFIG)
    sp.add_argument("--out", default="pairaug_out/demo", help="output folder")
    sp.add_argument("--n", type=int, default=48, help="PhantomCXR studies")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--reports", choices=["auto", "iu", "template"], default="auto")
    sp.add_argument("--no-train", action="store_true",
                    help="skip the VLP training and evaluation (ingest + augment only)")
    sp.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options, so collect every leftover "a.b=c" word.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-") or "=" not in u]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + unknown
    elif unknown:
        parser.error(f"{args.command} takes no config overrides: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pairaug {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

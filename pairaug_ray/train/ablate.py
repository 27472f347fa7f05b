"""The PairAug ablation: which augmented pairs make the better VLP, at any scale, as one command.

Variants (``train_vlp(mix=...)``; same initial weights, seed, step budget and batch size):

    (a) original     real pairs only                              mix [original]
    (b) inter        + InterAug kept pairs (new patients)         mix [original, inter]
    (c) intra        + IntraAug kept pairs (changed condition)    mix [original, intra]
    (d) pairaug      + both                                       mix [original, inter, intra]
    (e) text_only    + rewritten reports with the original image  mix [original, text_only]
    (f) image_only   + classical image transforms, original text  mix [original, image_only]
    (g) synthetic    augmented pairs only, no real ones (SynCXR)  mix [inter, intra]

Sources are sampled in proportion to their sizes (``TrainConfig.ratio`` empty); with the same step
budget every variant sees the same number of samples, so an augmented variant sees fewer real
ones (as when the paper adds augmented pairs to the training set). Each trained VLP is evaluated
zero-shot (CheXzero protocol, ``zeroshot.py``) and fine-tuned on 1% / 10% / 100% of the training
labels (linear probe by default, ``finetune.py``), all on the same test split. Each variant's
zero-shot mean AUC is compared with (a)'s by a paired bootstrap over the test images
(``zeroshot.paired_mean_auc_diff``: the CI of the difference itself).

Output under ``out`` (local or ``s3://``): ``runs/<variant>/`` (the training runs; re-running
resumes / reuses them), ``ablation.md`` (the table + per-class detail), ``ablation.json``,
``auc_bars.png``, ``roc.png``.

Usage::

    from pairaug_ray.train.ablate import AblateConfig, run_ablate
    res = run_ablate(AblateConfig(studies="runs/ingest", pairs="runs/augment", out="runs/ablate", steps=200))

    pairaug ablate --studies runs/ingest --pairs runs/augment --out runs/ablate --steps 200
"""
from __future__ import annotations

import os
import posixpath
import tempfile
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pairaug_ray.io.store import StorageConfig, Store, filesystem, split_protocol
from pairaug_ray.vocab import ABLATION_VARIANTS

VARIANTS: dict[str, list[str]] = ABLATION_VARIANTS
VARIANT_LABELS = {
    "original": "(a) original", "inter": "(b) + InterAug", "intra": "(c) + IntraAug",
    "pairaug": "(d) + both (PairAug)", "text_only": "(e) text-only aug.", "image_only": "(f) image-only aug.",
    "synthetic": "(g) synthetic only",
}


class AblateConfig(BaseModel):
    """`pairaug ablate` settings (a PairAugConfig ``ablate:`` section)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    studies: str = Field("pairaug_out/ingest", description="ingest output folder with studies/")
    pairs: str | None = Field("pairaug_out/augment", description="augment output folder with pairs/")
    out: str = Field("pairaug_out/ablate", description="runs, table and plots go here")
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS),
                                description=f"subset of {list(VARIANTS)}")
    model: str = Field("tiny://vlp?seed=0", description="initial VLP weights (same for every variant)")
    steps: int = Field(200, ge=1, description="VLP step budget, the same for every variant")
    batch_size: int = Field(32, ge=2)
    seed: int = 0
    train: dict[str, Any] = Field(default_factory=dict,
                                  description="other TrainConfig fields (lr, warmup_steps, image_size...)")
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])
    finetune_mode: Literal["linear", "full"] = "linear"
    finetune_steps: int = Field(100, ge=1)
    split: str = Field("test", description="evaluation split")
    classes: list[str] | None = None
    templates: str | None = None
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    bootstrap: int = Field(200, ge=0)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False

    @field_validator("variants")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in VARIANTS]
        if unknown or not v:
            raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        return list(dict.fromkeys(v))


def _local_model(uri: str, storage: StorageConfig | None, tmp: str) -> str:
    """A local folder for `load_vlp`: remote model folders are copied into `tmp` first."""
    if split_protocol(uri)[0] == "file":
        return uri
    fs, path = filesystem(uri, storage)
    dest = os.path.join(tmp, posixpath.basename(posixpath.dirname(path)) or "model")
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def _tail_loss(run_dir: str, storage: StorageConfig | None, n: int = 10) -> float | None:
    """Mean loss of the last `n` logged steps (one step's loss is noisy)."""
    from pairaug_ray.train.vlp import read_metrics

    try:
        lines = read_metrics(run_dir, storage)
    except (FileNotFoundError, OSError):
        return None
    losses = [m["loss"] for m in lines if m.get("loss") is not None]
    return float(np.mean(losses[-n:])) if losses else None


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def ablation_markdown(res: dict) -> str:
    """The summary table (one row per variant), then the evaluate-style per-class detail."""
    from pairaug_ray.train.evaluate import results_markdown

    fracs = res["fractions"]
    head = ["variant", "training items (per source)", "final loss", "zero-shot mean AUC",
            "Δ vs (a), paired 95% CI", "zero-shot CheXpert-5"] + [f"FT {f * 100:g}% mean AUC" for f in fracs]
    lines = [f"VLP: {res['steps']} steps x batch {res['batch_size']}, seed {res['seed']}, from "
             f"`{res['model']}`; zero-shot and fine-tuning ({res['finetune_mode']}, "
             f"{res['finetune_steps']} steps) on split `{res['split']}` of `{res['studies']}` "
             f"({res['n_images']} images).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, m in res["models"].items():
        items = ", ".join(f"{k} {c}" for k, c in m["items_per_source"].items())
        ft = {r["fraction"]: r["mean_auc"] for r in m.get("finetune", [])}
        zs = m["zeroshot"]
        ci = ""
        if zs.get("mean_ci_low") is not None:
            ci = f" [{zs['mean_ci_low']:.2f}, {zs['mean_ci_high']:.2f}]"
        d = zs.get("diff_vs_original") or {}
        diff = "–" if d.get("diff") is None else f"{d['diff']:+.3f}" + (
            "" if d.get("ci_low") is None else f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        lines.append(f"| {VARIANT_LABELS[v]} | {items} | {_num(m['final_loss'])} | "
                     f"{_num(zs['mean_auc'])}{ci} | {diff} | {_num(zs['mean_auc_chexpert5'])} | "
                     + " | ".join(_num(ft.get(f)) for f in fracs) + " |")
    lines += ["", "Per-class zero-shot detail:", "", results_markdown({**res, "finetune_fractions": []})]
    return "\n".join(lines) + "\n"


def run_ablate(cfg: AblateConfig, storage: StorageConfig | None = None) -> dict:
    """Train each variant's VLP, evaluate it zero-shot and fine-tuned; write the table + plots."""
    import ray

    from pairaug_ray.labeler import OBSERVATIONS
    from pairaug_ray.models.vlp import load_vlp
    from pairaug_ray.train.evaluate import plot_auc_bars, plot_roc
    from pairaug_ray.train.finetune import finetune_models
    from pairaug_ray.train.vlp import TrainConfig, train_vlp
    from pairaug_ray.train.zeroshot import load_labeled, paired_mean_auc_diff, parse_templates, zeroshot_eval

    t0 = time.perf_counter()
    storage = storage or StorageConfig()
    needs_pairs = [v for v in cfg.variants if set(VARIANTS[v]) & {"inter", "intra", "text_only"}]
    if needs_pairs and not cfg.pairs:
        raise ValueError(f"variants {needs_pairs} need a pairs folder (AblateConfig.pairs)")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    classes = list(cfg.classes or OBSERVATIONS)
    templates = parse_templates(cfg.templates)
    runs_dir = posixpath.join(cfg.out.rstrip("/"), "runs") if "://" in cfg.out \
        else os.path.join(os.path.abspath(cfg.out), "runs")
    res: dict = {**cfg.model_dump(), "classes": classes, "models": {}}
    curves, loaded = {}, {}
    test_data = None
    with tempfile.TemporaryDirectory(prefix="pairaug-ablate-") as tmp:
        for variant in cfg.variants:  # 1. train each variant's VLP, evaluate it zero-shot
            tv = time.perf_counter()
            tcfg = TrainConfig.model_validate({
                **cfg.train, "studies": cfg.studies, "pairs": cfg.pairs, "mix": VARIANTS[variant],
                "model": cfg.model, "out": runs_dir, "name": variant, "steps": cfg.steps,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "num_workers": cfg.num_workers,
                "cpus_per_worker": cfg.cpus_per_worker, "use_gpu": cfg.use_gpu})
            trained = train_vlp(tcfg, storage)
            train_s = time.perf_counter() - tv
            model = load_vlp(_local_model(trained["model_dir"], storage, tmp))
            if test_data is None:
                test_data = load_labeled(cfg.studies, cfg.split, storage, image_size=model.config.image_size)
            zs = zeroshot_eval(model, test_data, split=cfg.split, classes=classes,
                               templates=templates, bootstrap=cfg.bootstrap, seed=cfg.seed,
                               uncertain=cfg.uncertain, return_scores=True)
            y, scores = np.asarray(zs.pop("y"), dtype=np.float32), np.asarray(zs.pop("scores"))
            curves[variant] = (y, scores)
            zs["mean_ci_low"], zs["mean_ci_high"] = zs.get("mean_auc_ci") or (None, None)
            loaded[variant] = model
            res["models"][variant] = {
                "uri": trained["model_dir"], "mix": VARIANTS[variant], "label": VARIANT_LABELS[variant],
                "items_per_source": trained.get("items_per_source", {}),
                "final_loss": _tail_loss(trained["run_dir"], storage) or trained.get("final_loss"),
                "train_samples_per_s": trained.get("samples_per_s"),
                "train_seconds": round(train_s, 2), "zeroshot": zs, "finetune": []}
            res["n_images"] = zs["n_images"]
            res["templates"] = zs["templates"]
    if "original" in curves:  # 2. each variant against (a), paired over the same test images
        y0, s0 = curves["original"]
        for variant, (y, scores) in curves.items():
            if variant != "original":
                res["models"][variant]["zeroshot"]["diff_vs_original"] = paired_mean_auc_diff(
                    y0, scores, s0, cfg.bootstrap, cfg.seed)
    if cfg.fractions:  # 3. fine-tune every variant on every fraction, in one Ray Train run
        tf = time.perf_counter()
        train_data = load_labeled(cfg.studies, "train", storage,
                                  image_size=next(iter(loaded.values())).config.image_size)
        per_variant = finetune_models(
            list(loaded.values()), cfg.studies, cfg.fractions, cfg.finetune_mode, cfg.finetune_steps,
            storage=storage, train_data=train_data, test_data=test_data, classes=classes,
            uncertain=cfg.uncertain, bootstrap=cfg.bootstrap, seed=cfg.seed,
            num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu)
        for variant, ft in zip(loaded, per_variant):
            for r in ft:
                r["model"] = res["models"][variant]["uri"]
            res["models"][variant]["finetune"] = ft
        res["finetune_seconds"] = round(time.perf_counter() - tf, 2)
    res["seconds"] = round(time.perf_counter() - t0, 2)

    store = Store(cfg.out, storage)
    store.write_json("ablation.json", res)
    store.write_bytes("ablation.md", ablation_markdown(res).encode())
    store.write_bytes("auc_bars.png", plot_auc_bars(res))
    store.write_bytes("roc.png", plot_roc(res, curves))
    res["files"] = {k: store.uri_of(k) for k in ("ablation.json", "ablation.md", "auc_bars.png", "roc.png")}
    return res


# ----------------------------------------------------------------------------------------------
# CLI

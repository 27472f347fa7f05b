"""Evaluation output: zero-shot (and optionally fine-tuned) AUC tables and plots for one or more VLPs.

Writes under ``out`` (local or ``s3://``)::

    results.json     every number: per model, zero-shot per-class AUC + 95% CI (+ fine-tune results)
    results.md       the table: one row per class, one column per model ("AUC [low, high]"; n/a when
                     the test labels of a class hold a single value), then the means
    roc.png          ROC curves, one panel per class with an AUC, one curve per model
    auc_bars.png     per-class zero-shot AUC bars with the bootstrap CI, grouped by model

Models are given as ``NAME=URI`` or ``URI`` (the name is then the folder's name, e.g. the run name
of ``runs/train/pairaug/model`` is ``pairaug``).

Usage::

    from pairaug_ray.train.evaluate import run_evaluate
    run_evaluate(["original=runs/train/original/model", "pairaug=runs/train/pairaug/model"],
                 "runs/ingest", "runs/eval", finetune_fractions=[0.01, 0.1, 1.0])

    pairaug evaluate --model runs/train/vlp/model --studies runs/ingest --out runs/eval
"""
from __future__ import annotations

import io
import time
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.console import SEP, StepProgress
from pairaug_ray.labeler import OBSERVATIONS
from pairaug_ray.io.store import StorageConfig, Store


class EvaluateConfig(BaseModel):
    """`pairaug evaluate` settings (a PairAugConfig ``evaluate:`` section)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    models: list[str] = Field(default_factory=lambda: ["pairaug_out/train/vlp/model"],
                              description="VLPs to evaluate: NAME=URI or URI")
    studies: str = Field("pairaug_out/ingest", description="ingest folder or CheXpert-style CSV")
    out: str = Field("pairaug_out/eval", description="folder for results.json/.md and plots")
    split: str = "test"
    classes: list[str] | None = None
    templates: str | None = Field(None, description="'pos {}|neg {};...' or 'ensemble'; None = '{}|no {}'")
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    bootstrap: int = Field(200, ge=0)
    seed: int = 0
    finetune_fractions: list[float] = Field(default_factory=list,
                                            description="also fine-tune on these label fractions")
    finetune_mode: Literal["linear", "full"] = "linear"
    finetune_steps: int = Field(100, ge=1)
    finetune_train_split: str = "train"
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False


def model_name(spec: str) -> tuple[str, str]:
    """``NAME=URI`` -> (NAME, URI); a bare URI is named after its folder (skipping a final ``model``)."""
    if "=" in spec and "://" not in spec.split("=", 1)[0]:
        name, uri = spec.split("=", 1)
        return name, uri
    if spec.startswith("tiny://"):
        return spec.replace("tiny://", "").replace("?", "-").replace("&", "-").replace("=", ""), spec
    parts = [p for p in spec.rstrip("/").replace("\\", "/").split("/") if p]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2], spec
    return (parts[-1] if parts else spec), spec


def _cell(r: dict | None) -> str:
    if not r or r.get("auc") is None:
        return "n/a"
    if r.get("ci_low") is None:
        return f"{r['auc']:.3f}"
    return f"{r['auc']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def results_markdown(results: dict) -> str:
    """The Markdown table of a `run_evaluate` result."""
    names = list(results["models"])
    classes = results["classes"]
    first = results["models"][names[0]]["zeroshot"]["classes"]
    lines = [f"Zero-shot ROC-AUC [bootstrap 95% CI] on `{results['studies']}` split `{results['split']}` "
             f"({results['n_images']} images; templates {results['templates']}; uncertain labels: "
             f"{results['uncertain']})", "",
             "| class | positives / n | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for c in classes:
        cells = [_cell(results["models"][n]["zeroshot"]["classes"].get(c)) for n in names]
        lines.append(f"| {c} | {first[c]['n_pos']} / {first[c]['n']} | " + " | ".join(cells) + " |")
    for key, label in (("mean_auc", "**mean (classes with an AUC)**"),
                       ("mean_auc_chexpert5", "**mean CheXpert-5**")):
        lines.append(f"| {label} | | " + " | ".join(
            _num(results["models"][n]["zeroshot"][key]) for n in names) + " |")
    cis = [results["models"][n]["zeroshot"].get("mean_auc_ci") for n in names]
    if any(cis):
        lines.append("| *95% CI of the mean (images resampled)* | | " + " | ".join(
            f"[{c[0]:.3f}, {c[1]:.3f}]" if c else "n/a" for c in cis) + " |")
    ft_fracs = results.get("finetune_fractions") or []
    if ft_fracs:
        lines += ["", f"Fine-tuned ({results['finetune_mode']}, {results['finetune_steps']} steps) "
                      "mean test AUC by label fraction (patients sampled by patient id):", "",
                  "| model | " + " | ".join(f"{f:g}" for f in ft_fracs) + " |",
                  "|---|" + "---|" * len(ft_fracs)]
        for n in names:
            ft = results["models"][n]["finetune"]
            lines.append(f"| {n} | " + " | ".join(_num(r["mean_auc"]) for r in ft) + " |")
    return "\n".join(lines) + "\n"


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_roc(results: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """ROC panels (one per class with an AUC in any model), one curve per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    names = list(results["models"])
    classes = [c for c in results["classes"]
               if any(results["models"][n]["zeroshot"]["classes"][c]["auc"] is not None for n in names)]
    cols = min(4, max(1, len(classes)))
    rows = max(1, -(-len(classes) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, classes):
        j = results["classes"].index(c)
        for n in names:
            y, s = curves[n]
            keep = ~np.isnan(y[:, j])
            auc = results["models"][n]["zeroshot"]["classes"][c]["auc"]
            if auc is None:
                continue
            fpr, tpr, _ = roc_curve(y[keep, j].astype(int), s[keep, j])
            ax.plot(fpr, tpr, label=f"{n} {auc:.2f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("FPR", fontsize=8)
        ax.set_ylabel("TPR", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    if not classes:
        axes.flat[0].text(0.5, 0.5, "no class has both labels in this split", ha="center")
    fig.suptitle("Zero-shot ROC", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_auc_bars(results: dict) -> bytes:
    """Grouped bars: per-class zero-shot AUC per model, bootstrap CI as error bars; n/a left empty."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    classes = results["classes"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(classes) * max(1, len(names)) ** 0.5 + 2), 3.6))
    x = np.arange(len(classes))
    for k, n in enumerate(names):
        per = results["models"][n]["zeroshot"]["classes"]
        auc = np.array([per[c]["auc"] if per[c]["auc"] is not None else np.nan for c in classes])
        lo = np.array([per[c]["ci_low"] if per[c]["ci_low"] is not None else np.nan for c in classes])
        hi = np.array([per[c]["ci_high"] if per[c]["ci_high"] is not None else np.nan for c in classes])
        # a bootstrap CI of a small set can exclude its own point estimate: clip, never negative
        err = np.clip(np.vstack([np.nan_to_num(auc - lo), np.nan_to_num(hi - auc)]), 0.0, None)
        xs = x + (k - (len(names) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(auc), width, yerr=err, capsize=2, label=n, error_kw={"linewidth": 0.7})
        for xi in xs[np.isnan(auc)]:
            ax.text(xi, 0.02, "n/a", rotation=90, fontsize=6, ha="center", va="bottom")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("zero-shot ROC-AUC")
    ax.legend(fontsize=7)
    return _png(fig)


def run_evaluate(models: str | Sequence[str], studies: str, out: str, *, split: str = "test",
                 classes: Sequence[str] | None = None, templates=None, uncertain: str = "ignore",
                 bootstrap: int = 200, seed: int = 0, finetune_fractions: Sequence[float] = (),
                 finetune_mode: str = "linear", finetune_steps: int = 100,
                 finetune_train_split: str = "train", num_workers: int = 2,
                 cpus_per_worker: float = 0.5, use_gpu: bool = False,
                 storage: StorageConfig | None = None) -> dict:
    """Zero-shot evaluate each model (and fine-tune it when fractions are given); write the table
    and plots under ``out``. Returns the results dict (also ``results.json``)."""
    from pairaug_ray.models.vlp import load_vlp
    from pairaug_ray.train.zeroshot import load_labeled, parse_templates, zeroshot_eval

    t0 = time.perf_counter()
    specs = [models] if isinstance(models, str) else list(models)
    if not specs:
        raise ValueError("no model to evaluate")
    named = [model_name(s) for s in specs]
    if len({n for n, _ in named}) != len(named):
        raise ValueError(f"model names must differ: {[n for n, _ in named]} (use NAME=URI)")
    if isinstance(templates, str):
        templates = parse_templates(templates)
    classes = list(classes or OBSERVATIONS)
    results: dict = {"studies": studies, "split": split, "classes": classes, "uncertain": uncertain,
                     "templates": None, "models": {}, "finetune_fractions": list(finetune_fractions),
                     "finetune_mode": finetune_mode, "finetune_steps": finetune_steps}
    curves = {}
    loaded = {}
    test_data = train_data = None
    bar = StepProgress("evaluate", total=len(named), unit="models", every_s=None)
    for name, uri in named:
        model = load_vlp(uri)
        if test_data is None:  # read once, at the first model's size (preprocess resizes for others)
            test_data = load_labeled(studies, split, storage, image_size=model.config.image_size)
        zs = zeroshot_eval(model, test_data, split=split, classes=classes, templates=templates,
                           bootstrap=bootstrap, seed=seed, uncertain=uncertain, return_scores=True)
        curves[name] = (np.asarray(zs.pop("y"), dtype=np.float32), np.asarray(zs.pop("scores")))
        zs["model"] = uri
        results["models"][name] = {"uri": uri, "zeroshot": zs}
        results["templates"] = zs["templates"]
        results["n_images"] = zs["n_images"]
        loaded[name] = model
        bar.update(1)
        bar.emit(f"{name}: zero-shot mean AUC {zs['mean_auc']:.3f}{SEP}{zs['n_images']} images of {split}"
                 if zs.get("mean_auc") is not None else f"{name}: no AUC (a class without both labels?)")
    bar.close()
    if finetune_fractions:  # every model and fraction in one Ray Train run
        from pairaug_ray.train.finetune import finetune_models

        train_data = load_labeled(studies, finetune_train_split, storage,
                                  image_size=next(iter(loaded.values())).config.image_size)
        per_model = finetune_models(
            list(loaded.values()), studies, list(finetune_fractions), finetune_mode, finetune_steps,
            storage=storage, train_data=train_data, test_data=test_data, classes=classes,
            uncertain=uncertain, bootstrap=bootstrap, seed=seed, num_workers=num_workers,
            cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)
        for name, ft in zip(loaded, per_model):
            for r in ft:
                r["model"] = results["models"][name]["uri"]
            results["models"][name]["finetune"] = ft
    results["seconds"] = round(time.perf_counter() - t0, 2)

    store = Store(out, storage)
    store.write_json("results.json", results)
    store.write_bytes("results.md", results_markdown(results).encode())
    store.write_bytes("roc.png", plot_roc(results, curves))
    store.write_bytes("auc_bars.png", plot_auc_bars(results))
    results["files"] = {k: store.uri_of(k) for k in ("results.json", "results.md", "roc.png", "auc_bars.png")}
    return results


# ----------------------------------------------------------------------------------------------
# CLI

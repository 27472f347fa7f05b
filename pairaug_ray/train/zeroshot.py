"""Zero-shot classification of chest radiographs with a VLP (the CheXzero protocol).

For each class the image embedding is compared with the embedding of a positive prompt
(``"{label}"``, e.g. "pleural effusion") and a negative prompt (``"no {label}"``); the score is
``softmax([img·pos, img·neg])[0]``. With several (positive, negative) templates the prompt
embeddings are averaged over templates and re-normalized (CLIP prompt ensembling). Per class:
ROC-AUC (scikit-learn) with a seeded percentile-bootstrap 95% CI.

Labels (CheXpert states in the studies table's ``labels`` JSON, or CheXpert-style CSV columns):
positive (1) -> 1, negative (0) -> 0, **not mentioned -> 0** (the CheXpert evaluation convention: a
report that does not mention pneumothorax says the patient has none), **uncertain (-1)** by
``uncertain=``: ``"ignore"`` (default: the image is left out of that class's AUC, and out of that
class's loss in fine-tuning; CheXpert's U-Ignore), ``"zeros"`` (U-Zeros) or ``"ones"`` (U-Ones).
A class whose kept labels hold a single value has no AUC: it is reported as ``"n/a"``.

Labeled inputs (``load_labeled``):
- an ingest output folder (local or ``s3://``) holding ``studies/``: rows of the chosen split;
- a CheXpert-style CSV (``Path`` column, one column per observation with 1.0 / 0.0 / -1.0 / blank;
  optional ``split`` / ``patient_id`` columns; ``Path`` is relative to the CSV's folder or its parent,
  as in CheXpert's ``CheXpert-v1.0-small/valid/...``). Images are DICOM / PNG / JPEG.

Usage::

    from pairaug_ray.train.zeroshot import zeroshot_eval
    res = zeroshot_eval("runs/vlp/model", "runs/ingest", split="test")
    res["mean_auc"], res["classes"]["Pleural Effusion"]   # {"auc", "ci_low", "ci_high", "n", "n_pos"}
"""
from __future__ import annotations

import csv
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pairaug_ray.labeler import OBSERVATIONS
from pairaug_ray.io.store import StorageConfig, Store, filesystem, split_protocol

DEFAULT_TEMPLATES: list[tuple[str, str]] = [("{}", "no {}")]
# Templates a user can opt into (``--templates ensemble``); averaged per class.
ENSEMBLE_TEMPLATES: list[tuple[str, str]] = [
    ("{}", "no {}"), ("findings of {}", "no evidence of {}"), ("there is {}", "there is no {}")]
# The five CheXpert competition classes (CheXzero reports their mean AUC).
CHEXPERT5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")


@dataclass
class LabeledSet:
    """Images and labels of a labeled table, in one split."""

    images: np.ndarray                        # float32 [N, S, S] in [0, 1], bright = dense
    labels: list[dict[str, int]]              # per image {observation: 1 / 0 / -1}; absent = not mentioned
    patient_ids: list[str]
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int]) -> "LabeledSet":
        idx = list(index)
        return LabeledSet(self.images[idx] if len(idx) else self.images[:0],
                          [self.labels[i] for i in idx], [self.patient_ids[i] for i in idx],
                          [self.ids[i] for i in idx] if self.ids else [])


def label_matrix(labels: Sequence[dict[str, int]], classes: Sequence[str],
                 uncertain: str = "ignore") -> np.ndarray:
    """[N, C] float targets: 1 / 0, not mentioned -> 0, uncertain per policy (NaN = ignored)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, not {uncertain!r}")
    u = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    y = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for i, lab in enumerate(labels):
        for j, c in enumerate(classes):
            s = lab.get(c)
            y[i, j] = 1.0 if s == 1 else u if s == -1 else 0.0
    return y


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.astype(np.float32, copy=False)
    out = []
    for start in range(0, len(images), 256):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + 256], dtype=np.float32))
        out.append(F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear",
                                 align_corners=False, antialias=True).squeeze(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def _in_split(value: str | None, split: str | None) -> bool:
    """`split`: one name, a comma-separated list ("validate,test"), or None / "" / "all"."""
    if split in (None, "", "all"):
        return True
    return (value or "") in {s.strip() for s in split.split(",")}


def _studies_table(source: str, split: str | None, storage: StorageConfig | None, image_size: int | None):
    from pairaug_ray.io.dicom import decode_png

    store = Store(source, storage)
    table = store.read_table("studies", columns=["row_id", "patient_id", "split", "labels", "image_png"])
    if table is None:
        raise FileNotFoundError(f"no studies table under {source}")
    rows = [r for r in table.to_pylist() if _in_split(r["split"], split)]
    images = [decode_png(r["image_png"]) for r in rows]
    if image_size is not None:
        images = [_resize(im[None], image_size)[0] for im in images]
    arr = np.stack(images).astype(np.float32) if images else np.zeros((0, image_size or 1, image_size or 1), np.float32)
    return LabeledSet(arr, [json.loads(r["labels"] or "{}") for r in rows],
                      [r["patient_id"] or r["row_id"] for r in rows], [r["row_id"] for r in rows])


def _csv_state(value: str) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    v = float(value)
    if math.isnan(v):
        return None
    return 1 if v == 1 else -1 if v == -1 else 0


def _manifest_csv(source: str, split: str | None, storage: StorageConfig | None, image_size: int | None):
    from pairaug_ray.io.dicom import decode_any

    fs, path = filesystem(source, storage)
    proto = split_protocol(source)[0]
    with fs.open(path, "r") as f:
        records = list(csv.DictReader(f))
    base = posixpath.dirname(path)
    images, labels, patients, ids = [], [], [], []
    for rec in records:
        if "split" in rec and not _in_split(rec["split"], split):
            continue
        rel = rec.get("Path") or rec.get("path") or rec.get("image")
        if not rel:
            raise ValueError(f"{source}: a row has no Path column")
        candidates = [rel] if rel.startswith("/") or "://" in rel else \
            [posixpath.join(base, rel), posixpath.join(posixpath.dirname(base), rel)]
        found = next((c for c in candidates if fs.exists(c.split("://", 1)[-1])), None)
        if found is None:
            raise FileNotFoundError(f"{source}: image {rel!r} not found")
        with fs.open(found.split("://", 1)[-1], "rb") as f:
            data = f.read()
        images.append(decode_any(data, name=found, size=image_size).pixels)
        labels.append({o: s for o in OBSERVATIONS if (s := _csv_state(rec.get(o, ""))) is not None})
        m = re.search(r"patient\d+", rel)
        patients.append(rec.get("patient_id") or (m.group(0) if m else rel))
        ids.append(rel if proto == "file" else f"{proto}://{rel}")
    arr = np.stack(images).astype(np.float32) if images else np.zeros((0, image_size or 1, image_size or 1), np.float32)
    return LabeledSet(arr, labels, patients, ids)


def load_labeled(source: str, split: str | None = "test", storage: StorageConfig | None = None,
                 image_size: int | None = None) -> LabeledSet:
    """Read a labeled table on the driver: an ingest folder's studies (one split) or a CSV manifest.

    ``split`` is a split name or a comma-separated list (``"validate,test"``); ``None`` / ``"all"``
    keeps every row. Images are resized to ``image_size`` when given.
    """
    if source.lower().endswith((".csv", ".csv.gz")):
        return _manifest_csv(source, split, storage, image_size)
    return _studies_table(source, split, storage, image_size)


@torch.no_grad()
def encode_images(model, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """[N, S, S] images -> [N, D] L2-normalized embeddings, in batches."""
    model.eval()
    out = [model.encode_image(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])))
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0, model.config.embed_dim)


@torch.no_grad()
def prompt_embeddings(model, classes: Sequence[str],
                      templates: Sequence[tuple[str, str]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([C, D] positive, [C, D] negative) prompt embeddings averaged over templates, re-normalized."""
    templates = list(templates or DEFAULT_TEMPLATES)
    names = [c.lower() for c in classes]
    model.eval()
    fill = lambda t, n: t.replace("{label}", "{}").format(n)  # noqa: E731 - "{}" or "{label}"
    pos = torch.stack([model.encode_text([fill(p, n) for n in names]) for p, _ in templates]).mean(0)
    neg = torch.stack([model.encode_text([fill(q, n) for n in names]) for _, q in templates]).mean(0)
    return F.normalize(pos, dim=-1).cpu(), F.normalize(neg, dim=-1).cpu()


def zeroshot_scores(img_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> np.ndarray:
    """[N, C] probability of the positive prompt: softmax over (img·pos, img·neg) per class."""
    logits = torch.stack([img_emb @ pos_emb.t(), img_emb @ neg_emb.t()], dim=-1)
    return torch.softmax(logits.float(), dim=-1)[..., 0].numpy()


def auc_with_ci(y: np.ndarray, score: np.ndarray, bootstrap: int = 200, seed: int = 0,
                alpha: float = 0.05) -> dict:
    """ROC-AUC of one class with a percentile-bootstrap CI; NaN targets are left out.

    Returns {"auc", "ci_low", "ci_high", "n", "n_pos"}; auc is None ("n/a") with a single label value.
    Bootstrap resamples that hold one label value only are skipped (the CI uses the rest).
    """
    from sklearn.metrics import roc_auc_score

    keep = ~np.isnan(y)
    y, score = y[keep].astype(int), score[keep]
    res = {"auc": None, "ci_low": None, "ci_high": None, "n": int(len(y)), "n_pos": int(y.sum())}
    if len(np.unique(y)) < 2:
        return res
    res["auc"] = float(roc_auc_score(y, score))
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        stats = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(y), len(y))
            if y[idx].min() != y[idx].max():
                stats.append(roc_auc_score(y[idx], score[idx]))
        if stats:
            res["ci_low"] = float(np.quantile(stats, alpha / 2))
            res["ci_high"] = float(np.quantile(stats, 1 - alpha / 2))
    return res


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean over the classes (columns) that hold both labels of the per-class ROC-AUC; NaN
    targets left out. None when no class can be scored."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(y.shape[1]):
        keep = ~np.isnan(y[:, j])
        t = y[keep, j]
        if len(t) and t.min() != t.max():
            aucs.append(roc_auc_score(t.astype(int), scores[keep, j]))
    return float(np.mean(aucs)) if aucs else None


def mean_auc_ci(y: np.ndarray, scores: np.ndarray, bootstrap: int = 200, seed: int = 0,
                alpha: float = 0.05) -> list[float] | None:
    """Percentile-bootstrap CI [low, high] of the mean over classes of the per-class ROC-AUC, with
    images (rows of the [N, C] ``y`` / ``scores``) resampled together, so the classes' correlation
    is kept; in a resample a class without both labels is left out of that resample's mean. None
    without classes or resamples."""
    if bootstrap <= 0 or y.size == 0 or y.shape[1] == 0:
        return None
    rng = np.random.default_rng(seed + 7_777)
    stats = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(y), len(y))
        m = _mean_auc(y[idx], scores[idx])
        if m is not None:
            stats.append(m)
    if not stats:
        return None
    return [float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))]


def paired_mean_auc_diff(y: np.ndarray, scores_b: np.ndarray, scores_a: np.ndarray, bootstrap: int = 200,
                         seed: int = 0, alpha: float = 0.05) -> dict:
    """Difference of mean AUC, model B minus model A, on the same images, with a paired bootstrap
    CI: each resample draws images once and scores both models on them, so the CI is of the
    difference itself (narrower than comparing two separate CIs when the models agree on which
    images are hard). ``y`` [N, C] targets (NaN = left out), ``scores_*`` [N, C].

    Returns {"diff", "ci_low", "ci_high", "p_b_better"}: ``p_b_better`` = the share of resamples
    where B's mean is higher. None values when no class can be scored."""
    out = {"diff": None, "ci_low": None, "ci_high": None, "p_b_better": None}
    a, b = _mean_auc(y, scores_a), _mean_auc(y, scores_b)
    if a is None or b is None:
        return out
    out["diff"] = b - a
    if bootstrap > 0:
        rng = np.random.default_rng(seed + 31_337)
        diffs = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(y), len(y))
            ma, mb = _mean_auc(y[idx], scores_a[idx]), _mean_auc(y[idx], scores_b[idx])
            if ma is not None and mb is not None:
                diffs.append(mb - ma)
        if diffs:
            out["ci_low"] = float(np.quantile(diffs, alpha / 2))
            out["ci_high"] = float(np.quantile(diffs, 1 - alpha / 2))
            out["p_b_better"] = float(np.mean(np.asarray(diffs) > 0))
    return out


def score_classes(y: np.ndarray, scores: np.ndarray, classes: Sequence[str], bootstrap: int = 200,
                  seed: int = 0) -> dict:
    """Per-class AUC + CI for [N, C] targets and scores; mean over classes with an AUC."""
    per = {c: auc_with_ci(y[:, j], scores[:, j], bootstrap=bootstrap, seed=seed + j)
           for j, c in enumerate(classes)}
    scored = [j for j, c in enumerate(classes) if per[c]["auc"] is not None]
    return {"classes": per,
            "mean_auc": _mean(r["auc"] for r in per.values()),
            "mean_auc_ci": mean_auc_ci(y[:, scored], scores[:, scored], bootstrap, seed),
            "mean_auc_chexpert5": _mean(per[c]["auc"] for c in CHEXPERT5 if c in per),
            "n_images": int(len(y)),
            "n_classes_scored": sum(r["auc"] is not None for r in per.values())}


def zeroshot_eval(model_uri, studies: str | LabeledSet, split: str | None = "test",
                  classes: Sequence[str] | None = None,
                  templates: Sequence[tuple[str, str]] | None = None,
                  storage: StorageConfig | None = None, bootstrap: int = 200, seed: int = 0,
                  uncertain: str = "ignore", batch_size: int = 64, return_scores: bool = False) -> dict:
    """Zero-shot per-class ROC-AUC (+ bootstrap 95% CI) of a VLP on a labeled table.

    ``model_uri``: a saved VLP folder, ``tiny://vlp?seed=N``, or a loaded ``VLPModel``.
    ``studies``: an ingest folder, a CheXpert-style CSV, or a ``LabeledSet``.
    With ``return_scores`` the result also holds ``"y"`` and ``"scores"`` ([N, C] lists) for plots.
    """
    from pairaug_ray.models.vlp import load_vlp

    # Anything with encode_image / encode_text / config (a VLPModel) is used as it is.
    model = load_vlp(model_uri) if isinstance(model_uri, (str, os.PathLike)) else model_uri
    classes = list(classes or OBSERVATIONS)
    data = studies if isinstance(studies, LabeledSet) else \
        load_labeled(studies, split, storage, image_size=model.config.image_size)
    img = encode_images(model, data.images, batch_size)
    pos, neg = prompt_embeddings(model, classes, templates)
    scores = zeroshot_scores(img, pos, neg)
    y = label_matrix(data.labels, classes, uncertain)
    res = score_classes(y, scores, classes, bootstrap, seed)
    res.update({"model": str(model_uri) if isinstance(model_uri, (str, os.PathLike)) else "in-memory model",
                "split": split, "templates": [list(t) for t in (templates or DEFAULT_TEMPLATES)],
                "uncertain": uncertain, "bootstrap": bootstrap})
    if return_scores:
        res["y"], res["scores"] = y.tolist(), scores.tolist()
    return res


def parse_templates(spec: str | None) -> list[tuple[str, str]] | None:
    """CLI form: ``"{}|no {};there is {}|there is no {}"`` or ``ensemble``; None = default."""
    if not spec:
        return None
    if spec == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    out = []
    for part in spec.split(";"):
        pos, _, neg = part.partition("|")
        if not all("{}" in t or "{label}" in t for t in (pos, neg)):
            raise ValueError(f"template {part!r} needs 'positive {{}}|negative {{}}'")
        out.append((pos.strip(), neg.strip()))
    return out

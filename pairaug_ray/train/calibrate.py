"""The InterAug pruning threshold, calibrated on real image-report pairs with the scorer itself.

Usage::

    cal = calibrate_inter_threshold("runs/train/original/model", "runs/ingest", quantile=0.1)
    cal["threshold"]       # keep a candidate when cos(new image, new text) > this
    cfg.augment.prune.inter_threshold = cal["threshold"]

Why: PairAug keeps an InterAug pair when its image-text alignment exceeds 0.3, but that 0.3 is on
MedCLIP's logit scale; a cosine of another scorer has another scale. Calibrating on the training
split's REAL pairs gives the threshold a meaning for any scorer: with ``quantile=0.1`` a kept
synthetic pair is at least as aligned as the least-aligned 10% of real pairs would be. The result
also says whether the scorer can tell at all: ``auc`` is the ROC-AUC of matched (image, its own
report) against mismatched (image, another patient's report) cosines; near 0.5 the scorer cannot
tell pairs apart and no threshold will prune meaningfully.
"""

from __future__ import annotations

import numpy as np
import torch

from pairaug_ray.io.store import StorageConfig, Store


@torch.no_grad()
def calibrate_inter_threshold(score_model: str, studies: str, storage: StorageConfig | None = None,
                              split: str = "train", quantile: float = 0.1, max_pairs: int = 512,
                              seed: int = 0, batch_size: int = 64) -> dict:
    """Cosine threshold from the real pairs of ``studies`` (an ingest folder), scored by ``score_model``.

    Returns ``{"threshold", "quantile", "n_pairs", "matched_mean", "mismatched_mean", "auc",
    "split"}``: ``threshold`` is the ``quantile`` of matched cos(image, report) (dimensionless, in
    [-1, 1]); mismatched pairs pair each image with the report of another row (a seeded
    permutation). Raises ``FileNotFoundError`` without a studies table and ``ValueError`` when the
    split has fewer than 4 rows with an image and a report.
    """
    from sklearn.metrics import roc_auc_score

    from pairaug_ray.io.dicom import decode_png
    from pairaug_ray.models.vlp import load_vlp

    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    table = Store(studies, storage).read_table("studies", columns=["split", "report", "image_png"])
    if table is None:
        raise FileNotFoundError(f"no studies table under {studies}")
    rows = [r for r in table.to_pylist()
            if (r["split"] or "") == split and r["image_png"] and (r["report"] or "").strip()]
    rng = np.random.default_rng(seed)
    if len(rows) > max_pairs:
        rows = [rows[i] for i in sorted(rng.choice(len(rows), max_pairs, replace=False))]
    if len(rows) < 4:
        raise ValueError(f"{studies}: split {split!r} has {len(rows)} rows with an image and a report; "
                         "calibration needs at least 4")
    model = load_vlp(score_model)
    size = model.config.image_size
    img, txt = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pixels = torch.from_numpy(np.stack([decode_png(r["image_png"]) for r in chunk]).astype(np.float32))
        if pixels.shape[-1] != size:
            pixels = torch.nn.functional.interpolate(pixels[:, None], size=(size, size), mode="bilinear",
                                                     antialias=True, align_corners=False)[:, 0]
        img.append(model.encode_image(pixels))
        txt.append(model.encode_text([r["report"] for r in chunk]))
    img_emb, txt_emb = torch.cat(img), torch.cat(txt)
    matched = (img_emb * txt_emb).sum(-1).numpy()
    # a derangement: every image meets another row's report
    perm = (np.arange(len(rows)) + 1 + rng.integers(len(rows) - 1)) % len(rows)
    mismatched = (img_emb * txt_emb[perm]).sum(-1).numpy()
    y = np.r_[np.ones(len(matched)), np.zeros(len(mismatched))]
    return {"threshold": round(float(np.quantile(matched, quantile)), 6), "quantile": quantile,
            "n_pairs": len(rows), "matched_mean": round(float(matched.mean()), 6),
            "mismatched_mean": round(float(mismatched.mean()), 6),
            "auc": round(float(roc_auc_score(y, np.r_[matched, mismatched])), 4), "split": split,
            "score_model": score_model}

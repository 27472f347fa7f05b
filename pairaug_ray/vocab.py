"""The project's shared vocabulary: augmentation branches, score columns, and the finding tables
that the labeler, the rewriters, PhantomCXR, scoring, pruning and the run report all use.

Usage::

    from pairaug_ray.vocab import BRANCHES, GRADED, SIDES, normalize_branch
    normalize_branch("InterAug")     # "inter"
    "Pleural Effusion" in GRADED     # True: reports grade it (small / moderate / large)
    SIDES["Pneumothorax"]            # ("right", "left")

Observation names are CheXpert's 14 (Irvin et al., 2019, arXiv 1901.07031), as in
``pairaug_ray.labeler.OBSERVATIONS``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------- branches

INTER, INTRA = "inter", "intra"
BRANCHES = (INTER, INTRA)
BRANCH_TITLES = {INTER: "InterAug", INTRA: "IntraAug"}
BRANCH_DESCRIPTIONS = {INTER: "new patient: rewritten report + generated image",
                       INTRA: "same patient, changed condition: prompt-to-prompt edit"}


def normalize_branch(value) -> str:
    """"inter" / "intra" for any spelling that starts so ("InterAug", "intra_aug"), else ""."""
    v = str(value or "").strip().lower()
    return INTER if v.startswith(INTER) else INTRA if v.startswith(INTRA) else ""


def normalize_branches(values) -> np.ndarray:
    """``normalize_branch`` over an array-like (None / NaN -> "")."""
    lowered = pd.Series(values, dtype="object").fillna("").astype(str).str.strip().str.lower()
    return np.where(lowered.str.startswith(INTER), INTER,
                    np.where(lowered.str.startswith(INTRA), INTRA, ""))


# ----------------------------------------------------------------------------- scores

# cos(new image, new text); cos(Δimage, Δtext); cos(new image, source image) — PairAug's scores.
SCORE_COLUMNS = ("score_align", "score_delta", "score_img")
SCORE_SHORT = {"score_align": "align", "score_delta": "delta", "score_img": "img"}
SCORE_LABELS = {"score_align": "align: cos(new image, new text)",
                "score_delta": "delta: cos(Δimage, Δtext)",
                "score_img": "img: cos(new image, source image)"}

# ----------------------------------------------------------------------------- findings

NO_FINDING = "No Finding"   # CheXpert's label for a study with no other positive finding

SEVERITIES = ("mild", "moderate", "severe")
# Observations that reports grade (mild / moderate / severe, small / large, a nodule's size).
GRADED = frozenset({"Cardiomegaly", "Enlarged Cardiomediastinum", "Pleural Effusion", "Pneumothorax",
                    "Edema", "Consolidation", "Atelectasis", "Lung Opacity", "Lung Lesion"})
# Observations that take a side in reports, and the sides they take.
SIDES: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": ("right", "left", "bilateral"), "Pneumothorax": ("right", "left"),
    "Consolidation": ("right", "left"), "Pneumonia": ("right", "left"), "Lung Opacity": ("right", "left"),
    "Atelectasis": ("right", "left", "bilateral"), "Lung Lesion": ("right", "left"),
    "Pleural Other": ("right", "left"), "Fracture": ("right", "left"),
}
SIDED = frozenset(SIDES)
# Observations a follow-up report can call resolved ("interval resolution of the effusion").
RESOLVES = frozenset({"Pleural Effusion", "Pneumothorax", "Consolidation", "Edema", "Atelectasis",
                      "Lung Opacity", "Pneumonia"})
# The noun phrase a report uses for each observation.
NOUNS = {
    "Enlarged Cardiomediastinum": "mediastinal widening", "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity", "Lung Lesion": "lung nodule", "Edema": "pulmonary edema",
    "Consolidation": "consolidation", "Pneumonia": "pneumonia", "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax", "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening", "Fracture": "rib fracture",
    "Support Devices": "endotracheal tube",
}

# ----------------------------------------------------------------------------- training sources

# What a VLP can train on: the real studies, the kept pairs of each branch, and the paper's
# ablation controls (augmented text with the real image; a classic image transform with the real text).
TRAIN_SOURCES = ("original", "inter", "intra", "text_only", "image_only")
# The paper's ablation variants (a)-(f): name -> training sources.
ABLATION_VARIANTS: dict[str, list[str]] = {
    "original": ["original"],
    "inter": ["original", "inter"],
    "intra": ["original", "intra"],
    "pairaug": ["original", "inter", "intra"],
    "text_only": ["original", "text_only"],
    "image_only": ["original", "image_only"],
    "synthetic": ["inter", "intra"],      # (g) augmented pairs without the real ones (SynCXR-style)
}

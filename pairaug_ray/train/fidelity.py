"""Generation fidelity: does an image drawn for a report show what the report says?

The paired design (DESIGN.md, "Generators and fidelity"; issue 11 item 2). For a finding F, build N
pairs of prompts: a report that states F, and the *same* report with F negated (the sentences that
mention F replaced by the project's negative statement of F, ``llm.rule.phrase``; every other
sentence kept word for word). Both prompts of a pair are drawn with the same seed, so the pair
differs only in what the text says about F. Each image gets a score, and the figure is the ROC-AUC
(scikit-learn ``roc_auc_score``) of the scores of the "with F" images against the "without F" images:
1.0 = the generator always draws F where asked, 0.5 = it ignores the prompt, < 0.5 = it draws the
opposite. The 95% CI is a seeded percentile bootstrap over *pairs* (both images of a resampled pair
go in together).

Two kinds of score:

- **physical** (PhantomCXR only): the PhantomCXR image probe of the finding (``PROBES`` below, one
  table: finding -> probe, side handling, severities asked for, context left out, source). Pairs
  come from PhantomCXR template reports (``phantom.text``). A sided finding (pleural effusion,
  pneumothorax) is asked for on the left or the right; its ``side`` figure scores the probe on the
  named side minus the other side, so a generator that draws the finding on the wrong side scores
  near 0 there, and its ``present`` figure scores the asymmetry whichever side it is on.
- **classifier** (any data): a trained VLP's zero-shot probability of F (the CheXzero protocol of
  ``train/zeroshot.py``: softmax over the "{label}" / "no {label}" prompt embeddings). Pairs come
  from a studies table's reports that the labeler reads F-positive, or from PhantomCXR templates.

Usage::

    from pairaug_ray.train.fidelity import image_generator, physical_fidelity, fidelity_markdown
    gen = image_generator("tiny://sd?size=64&seed=0", steps=10)
    res = physical_fidelity(gen, n=32, seed=0)
    print(fidelity_markdown(res))
    run_fidelity(FidelityConfig(model="runs/t2i/model", vlp="runs/train/vlp/model",
                                studies="runs/ingest", out="runs/fidelity"))   # fidelity.json + .md

A generator is any callable ``generate(prompts: list[str], seeds: list[int]) -> list[np.ndarray]``
(float32 HxW in [0, 1], bright = dense), e.g. ``ImageGenerator(GenerateConfig(...)).generate``.
"""
from __future__ import annotations

import functools
import math
import os
import random
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from pairaug_ray import vocab
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.labeler import NEGATIVE, OBSERVATIONS, POSITIVE, Finding, label_report
from pairaug_ray.llm.rule import phrase
from pairaug_ray.phantom.measure import apical_lucency, basal_opacity, cardiothoracic_ratio, region_mean
from pairaug_ray.phantom.text import _with_no_finding, sample_findings, template_report

Generate = Callable[[list[str], list[int]], list[np.ndarray]]
SIDES = ("left", "right")            # the sides a "with" prompt names (not "bilateral")
SEVERITIES = vocab.SEVERITIES
NO_FINDING = vocab.NO_FINDING
# Findings scored by the classifier check when none are named (the CheXpert-5 classes PhantomCXR
# draws, plus pneumothorax).
CLASSIFIER_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
                       "Pneumothorax")

# ------------------------------------------------------------------------------------------------
# Image probes


def body_midline(img: np.ndarray, y0: float = 0.72, y1: float = 0.9) -> float | None:
    """The patient's midline (normalised x in [0, 1]) from the body outline, or None if not found.

    PhantomCXR draws the body symmetric about the midline ``cx``, which varies by patient
    (``Anatomy.cx`` in [0.485, 0.515]). Per image row between ``y0`` and ``y1`` (lower thorax, where
    the body is narrower than the image) the two body edges are the sub-pixel crossings of half way
    between the background (row ends) and the body (the row's central half); the midline is the
    median of the edge midpoints. Rows without two clear edges (contrast < 0.1, or body touching the
    image border) are skipped: on noise, or an image with no body in it, the result is None.
    Checked on PhantomCXR at 64 px: within 0.006 of ``Anatomy.cx`` over 40 patients, with or without
    effusion, pneumothorax and devices drawn.
    """
    rows, cols = img.shape
    mids = []
    for r in range(int(y0 * rows), int(y1 * rows)):
        row = ndimage.uniform_filter1d(np.asarray(img[r], dtype=np.float64), 3)
        bg = min(row[:2].mean(), row[-2:].mean())
        fg = float(np.median(row[cols // 4: 3 * cols // 4]))
        if fg - bg < 0.1:
            continue
        thr = (bg + fg) / 2
        above = np.flatnonzero(row > thr)
        if above.size == 0 or above[0] == 0 or above[-1] == cols - 1:
            continue
        i, j = int(above[0]), int(above[-1])
        left = i - 1 + (thr - row[i - 1]) / (row[i] - row[i - 1])
        right = j + (row[j] - thr) / (row[j] - row[j + 1])
        mids.append((left + right + 1) / 2 / cols)   # pixel k's centre is at (k + 0.5) / cols
    return float(np.median(mids)) if mids else None


def centre_on_midline(img: np.ndarray) -> np.ndarray:
    """``img`` shifted sideways (linear interpolation) so its ``body_midline`` lands at x = 0.5.

    The side probes (``basal_opacity``, ``apical_lucency``) measure boxes placed about x = 0.5; on
    a patient whose midline sits 0.015 off centre one box takes more chest wall than the other, which
    at 64 px moves left-minus-right apical lucency by about as much as a moderate pneumothorax
    (correlation with ``Anatomy.cx`` -0.88 uncentred, -0.05 centred, measured over 40 patients).
    Unchanged when no midline is found.
    """
    c = body_midline(img)
    if c is None:
        return img
    return ndimage.shift(img, (0.0, (0.5 - c) * img.shape[1]), order=1, mode="nearest")


def perihilar_opacity(img: np.ndarray, side: str | None = None) -> float:
    """Mean intensity of two perihilar boxes (x 0.08-0.2 either side of x = 0.5, y 0.38-0.55).

    Where PhantomCXR draws pulmonary edema's haze (``phantom.render``: a Gaussian about each hilum,
    0.13 from the midline at y ~0.47); built on ``phantom.measure.region_mean``. Expects a
    midline-centred image.
    """
    return (region_mean(img, 0.3, 0.42, 0.38, 0.55) + region_mean(img, 0.58, 0.7, 0.38, 0.55)) / 2


@dataclass(frozen=True)
class Probe:
    """How PhantomCXR measures one finding on an image.

    ``fn(img, side)`` is higher when the finding is drawn (on ``side`` for a sided probe; ``side``
    is None otherwise); ``values`` applies it. ``severities``: the grades the "with" prompts ask for (grades the
    probe cannot see are left out). ``confounders``: other findings the renderer draws inside the
    probe's region; they are left out of the pairs' context (a finding that is merely stated absent
    stays). ``centre``: the image is centred on its body midline before measuring.
    """

    finding: str
    measurement: str
    sided: bool
    severities: tuple[str, ...]
    confounders: tuple[str, ...]
    source: str
    fn: Callable[[np.ndarray, str | None], float]
    centre: bool = False

    def values(self, img: np.ndarray) -> np.ndarray:
        """[1] (unsided) or [left, right] measurements of one image; NaN when the probe fails."""
        img = np.asarray(img, dtype=np.float32)
        if self.centre:
            img = centre_on_midline(img)
        if not self.sided:
            return np.array([self.fn(img, None)], np.float64)
        return np.array([self.fn(img, "left"), self.fn(img, "right")], np.float64)


# Findings the renderer draws in the lungs' lower two thirds / bases / apices (measured: adding each
# one, moderate, to a normal chest moves the probe by more than 0.02 over 10 seeds at 64 px; lung
# lesions land at random places and are left out everywhere).
_LUNG = ("Consolidation", "Pneumonia", "Lung Opacity", "Lung Lesion", "Edema")

PROBES: dict[str, Probe] = {p.finding: p for p in (
    Probe("Cardiomegaly", "cardiothoracic ratio", False, SEVERITIES,
          _LUNG + ("Atelectasis", "Pleural Effusion", "Pleural Other", "Enlarged Cardiomediastinum"),
          "phantom.measure.cardiothoracic_ratio (renderer: CTR 0.55 / 0.59 / 0.65 for mild / moderate "
          "/ severe, 0.42-0.48 normal)",
          lambda img, side: cardiothoracic_ratio(img)),
    Probe("Pleural Effusion", "basal opacity, named side minus other (midline-centred)", True,
          ("moderate", "severe"), _LUNG + ("Atelectasis", "Cardiomegaly"),
          "phantom.measure.basal_opacity (box y 0.6-0.7, 0.2-0.32 from the midline); a small "
          "effusion's meniscus sits below that box, so only moderate and large ones are asked for",
          lambda img, side: basal_opacity(img, side), centre=True),
    Probe("Pneumothorax", "apical lucency, named side minus other (midline-centred)", True,
          ("moderate", "severe"), _LUNG + ("Pleural Other", "Support Devices"),
          "phantom.measure.apical_lucency, negated so that higher = more lucent (box y 0.16-0.36, "
          "0.17-0.33 from the midline); a small pneumothorax moves it by about the spread between "
          "normal patients (0.012 at 64 px), so only moderate and large ones are asked for",
          lambda img, side: -apical_lucency(img, side), centre=True),
    Probe("Edema", "perihilar opacity (midline-centred)", False, SEVERITIES,
          ("Consolidation", "Pneumonia", "Lung Opacity", "Lung Lesion", "Atelectasis", "Pleural Effusion",
           "Cardiomegaly", "Enlarged Cardiomediastinum"),
          "perihilar_opacity (this module, on phantom.measure.region_mean), where the renderer draws "
          "the edema haze",
          perihilar_opacity, centre=True),
)}
# What the physical check measures by default: issue 11's targets.
DEFAULT_PHYSICAL = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax")

# ------------------------------------------------------------------------------------------------
# Prompt pairs


@dataclass(frozen=True)
class Pair:
    """Two prompts that differ only in ``finding``: stated present (``positive``) or absent."""

    finding: str
    positive: str
    negative: str
    seed: int                      # the image seed of both prompts
    side: str | None = None        # the side the positive prompt names ("left" / "right")
    severity: str | None = None


@functools.lru_cache(maxsize=65536)
def _label(text: str) -> dict[str, Finding]:
    """``label_report`` memoised (reports are labeled once per finding and per twin check); the
    returned dict is shared: read it, never change it."""
    return label_report(text)


_SPLIT = re.compile(r"((?<=[.!?])\s+|\n+)")
_HEADER = re.compile(r"^\s*(?:[A-Z][A-Z /]{2,}:\s*)+")   # FINDINGS: / IMPRESSION: (as stages.rewrite)


def negate_finding(report: str, finding: str) -> str:
    """``report`` with ``finding`` stated absent, every other sentence kept as it is.

    In each section (a ``HEADER:`` starts one) the first sentence the labeler finds mentioning
    ``finding`` becomes ``llm.rule.phrase(finding, NEGATIVE)``, the rule rewriter's wording (e.g.
    "No pleural effusion."); later sentences of the same section that mention it are dropped. A
    sentence that also states another finding loses that statement: ``twin_ok`` rejects such pairs.
    """
    if finding not in OBSERVATIONS or finding == NO_FINDING:
        raise ValueError(f"cannot negate {finding!r}; known: {OBSERVATIONS[1:]}")
    negative = phrase(finding, NEGATIVE)
    parts = _SPLIT.split(report or "")
    out: list[str] = []
    said = False
    for k in range(0, len(parts), 2):
        chunk, sep = parts[k], parts[k + 1] if k + 1 < len(parts) else ""
        m = _HEADER.match(chunk)
        header = m.group(0) if m else ""
        body = chunk[len(header):]
        if header:
            said = False
        if body.strip() and finding in _label(body):
            body = "" if said else negative
            said = True
        if header or body:
            out.append(header + body + sep)
    return "".join(out).strip()


def _states(found: dict[str, Finding], leave: str) -> dict[str, int]:
    return {o: f.state for o, f in found.items() if o not in (leave, NO_FINDING)}


def twin_ok(positive: str, negative: str, finding: str, side: str | None = None) -> bool:
    """The labeler reads ``finding`` POSITIVE (on ``side`` when given) in ``positive``, NEGATIVE in
    ``negative``, and every other observation the same in both."""
    p, n = _label(positive), _label(negative)
    fp, fn = p.get(finding), n.get(finding)
    return (fp is not None and fp.state == POSITIVE and (side is None or fp.laterality == side)
            and fn is not None and fn.state == NEGATIVE and _states(p, finding) == _states(n, finding))


def _code(text: str) -> int:
    return zlib.crc32(text.encode())


def phantom_pairs(finding: str, n: int, seed: int = 0, max_context: int = 3,
                  truncate: Callable[[str], str] | None = None, max_tries: int = 50) -> list[Pair]:
    """``n`` PhantomCXR template-report pairs for ``finding`` (deterministic for ``seed``).

    Per pair: a context drawn by ``phantom.text.sample_findings`` (without ``finding``, without the
    probe's confounders when ``finding`` has a probe, at most ``max_context`` other findings,
    positives first), ``finding`` made POSITIVE (side left/right at random when the templates give
    it a side; severity from the probe's ``severities``, else any), written by
    ``phantom.text.template_report``; the twin is ``negate_finding`` of that text. A pair is kept
    when ``twin_ok`` holds on the text the generator sees (``truncate(text)``, e.g.
    ``ImageGenerator.prompt``, which cuts a report to the text encoder's length); else a new context
    is drawn. Raises RuntimeError when ``max_tries`` contexts in a row fail.
    """
    probe = PROBES.get(finding)
    if finding not in OBSERVATIONS or finding == NO_FINDING:
        raise ValueError(f"unknown finding {finding!r}; known: {OBSERVATIONS[1:]}")
    sided = finding in vocab.SIDES
    graded = finding in vocab.GRADED
    severities = probe.severities if probe else SEVERITIES
    leave_out = set(probe.confounders) if probe else set()
    cut = truncate or (lambda s: s)
    pairs = []
    for i in range(n):
        for attempt in range(max_tries):
            rng = np.random.default_rng([seed, _code(finding), i, attempt])
            found = sample_findings(rng)
            ctx = {o: f for o, f in found.items() if o not in (finding, NO_FINDING)
                   and not (o in leave_out and f.state != NEGATIVE)}
            order = sorted(ctx, key=lambda o: (ctx[o].state == NEGATIVE, OBSERVATIONS.index(o)))
            ctx = {o: ctx[o] for o in order[:max_context]}
            side = str(rng.choice(SIDES)) if sided else None
            severity = str(rng.choice(severities)) if graded else None
            positive = template_report(
                _with_no_finding({**ctx, finding: Finding(finding, POSITIVE, side, severity)}), rng)
            negative = negate_finding(positive, finding)
            if twin_ok(cut(positive), cut(negative), finding, side):
                pairs.append(Pair(finding, positive, negative, int(rng.integers(2**31)), side, severity))
                break
        else:
            raise RuntimeError(f"no valid {finding!r} pair in {max_tries} tries (pair {i}, seed {seed})")
    return pairs


def report_pairs(reports: Sequence[str], finding: str, n: int, seed: int = 0,
                 truncate: Callable[[str], str] | None = None) -> tuple[list[Pair], dict[str, int]]:
    """Up to ``n`` pairs from real reports that the labeler reads ``finding``-positive.

    Candidates are the reports with ``finding`` POSITIVE, in a seeded random order (duplicates
    removed); each one's twin is ``negate_finding``. A candidate is skipped when ``twin_ok`` fails
    on the text the generator sees (``truncate``): the finding is cut off, or shares a sentence
    with another finding. Returns (pairs, {"candidates": reports read positive, "skipped": rejected
    before ``n`` pairs were found}). Image seeds are drawn from ``seed``.
    """
    cut = truncate or (lambda s: s)
    candidates = []
    for text in dict.fromkeys(r for r in reports if isinstance(r, str) and r.strip()):
        f = _label(text).get(finding)
        if f is not None and f.state == POSITIVE:
            candidates.append(text)
    random.Random(seed * 1_000_003 + _code(finding)).shuffle(candidates)
    rng = np.random.default_rng([seed, _code(finding)])
    pairs, skipped = [], 0
    for text in candidates:
        if len(pairs) >= n:
            break
        negative = negate_finding(text, finding)
        if not twin_ok(cut(text), cut(negative), finding):
            skipped += 1
            continue
        f = _label(text)[finding]
        pairs.append(Pair(finding, text, negative, int(rng.integers(2**31)),
                          f.laterality if f.laterality in SIDES else None, f.severity))
    return pairs, {"candidates": len(candidates), "skipped": skipped}


def studies_reports(studies: str, storage: StorageConfig | None = None, split: str | None = "test") -> list[str]:
    """The ``report`` texts of an ingest output's studies table (local or ``s3://``), one split.

    ``split``: a split name, a comma-separated list, or None / "all" for every row. Raises
    FileNotFoundError when there is no studies table and ValueError when the split has no reports.
    """
    table = Store(studies, storage).read_table("studies", columns=["report", "split"])
    if table is None:
        raise FileNotFoundError(f"no studies table under {studies}")
    keep = None if split in (None, "", "all") else {s.strip() for s in split.split(",")}
    reports = [r["report"] for r in table.to_pylist()
               if (keep is None or (r["split"] or "") in keep) and r["report"]]
    if not reports:
        raise ValueError(f"no reports in split {split!r} of {studies}")
    return reports


# ------------------------------------------------------------------------------------------------
# Figures


def _impute(x: np.ndarray) -> tuple[np.ndarray, int]:
    """[k, c] measurements with NaN (a probe that failed) set to their column's median over the
    finite values (a tie in the middle; 0.5 if none is finite). Returns (x, rows with a NaN)."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return x, 0
    out = x.copy()
    for j in range(x.shape[1]):
        ok = ~bad[:, j]
        out[bad[:, j], j] = float(np.median(x[ok, j])) if ok.any() else 0.5
    return out, int(bad.any(axis=1).sum())


def _auc(pos: np.ndarray, neg: np.ndarray, strata: np.ndarray | None = None,
         pairs: np.ndarray | None = None) -> float:
    """ROC-AUC (scikit-learn) of pos vs neg scores, where ``pos[s]`` and ``neg[s]`` come from the
    same pair; with ``strata``: the mean over strata of the within-stratum AUC, weighted by pairs.

    ``pairs`` (bootstrap resamples): the original pair of each slot. The AUC compares every "with"
    image with every "without" image, pair i's own two included once; a pair drawn k times would
    bring its own comparison k^2 times instead of k, and since a pair's own two images share the
    seed (they are more alike than two random images) that biases resampled AUCs towards the
    paired win rate (by about (paired_win - AUC) / n). Those extra k^2 - k comparisons are left out.
    """
    from sklearn.metrics import roc_auc_score

    if strata is not None:
        total = weight = 0.0
        for s in np.unique(strata):
            k = strata == s
            total += k.sum() * _auc(pos[k], neg[k], None, None if pairs is None else pairs[k])
            weight += k.sum()
        return total / weight
    m = len(pos)
    auc = float(roc_auc_score(np.r_[np.ones(m), np.zeros(m)], np.r_[pos, neg]))
    if pairs is None:
        return auc
    _, slot, copies = np.unique(pairs, return_inverse=True, return_counts=True)
    own = (pos > neg) + 0.5 * (pos == neg)             # each slot's comparison with its own twin
    extra = float(np.sum(copies * copies) - m)         # sum over pairs of k^2 - k
    if extra == 0:
        return auc
    return float((auc * m * m - np.sum((copies[slot] - 1) * own)) / (m * m - extra))


def paired_auc(pos: np.ndarray, neg: np.ndarray, strata: Sequence | None = None,
               score: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
               bootstrap: int = 200, seed: int = 0, alpha: float = 0.05) -> dict:
    """ROC-AUC of paired scores (``pos[i]``, ``neg[i]`` from pair i) with a pair bootstrap CI.

    ``score(pos, neg, idx)`` optionally turns the measurements of the pairs ``idx`` into the scores
    whose AUC is taken (recomputed in each resample; e.g. a baseline taken from the negatives).
    ``strata`` (one label per pair): the AUC is side-stratified (``_auc``). The CI is the percentile
    bootstrap over pairs (``bootstrap`` resamples from ``numpy.random.default_rng(seed)``; 0 = no CI;
    a resampled pair's copies are not compared with each other, see ``_auc``).
    Returns {"auc", "ci_low", "ci_high", "n", "paired_win"}: paired_win = the share of pairs whose
    positive scores above its negative (ties count half), a per-pair reading of the same question.
    """
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(f"{len(pos)} positive but {len(neg)} negative measurements")
    n = int(pos.shape[0])
    res = {"auc": None, "ci_low": None, "ci_high": None, "n": n, "paired_win": None}
    if n == 0:
        return res
    st = None if strata is None else np.asarray(list(strata))
    score = score or (lambda p, q, idx: (p[idx], q[idx]))

    def figure(idx: np.ndarray) -> float:
        a, b = score(pos, neg, idx)
        return _auc(a, b, None if st is None else st[idx], idx)

    full = np.arange(n)
    a, b = score(pos, neg, full)
    res["auc"] = figure(full)
    res["paired_win"] = float(np.mean((a > b) + 0.5 * (a == b)))
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        stats = [figure(rng.integers(0, n, n)) for _ in range(bootstrap)]
        res["ci_low"] = float(np.quantile(stats, alpha / 2))
        res["ci_high"] = float(np.quantile(stats, 1 - alpha / 2))
    return res


def _side_scores(sides: np.ndarray) -> Callable:
    sign = np.where(sides == "left", 1.0, -1.0)

    def score(p, q, idx):   # p, q: [n, 2] (left, right)
        return sign[idx] * (p[idx, 0] - p[idx, 1]), sign[idx] * (q[idx, 0] - q[idx, 1])
    return score


def _present_scores(p, q, idx):
    """abs(left - right - baseline), baseline = median asymmetry of the negated twins (the generator's
    own normal chest is not symmetric in these boxes: left - right apical lucency is about -0.02
    on PhantomCXR), so the figure does not care which side the finding was drawn on."""
    dp, dq = p[idx, 0] - p[idx, 1], q[idx, 0] - q[idx, 1]
    base = float(np.median(dq))
    return np.abs(dp - base), np.abs(dq - base)


# ------------------------------------------------------------------------------------------------
# Running a generator over pairs


def _resize(img: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or img.shape == (size, size):
        return img
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0].numpy()


def _generate_pairs(generate: Generate, pairs: Sequence[Pair], batch_size: int,
                    measure: Callable[[list[np.ndarray]], np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw both prompts of every pair (a batch holds ``batch_size // 2`` pairs, positives then
    negatives, the pair's seed for both) and keep only ``measure``'s [k, ...] rows per batch.
    Returns (positive rows, negative rows, images drawn)."""
    per = max(1, batch_size // 2)
    pos_rows, neg_rows = [], []
    for start in range(0, len(pairs), per):
        chunk = pairs[start:start + per]
        prompts = [p.positive for p in chunk] + [p.negative for p in chunk]
        seeds = [p.seed for p in chunk] * 2
        images = generate(prompts, seeds)
        if len(images) != len(prompts):
            raise ValueError(f"generator returned {len(images)} images for {len(prompts)} prompts")
        rows = measure([np.asarray(im, dtype=np.float32) for im in images])
        pos_rows.append(rows[:len(chunk)])
        neg_rows.append(rows[len(chunk):])
    if not pos_rows:
        return np.zeros((0, 1)), np.zeros((0, 1)), 0
    return np.concatenate(pos_rows), np.concatenate(neg_rows), 2 * len(pairs)


def physical_fidelity(generate: Generate, n: int = 32, seed: int = 0, size: int | None = None,
                      findings: Sequence[str] | None = None, bootstrap: int = 200, batch_size: int = 16,
                      truncate: Callable[[str], str] | None = None, max_context: int = 3) -> dict:
    """Physical fidelity on PhantomCXR: per finding (default ``DEFAULT_PHYSICAL``; any key of
    ``PROBES``), the probe's ROC-AUC between the images drawn with and without the finding (``n``
    PhantomCXR pairs, ``phantom_pairs``).

    ``size``: images are resized to ``size`` x ``size`` before measuring (None = as drawn).
    Rows (one per finding and figure): {"finding", "kind": "physical", "figure", "auc", "ci_low",
    "ci_high", "n", "paired_win", "n_failed", "mean_with", "mean_without", "measurement", "source"}.
    Unsided findings have figure "present"; sided ones "side" (named side minus the other side,
    AUC stratified by the named side: a wrong-side generator scores near 0) and "present"
    (asymmetry either way). ``n_failed``: images the probe could not measure (NaN, e.g. no heart
    border found; they tie at the median). Raises KeyError for a finding without a probe.
    """
    findings = list(findings or DEFAULT_PHYSICAL)
    for f in findings:
        if f not in PROBES:
            raise KeyError(f"no PhantomCXR probe for {f!r}; measurable: {sorted(PROBES)}")
    rows, examples, images, t0 = [], {}, 0, time.perf_counter()
    for k, finding in enumerate(findings):
        probe = PROBES[finding]
        pairs = phantom_pairs(finding, n, seed, max_context=max_context, truncate=truncate)
        examples[finding] = {"positive": pairs[0].positive, "negative": pairs[0].negative} if pairs else {}
        p, q, drawn = _generate_pairs(
            generate, pairs, batch_size,
            lambda ims, probe=probe: np.stack([probe.values(_resize(im, size)) for im in ims]))
        images += drawn
        both, failed = _impute(np.concatenate([p, q]))
        p, q = both[:len(p)], both[len(p):]
        base = {"finding": finding, "kind": "physical", "n_failed": failed, "source": probe.source}
        bseed = seed * 1000 + k
        if not probe.sided:
            r = paired_auc(p[:, 0], q[:, 0], bootstrap=bootstrap, seed=bseed)
            rows.append({**base, "figure": "present", **r, "measurement": probe.measurement,
                         "mean_with": float(p[:, 0].mean()), "mean_without": float(q[:, 0].mean())})
            continue
        sides = np.array([pr.side for pr in pairs])
        side_score = _side_scores(sides)
        r = paired_auc(p, q, strata=sides, score=side_score, bootstrap=bootstrap, seed=bseed)
        a, b = side_score(p, q, np.arange(len(p)))
        rows.append({**base, "figure": "side", **r, "measurement": probe.measurement,
                     "mean_with": float(a.mean()), "mean_without": float(b.mean())})
        r = paired_auc(p, q, score=_present_scores, bootstrap=bootstrap, seed=bseed)
        a, b = _present_scores(p, q, np.arange(len(p)))
        rows.append({**base, "figure": "present", **r,
                     "measurement": probe.measurement.split(",")[0] + ", abs(left - right - normal asymmetry)",
                     "mean_with": float(a.mean()), "mean_without": float(b.mean())})
    return {"kind": "physical", "n_pairs": n, "seed": seed, "bootstrap": bootstrap, "rows": rows,
            "examples": examples, "images": images, "seconds": round(time.perf_counter() - t0, 2)}


def classifier_fidelity(generate: Generate, vlp: Any, reports: Sequence[str] | None = None,
                        findings: Sequence[str] | None = None, n: int = 32, seed: int = 0,
                        bootstrap: int = 200, batch_size: int = 16,
                        templates: Sequence[tuple[str, str]] | None = None,
                        truncate: Callable[[str], str] | None = None, min_pairs: int = 5,
                        max_context: int = 3) -> dict:
    """Classifier fidelity: per finding, the ROC-AUC of a VLP's zero-shot probability of the
    finding between images drawn with and without it.

    ``vlp``: a ``load_vlp`` URI (saved folder or ``tiny://vlp?...``) or a loaded ``VLPModel``.
    The score is ``train.zeroshot.zeroshot_scores`` (softmax over image . "{label}" vs image .
    "no {label}" embeddings, ``templates`` as in zeroshot; CheXzero). Pairs: from ``reports`` (real
    reports, ``report_pairs``) when given, else PhantomCXR templates (``phantom_pairs``). A finding
    with fewer than ``min_pairs`` pairs gets a row with auc None. Rows as ``physical_fidelity``'s,
    kind "classifier", figure "present", plus "candidates" / "skipped" for report pairs.
    """
    import torch

    from pairaug_ray.models.vlp import load_vlp
    from pairaug_ray.train.zeroshot import encode_images, prompt_embeddings, zeroshot_scores

    model = load_vlp(vlp) if isinstance(vlp, (str, os.PathLike)) else vlp
    model.eval()
    findings = list(findings or CLASSIFIER_FINDINGS)
    pos_emb, neg_emb = prompt_embeddings(model, findings, templates)
    measure_name = "zero-shot P(finding) of the VLP ('{label}' vs 'no {label}', CheXzero)"
    rows, examples, images, t0 = [], {}, 0, time.perf_counter()
    for k, finding in enumerate(findings):
        extra: dict[str, int] = {}
        if reports is not None:
            pairs, extra = report_pairs(reports, finding, n, seed, truncate=truncate)
        else:
            pairs = phantom_pairs(finding, n, seed, max_context=max_context, truncate=truncate)
        base = {"finding": finding, "kind": "classifier", "figure": "present", "measurement": measure_name,
                "source": "train.zeroshot (CheXzero protocol)", **extra}
        if len(pairs) < min_pairs:
            rows.append({**base, "auc": None, "ci_low": None, "ci_high": None, "n": len(pairs),
                         "paired_win": None, "n_failed": 0, "mean_with": None, "mean_without": None})
            continue
        examples[finding] = {"positive": pairs[0].positive, "negative": pairs[0].negative}

        def measure(ims: list[np.ndarray], j=k) -> np.ndarray:
            emb = encode_images(model, np.stack(ims).astype(np.float32))
            with torch.no_grad():
                return zeroshot_scores(emb, pos_emb[j:j + 1], neg_emb[j:j + 1])

        p, q, drawn = _generate_pairs(generate, pairs, batch_size, measure)
        images += drawn
        r = paired_auc(p[:, 0], q[:, 0], bootstrap=bootstrap, seed=seed * 1000 + 100 + k)
        rows.append({**base, **r, "n_failed": 0, "mean_with": float(p.mean()), "mean_without": float(q.mean())})
    return {"kind": "classifier", "vlp": str(vlp) if isinstance(vlp, (str, os.PathLike)) else "in-memory model",
            "prompts": "reports" if reports is not None else "phantom templates", "n_pairs": n, "seed": seed,
            "bootstrap": bootstrap, "rows": rows, "examples": examples, "images": images,
            "seconds": round(time.perf_counter() - t0, 2)}


def kept_pair_fidelity(pairs, vlp: Any, findings: Sequence[str] | None = None,
                       branches: Sequence[str] = ("inter", "intra"), max_pairs: int = 512, seed: int = 0,
                       bootstrap: int = 200, min_each: int = 3, batch_size: int = 64) -> dict:
    """Classifier fidelity of an augment run's kept pairs: does each kept image show what its
    (rewritten) report says, as the VLP reads it?

    ``pairs``: a ``pyarrow.Table`` (or DataFrame) of the pairs table with ``branch``, ``image_png``
    and ``labels`` (the labeler's ``{observation: state}`` JSON of ``rewritten_report``); ``vlp``: a
    ``load_vlp`` URI or a loaded ``VLPModel``. Per branch, at most ``max_pairs`` rows (a seeded
    sample) are scored with ``train.zeroshot.zeroshot_scores`` (P(finding), CheXzero prompts).
    Per branch and finding: ROC-AUC of that probability between the pairs whose report states
    the finding (state 1) and the pairs whose report negates it or does not mention it (uncertain
    ones left out), with a percentile bootstrap CI over rows (``bootstrap`` resamples; resamples
    with one class are skipped). 1.0 = the images show the finding exactly where their reports
    state it; 0.5 = no relation (or a scorer that cannot see it). Unlike ``classifier_fidelity``
    this is not a paired design: the kept images are what it measures. A finding with fewer than
    ``min_each`` rows on either side gets ``auc`` None.

    Returns {"vlp", "measurement", "max_pairs", "branches": {branch: {"n_scored", "rows": [...]}}},
    rows {"finding", "auc", "ci_low", "ci_high", "n_with", "n_without", "mean_with", "mean_without"}.
    """
    import json

    import torch

    from pairaug_ray.io.dicom import decode_png
    from pairaug_ray.models.vlp import load_vlp
    from pairaug_ray.train.zeroshot import auc_with_ci, encode_images, prompt_embeddings, zeroshot_scores

    df = pairs.to_pandas() if hasattr(pairs, "to_pandas") else pairs
    findings = list(findings or CLASSIFIER_FINDINGS)
    out: dict[str, Any] = {"vlp": str(vlp) if isinstance(vlp, (str, os.PathLike)) else "in-memory model",
                           "measurement": "zero-shot P(finding) of the VLP ('{label}' vs 'no {label}', "
                           "CheXzero) of kept images: report states it vs negates or omits it",
                           "max_pairs": max_pairs, "branches": {}}
    todo = {b: df[df["branch"] == b] for b in branches}
    todo = {b: d for b, d in todo.items() if len(d)}
    if not todo:
        return out
    model = load_vlp(vlp) if isinstance(vlp, (str, os.PathLike)) else vlp
    model.eval()
    pos_emb, neg_emb = prompt_embeddings(model, findings)
    rng = np.random.default_rng(seed)
    for branch, d in todo.items():
        if len(d) > max_pairs:
            d = d.iloc[np.sort(rng.choice(len(d), max_pairs, replace=False))]
        images = [decode_png(b) for b in d["image_png"]]
        size = min(im.shape[0] for im in images)
        images = np.stack([_resize(im, size) for im in images]).astype(np.float32)
        with torch.no_grad():
            probs = zeroshot_scores(encode_images(model, images, batch_size), pos_emb, neg_emb)
        states = [json.loads(x) if isinstance(x, str) and x else {} for x in d["labels"]]
        rows = []
        for k, finding in enumerate(findings):
            st = np.array([s.get(finding, NEGATIVE) for s in states], dtype=float)
            with_, without = probs[st == POSITIVE, k], probs[st == NEGATIVE, k]   # absent counts as negated
            row = {"finding": finding, "auc": None, "ci_low": None, "ci_high": None,
                   "n_with": int(len(with_)), "n_without": int(len(without)),
                   "mean_with": float(with_.mean()) if len(with_) else None,
                   "mean_without": float(without.mean()) if len(without) else None}
            if len(with_) >= min_each and len(without) >= min_each:
                r = auc_with_ci(np.r_[np.ones(len(with_)), np.zeros(len(without))], np.r_[with_, without],
                                bootstrap=bootstrap, seed=seed + k)
                row.update(auc=r["auc"], ci_low=r["ci_low"], ci_high=r["ci_high"])
            rows.append(row)
        out["branches"][branch] = {"n_scored": int(len(d)), "rows": rows}
    return out


def kept_fidelity_markdown(result: dict) -> str:
    """The table of a ``kept_pair_fidelity`` result: one row per branch and finding with an AUC."""
    lines = ["| Branch | Finding | AUC | 95% CI | Stated | Negated / omitted |", "|---|---|---|---|---|---|"]
    for branch, b in (result.get("branches") or {}).items():
        for r in b["rows"]:
            if r["auc"] is None:
                continue
            ci = "n/a" if r["ci_low"] is None else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            lines.append(f"| {branch} | {r['finding']} | {r['auc']:.3f} | {ci} | {r['n_with']} | {r['n_without']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Generator, config, job


def _load_generator(model: str, steps: int, guidance_scale: float, image_size: int | None, device: str,
                    dtype: str):
    import torch

    from pairaug_ray.stages.generate import GenerateConfig, ImageGenerator

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ImageGenerator(GenerateConfig(model=model, steps=steps, guidance_scale=guidance_scale,
                                         image_size=image_size, device=device, dtype=dtype))


def image_generator(model: str, steps: int = 50, guidance_scale: float = 4.0, image_size: int | None = None,
                    device: str = "auto", dtype: str = "auto") -> Generate:
    """``ImageGenerator(GenerateConfig(...)).generate`` for ``model`` (``tiny://sd?...``, a diffusers
    folder or a hub id; ``models.diffusion.load_sd_pipeline`` errors for a missing or broken one), on
    ``device`` ("auto" = cuda when available, else cpu). The bound method's ``__self__.prompt`` is
    the truncation the pipeline applies to a report (pass it as ``truncate=``)."""
    return _load_generator(model, steps, guidance_scale, image_size, device, dtype).generate


class FidelityConfig(BaseModel):
    """`pairaug fidelity` settings (a PairAugConfig ``fidelity:`` section)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("pairaug_out/t2i/model",
                       description="text-to-image generator: diffusers folder, hub id or tiny://sd?...")
    studies: str | None = Field(None, description="ingest output folder (local or s3://) whose studies "
                                "reports prompt the classifier check; None = PhantomCXR template reports")
    split: str | None = Field("test", description="studies split(s) for the prompts, comma-separated; "
                              "'all' = every row")
    vlp: str | None = Field(None, description="trained VLP (folder or tiny://vlp?...) for the classifier "
                            "check; None = no classifier check")
    out: str = Field("pairaug_out/fidelity", description="folder (local or s3://) for fidelity.json and "
                     "fidelity.md")
    physical: bool = Field(True, description="run the PhantomCXR probe check (meaningful for a generator "
                           "trained on PhantomCXR)")
    findings: list[str] | None = Field(None, description="findings of the physical check; None = "
                                       + ", ".join(DEFAULT_PHYSICAL) + "; also measurable: Edema")
    classifier_findings: list[str] | None = Field(None, description="findings of the classifier check; "
                                                  "None = " + ", ".join(CLASSIFIER_FINDINGS))
    n_pairs: int = Field(32, ge=2, description="prompt pairs per finding (each pair = 2 images)")
    steps: int = Field(50, ge=1, description="sampler steps per image")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance scale")
    image_size: int | None = Field(None, ge=8, description="pixels drawn; None = the model's native size")
    measure_size: int | None = Field(None, ge=16, description="resize to this before the PhantomCXR probes; "
                                     "None = as drawn")
    batch_size: int = Field(16, ge=2, description="images per generator call (half a batch of pairs)")
    seed: int = Field(0, ge=0, description="seeds pairs, image seeds and bootstrap")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples of pairs for the 95% CI (0 = none)")
    max_context: int = Field(3, ge=0, description="other findings stated in a PhantomCXR prompt (keeps "
                             "prompts inside the text encoder's length)")
    min_pairs: int = Field(5, ge=2, description="fewer report pairs than this: the finding has no AUC")
    templates: str | None = Field(None, description="zero-shot prompt templates 'pos {}|neg {};...' or "
                                  "'ensemble'; None = '{}|no {}'")
    device: str = Field("auto", description="auto (cuda when available) | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (float16 on cuda, float32 on cpu) | float32 | bfloat16 | float16")


def run_fidelity(cfg: FidelityConfig, storage: StorageConfig | None = None,
                 generate: Generate | None = None) -> dict:
    """Both checks as configured; writes ``fidelity.json`` (every number) and ``fidelity.md`` (the
    table) under ``cfg.out`` (local or ``s3://``, through ``io.store.Store``). ``generate`` overrides
    the generator built from ``cfg.model``. Returns the result dict ({"model", "config", "rows",
    "physical", "classifier"}). Settings, findings and the studies table are checked before the
    generator loads: ValueError / KeyError / FileNotFoundError name the problem."""
    from pairaug_ray.train.zeroshot import parse_templates

    if not cfg.physical and not cfg.vlp:
        raise ValueError("nothing to measure: physical is off and no vlp is given")
    # Check what can be checked before loading the generator.
    for f in cfg.findings or ():
        if f not in PROBES:
            raise KeyError(f"no PhantomCXR probe for {f!r}; measurable: {sorted(PROBES)}")
    for f in cfg.classifier_findings or ():
        if f not in OBSERVATIONS or f == NO_FINDING:
            raise ValueError(f"unknown finding {f!r}; known: {OBSERVATIONS[1:]}")
    templates = parse_templates(cfg.templates)
    reports = studies_reports(cfg.studies, storage, cfg.split) if cfg.vlp and cfg.studies else None
    truncate = None
    if generate is None:
        gen = _load_generator(cfg.model, cfg.steps, cfg.guidance_scale, cfg.image_size, cfg.device, cfg.dtype)
        generate, truncate = gen.generate, gen.prompt
    result: dict[str, Any] = {"model": cfg.model, "config": cfg.model_dump(), "rows": [],
                              "physical": None, "classifier": None}
    if cfg.physical:
        result["physical"] = physical_fidelity(
            generate, n=cfg.n_pairs, seed=cfg.seed, size=cfg.measure_size, findings=cfg.findings,
            bootstrap=cfg.bootstrap, batch_size=cfg.batch_size, truncate=truncate, max_context=cfg.max_context)
        result["rows"] += result["physical"]["rows"]
    if cfg.vlp:
        result["classifier"] = classifier_fidelity(
            generate, cfg.vlp, reports=reports, findings=cfg.classifier_findings, n=cfg.n_pairs,
            seed=cfg.seed, bootstrap=cfg.bootstrap, batch_size=cfg.batch_size,
            templates=templates, truncate=truncate, min_pairs=cfg.min_pairs,
            max_context=cfg.max_context)
        result["rows"] += result["classifier"]["rows"]
    store = Store(cfg.out, storage)
    store.write_json("fidelity.json", result)
    store.write_bytes("fidelity.md", fidelity_markdown(result).encode())
    return result


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fidelity_markdown(result: dict) -> str:
    """The per-finding table of a ``physical_fidelity`` / ``classifier_fidelity`` / ``run_fidelity``
    result: finding, kind, figure, AUC, 95% CI, pairs, paired win rate, measurement."""
    lines = []
    if result.get("model"):
        lines += [f"Generator: `{result['model']}`", ""]
    lines += ["| Finding | Kind | Figure | AUC | 95% CI | N pairs | Paired win | Measurement |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result.get("rows", []):
        ci = "n/a" if r.get("ci_low") is None else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        lines.append(f"| {r['finding']} | {r['kind']} | {r['figure']} | {_fmt(r.get('auc'))} | {ci} | {r['n']} "
                     f"| {_fmt(r.get('paired_win'), 2)} | {r['measurement']} |")
    lines += ["", ("AUC: ROC-AUC of the score between images drawn from reports stating the finding and "
                   "from the same reports with it negated (same seed per pair); 1.0 = drawn where asked, "
                   "0.5 = prompt ignored. CI: percentile bootstrap over pairs. Paired win: share of pairs "
                   "whose 'with' image scores higher. Side: named side minus the other, stratified by side "
                   "(a wrong-side generator scores near 0).")]
    return "\n".join(lines) + "\n"


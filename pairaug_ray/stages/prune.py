"""Prune scored candidates (after stages/score.py) with the paper's two rules.

- InterAug: keep iff ``score_align > inter_threshold`` (cosine scale, paper: 0.3).
- IntraAug: keep iff each of ``score_align``, ``score_delta``, ``score_img`` exceeds its mean over
  ALL IntraAug candidates minus ``intra_margin`` (paper: 0.003). The means are global, so pruning
  is two passes over the persisted candidate table: pass 1 = a streaming reduction (per-block sums
  and counts, combined on the driver; only the branch/status/score columns are read), pass 2 = a
  stateless ``map_batches``.
  Per-batch means would make a pair's fate depend on which batch it landed in.

Every row comes out with ``kept`` (bool) and ``prune_reason``: "" when kept; otherwise what failed,
with the numbers: "score_align 0.120 ≤ threshold 0.300" (InterAug), "score_delta 0.0102 ≤ mean −
margin 0.0150; score_img 0.7710 ≤ mean − margin 0.7800" (IntraAug: each failed score), "missing
score_delta", "error row", "unknown branch 'x'". ``reason_kind`` drops the numbers, to count reasons.
Rows of another branch or error rows are not kept.

Usage:
    cands = ray.data.read_parquet(".../candidates")          # the persisted scored table
    pruned, means = prune_dataset(cands, PruneConfig(inter_threshold=0.3))
    # or, on a pyarrow Table / pandas DataFrame:
    means = intra_means(table); frame = apply_prune(table.to_pandas(), means, PruneConfig())
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from pairaug_ray.vocab import INTRA, SCORE_COLUMNS, normalize_branches


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inter_threshold: float = 0.3     # cosine(new image, new text) must exceed this
    intra_margin: float = 0.003      # each IntraAug score must exceed its global mean minus this


def inter_keep(score_align, threshold: float):
    """InterAug rule; scalar or array in, bool or bool array out (NaN → False)."""
    result = np.asarray(score_align, dtype=np.float64) > threshold
    return bool(result) if result.ndim == 0 else result


def intra_keep(scores: dict[str, Any], means: dict[str, float], margin: float = 0.003):
    """IntraAug rule: all three scores > mean - margin. Values scalar or arrays (NaN → False)."""
    keep = None
    for col in SCORE_COLUMNS:
        ok = np.asarray(scores[col], dtype=np.float64) > means[col] - margin
        keep = ok if keep is None else keep & ok
    return bool(keep) if keep.ndim == 0 else keep


def _intra_score_table(table: pa.Table) -> pa.Table:
    """The IntraAug, non-error rows of `table`, score columns only, NaN turned into null."""
    branch = pc.utf8_lower(pc.fill_null(table["branch"].cast(pa.string()), ""))
    mask = pc.starts_with(branch, INTRA)  # normalize_branch, in Arrow
    if "status" in table.column_names:
        mask = pc.and_(mask, pc.not_equal(pc.fill_null(table["status"].cast(pa.string()), ""), "error"))
    selected = table.filter(mask)
    columns = {}
    for col in SCORE_COLUMNS:
        values = selected[col].cast(pa.float64()) if col in selected.column_names \
            else pa.nulls(selected.num_rows, pa.float64())
        columns[col] = pc.if_else(pc.is_nan(values), pa.scalar(None, pa.float64()), values)
    return pa.table(columns)


def _means_from_scores(scores: pa.Table) -> dict[str, Any]:
    out: dict[str, Any] = {col: (pc.mean(scores[col]).as_py() if scores.num_rows else None)
                           for col in SCORE_COLUMNS}
    out["count"] = scores.num_rows
    return out


def intra_means(data) -> dict[str, Any]:
    """Global means of the three scores over all IntraAug, non-error candidates.

    `data` = a Ray Dataset (streaming reduction; no row is materialised), a pyarrow Table or a
    pandas DataFrame. Returns {"score_align": m, "score_delta": m, "score_img": m, "count": n};
    means are None when there is no IntraAug candidate. Nulls/NaNs are ignored per column.
    """
    if isinstance(data, pd.DataFrame):
        data = pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, pa.Table):
        return _means_from_scores(_intra_score_table(data))

    present = set(data.columns())
    wanted = [c for c in ("branch", "status", *SCORE_COLUMNS) if c in present]
    # One partial (sum, count) row per block, combined here: a streaming two-level reduction
    # without the hash-shuffle actors of Dataset.aggregate (seconds of start-up on small data).
    partials = data.select_columns(wanted).map_batches(
        _partial_sums, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    totals = {k: 0.0 for k in _PARTIAL_COLUMNS}
    for batch in partials.iter_batches(batch_size=None, batch_format="numpy"):
        for k in _PARTIAL_COLUMNS:
            totals[k] += float(np.sum(batch[k]))
    out: dict[str, Any] = {col: (totals[f"sum_{col}"] / totals[f"n_{col}"] if totals[f"n_{col}"] else None)
                           for col in SCORE_COLUMNS}
    out["count"] = int(totals["rows"])
    return out


_PARTIAL_COLUMNS = ("rows", *(f"sum_{c}" for c in SCORE_COLUMNS), *(f"n_{c}" for c in SCORE_COLUMNS))


def _partial_sums(table: pa.Table) -> pa.Table:
    scores = _intra_score_table(table)
    row = {"rows": [float(scores.num_rows)]}
    for col in SCORE_COLUMNS:
        row[f"sum_{col}"] = [float(pc.sum(scores[col]).as_py() or 0.0)]
        row[f"n_{col}"] = [float(pc.count(scores[col]).as_py())]
    return pa.table(row)


def apply_prune(batch, means: dict[str, Any] | None, cfg: PruneConfig):
    """Add "kept" and "prune_reason" to a pandas DataFrame or a dict of arrays (same type back)."""
    as_dict = not isinstance(batch, pd.DataFrame)
    frame = pd.DataFrame(batch) if as_dict else batch.copy()
    n = len(frame)
    kind = normalize_branches(frame["branch"]) if "branch" in frame else np.full(n, "", dtype=object)
    scores = {col: (pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64)
                    if col in frame else np.full(n, np.nan)) for col in SCORE_COLUMNS}
    is_error = (frame["status"].astype(str) == "error").to_numpy() if "status" in frame \
        else np.zeros(n, bool)

    inter = (kind == "inter") & ~is_error
    intra = (kind == "intra") & ~is_error
    missing_inter = inter & np.isnan(scores["score_align"])
    missing_intra = intra & np.logical_or.reduce([np.isnan(scores[c]) for c in SCORE_COLUMNS])
    scored_intra = intra & ~missing_intra
    if scored_intra.any() and (means is None or any(means.get(c) is None for c in SCORE_COLUMNS)):
        raise ValueError("IntraAug rows need the global means from intra_means()")

    reasons = np.full(n, "", dtype=object)
    raw_branch = frame["branch"].to_numpy() if "branch" in frame else np.full(n, None, dtype=object)
    for i in np.flatnonzero(~inter & ~intra):
        reasons[i] = f"unknown branch {raw_branch[i]!r}"
    reasons[is_error] = "error row"
    for i in np.flatnonzero(missing_inter):
        reasons[i] = "missing score_align"
    for i in np.flatnonzero(missing_intra):
        reasons[i] = "missing " + ", ".join(c for c in SCORE_COLUMNS if np.isnan(scores[c][i]))
    inter_ok = inter & ~missing_inter & inter_keep(scores["score_align"], cfg.inter_threshold)
    for i in np.flatnonzero(inter & ~missing_inter & ~inter_ok):  # only the pruned rows get a reason
        reasons[i] = f"score_align {scores['score_align'][i]:.3f} ≤ threshold {cfg.inter_threshold:.3f}"
    intra_ok = np.zeros(n, dtype=bool)
    if scored_intra.any():
        intra_ok = scored_intra & intra_keep(scores, means, cfg.intra_margin)
        for i in np.flatnonzero(scored_intra & ~intra_ok):
            reasons[i] = "; ".join(f"{c} {scores[c][i]:.4f} ≤ mean − margin {means[c] - cfg.intra_margin:.4f}"
                                   for c in SCORE_COLUMNS if not scores[c][i] > means[c] - cfg.intra_margin)
    kept = inter_ok | intra_ok
    frame["kept"] = kept
    frame["prune_reason"] = reasons.astype(str)
    if as_dict:
        return {col: frame[col].to_numpy() for col in frame.columns}
    return frame


_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?(?:e-?\d+)?")


def reason_kind(reason: str) -> str:
    """A prune reason without its numbers ("score_align ≤ threshold"), to count reasons."""
    return _NUMBER.sub("", str(reason or "")).strip()


def prune_dataset(ds, cfg: PruneConfig):
    """Two passes over a Ray Dataset: global IntraAug means, then `apply_prune` per batch.

    `ds` should read the persisted candidate table (e.g. `ray.data.read_parquet`): each pass
    re-executes the dataset's plan. Returns (pruned dataset, means).
    """
    means = intra_means(ds)
    pruned = ds.map_batches(apply_prune, fn_kwargs={"means": means, "cfg": cfg},
                            batch_format="pandas")
    return pruned, means

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

import logging
import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray.vocab import INTRA, SCORE_COLUMNS, normalize_branches

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- streaming prune
#
# The job's pruning pass over a persisted candidate table, shard by shard, with nothing on the driver
# that grows with the number of candidates but the list of shard names:
#   pass 1: per-shard partial sums of the IntraAug scores (score columns only) -> global means;
#   pass 2: per shard, apply_prune with the means (all that is shipped), the kept rows written to
#           pairs/<the candidate shard's file name>; only counts come back.
# A pairs shard is a function of its candidate shard and the means, so pass 2 rewrites it in place
# when the means change (a resumed run added candidates), removes it when nothing of its shard is
# kept any more, and removes pairs shards of no candidate shard (an older layout): the pairs table
# is always exactly the kept candidates under the current means. ``PRUNE_STATE_FILE`` records the
# candidate shards, rules, means and counts of the last complete pass, so a re-run of a finished
# job skips both passes.

PRUNE_STATE_FILE = "prune_state.json"
_SCORE_READ = ("branch", "status", *SCORE_COLUMNS)


class StreamPruneConfig(BaseModel):
    """Where the streaming prune runs (not part of the rules: changing it changes no output)."""

    model_config = ConfigDict(extra="forbid")

    ray_min_shards: int = Field(32, ge=1, description="from this many candidate shards on, both passes "
                                "run as Ray tasks; fewer: in the driver process, a shard at a time")
    shards_per_task: int = Field(16, ge=1, description="candidate shards per Ray task")
    num_cpus: float = Field(0.25, gt=0, description="CPUs each pruning task reserves")
    max_in_flight: int = Field(8, ge=1, description="pruning tasks submitted at once (bounds what "
                               "the driver holds)")


def _read_shard(store, rel: str, columns=None) -> pa.Table:
    """One Parquet shard of ``store`` (``rel`` under its root); ``columns`` that the shard lacks
    are left out (the candidate table has no ``status`` column: only good rows are written)."""
    import pyarrow.parquet as pq

    with store._errors("reading", rel), store.fs.open(store.path(rel), "rb") as f:
        shard = pq.ParquetFile(f)
        if columns is None:
            return shard.read()
        present = set(shard.schema_arrow.names)
        return shard.read(columns=[c for c in columns if c in present])


def shard_partials(store_uri: str, storage, table_dir: str, names: list[str]) -> dict[str, float]:
    """Partial sums of the IntraAug scores over some shards of ``table_dir``: ``{"rows": n,
    "sum_<score>": s, "n_<score>": k}`` (``_PARTIAL_COLUMNS``; NaN/null scores and error rows left
    out). Reads only the branch, status and score columns. Runs in a Ray task or in-process."""
    from pairaug_ray.io.store import Store

    store = Store(store_uri, storage)
    totals = dict.fromkeys(_PARTIAL_COLUMNS, 0.0)
    for name in names:
        part = _partial_sums(_read_shard(store, f"{table_dir}/{name}", _SCORE_READ))
        for k in _PARTIAL_COLUMNS:
            totals[k] += float(part[k][0].as_py())
    return totals


def means_from_partials(partials) -> dict[str, Any]:
    """Global means (``intra_means``' shape: the three scores, None without IntraAug rows, and
    ``count``) from an iterable of ``shard_partials`` results."""
    totals = dict.fromkeys(_PARTIAL_COLUMNS, 0.0)
    for part in partials:
        for k in _PARTIAL_COLUMNS:
            totals[k] += float(part[k])
    out: dict[str, Any] = {col: (totals[f"sum_{col}"] / totals[f"n_{col}"] if totals[f"n_{col}"] else None)
                           for col in SCORE_COLUMNS}
    out["count"] = int(totals["rows"])
    return out


def prune_shards(store_uri: str, storage, candidates_dir: str, pairs_dir: str, names: list[str],
                 means: dict[str, Any], cfg: dict) -> dict:
    """Pass 2 over some candidate shards: ``apply_prune`` with the global ``means`` and the rules
    ``cfg`` (a ``PruneConfig`` dump); the kept rows (``kept`` = True, ``prune_reason`` = "") go to
    ``pairs_dir/<same file name>`` (atomic write; an existing one is replaced, or removed when no
    row is kept). Returns counts only: ``{"branches": {branch: {"candidates", "kept"}},
    "reasons": {reason_kind: n}, "kept": n}``. Runs in a Ray task or in-process."""
    from pairaug_ray.io.store import Store

    store = Store(store_uri, storage)
    rules = PruneConfig.model_validate(cfg)
    branches: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    kept_total = 0
    for name in names:
        table = _read_shard(store, f"{candidates_dir}/{name}")
        cols = [c for c in ("branch", "status", *SCORE_COLUMNS) if c in table.column_names]
        judged = apply_prune(table.select(cols).to_pandas(), means, rules)
        kept = judged["kept"].to_numpy(bool)
        for branch, k in zip(judged["branch"] if "branch" in judged else [None] * len(judged), kept):
            fig = branches.setdefault(str(branch), {"candidates": 0, "kept": 0})
            fig["candidates"] += 1
            fig["kept"] += int(k)
        for reason in judged.loc[~judged["kept"], "prune_reason"]:
            kind = reason_kind(reason)
            reasons[kind] = reasons.get(kind, 0) + 1
        shard = name.removesuffix(".parquet")
        out_rel = f"{pairs_dir}/{shard}.parquet"
        if kept.any():
            rows = table.filter(pa.array(kept))
            n = rows.num_rows
            for col, values in (("kept", pa.array([True] * n, pa.bool_())),
                                ("prune_reason", pa.array([""] * n, pa.string()))):
                if col in rows.column_names:  # PAIR_SCHEMA's types (bool, string)
                    rows = rows.set_column(rows.column_names.index(col), pa.field(col, values.type), values)
                else:
                    rows = rows.append_column(col, values)
            store.write_table(pairs_dir, rows, shard)
            kept_total += n
        elif store.exists(out_rel):
            with store._errors("removing", out_rel):
                store.fs.rm(store.path(out_rel))
    return {"branches": branches, "reasons": reasons, "kept": kept_total}


def _run_groups(fn, groups: list[list[str]], args: tuple, scfg: StreamPruneConfig, use_ray: bool):
    """Yields ``fn(*args(group))`` per group of shard names, in completion order: in Ray tasks
    (at most ``scfg.max_in_flight`` submitted at once) or in this process."""
    if not use_ray:
        for group in groups:
            yield fn(*args(group))
        return
    import ray

    remote = ray.remote(fn).options(num_cpus=scfg.num_cpus, max_retries=3)
    pending: list = []
    for group in groups:
        if len(pending) >= scfg.max_in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
        pending.append(remote.remote(*args(group)))
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def streaming_prune(store, cfg: PruneConfig, scfg: StreamPruneConfig | None = None, *,
                    candidates_dir: str = "candidates", pairs_dir: str = "pairs",
                    on_ray=None) -> dict:
    """The job's pruning pass over ``store``'s candidate table (see the section comment above).

    ``store``: an ``io.store.Store``. Both passes run as Ray tasks when the table has at least
    ``scfg.ray_min_shards`` shards (``on_ray()`` is called first, e.g. to start Ray), else in this
    process one shard at a time. Returns ``{"intra_means", "branches": {branch: {"candidates",
    "kept", "pruned"}}, "pairs_total", "prune_reasons", "shards", "skipped", "ran_on",
    "seconds"}``; ``skipped`` = True when ``PRUNE_STATE_FILE`` shows that the same candidate shards
    were already pruned by the same rules (nothing read or written). Driver memory: the shard names
    and the counts. Raises ``errors.StorageError`` when storage fails after its retries."""
    import time

    from pairaug_ray.io.store import content_hash

    t0 = time.perf_counter()
    scfg = scfg or StreamPruneConfig()
    names = [p.rsplit("/", 1)[-1] for p in store.shards(candidates_dir)]
    key = {"candidate_shards": content_hash(names), "rules": cfg.model_dump(mode="json"),
           "candidates_dir": candidates_dir, "pairs_dir": pairs_dir}
    if store.exists(PRUNE_STATE_FILE):
        state = store.read_json(PRUNE_STATE_FILE)
        if {k: state.get(k) for k in key} == key:
            return {**state["result"], "skipped": True, "seconds": round(time.perf_counter() - t0, 3)}
    use_ray = len(names) >= scfg.ray_min_shards
    if use_ray and on_ray is not None:
        on_ray()
    per = max(1, scfg.shards_per_task if use_ray else len(names) or 1)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    uri, storage = store.uri, store.storage

    means = means_from_partials(_run_groups(
        shard_partials, groups, lambda g: (uri, storage, candidates_dir, g), scfg, use_ray))
    branches: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    kept = 0
    rules = cfg.model_dump(mode="json")
    for part in _run_groups(prune_shards, groups,
                            lambda g: (uri, storage, candidates_dir, pairs_dir, g, means, rules), scfg, use_ray):
        kept += part["kept"]
        for b, fig in part["branches"].items():
            acc = branches.setdefault(b, {"candidates": 0, "kept": 0})
            acc["candidates"] += fig["candidates"]
            acc["kept"] += fig["kept"]
        for k, n in part["reasons"].items():
            reasons[k] = reasons.get(k, 0) + n
    # pairs shards of no candidate shard: an older layout, or a candidate shard since removed
    current = set(names)
    for path in store.shards(pairs_dir):
        name = path.rsplit("/", 1)[-1]
        if name not in current:
            with store._errors("removing", f"{pairs_dir}/{name}"):
                store.fs.rm(path)
    for fig in branches.values():
        fig["pruned"] = fig["candidates"] - fig["kept"]
    result = {"intra_means": means, "branches": dict(sorted(branches.items())), "pairs_total": kept,
              "prune_reasons": dict(sorted(reasons.items())), "shards": len(names),
              "ran_on": "ray tasks" if use_ray else "driver"}
    store.write_json(PRUNE_STATE_FILE, {**key, "result": result})
    candidates = sum(fig["candidates"] for fig in branches.values())
    if candidates and not kept:
        top = ", ".join(f"{k} ({n})" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        log.warning("all %d candidates were pruned, so %s/ is empty (most common reasons: %s). The "
                    "rules (inter_threshold=%s, intra_margin=%s) do not fit this scorer's scores: "
                    "calibrate augment.prune.inter_threshold on real pairs (`pairaug demo "
                    "--inter-quantile`) or loosen augment.prune.* and re-run (only pruning re-runs)",
                    candidates, pairs_dir, top, cfg.inter_threshold, cfg.intra_margin)
    return {**result, "skipped": False, "seconds": round(time.perf_counter() - t0, 3)}

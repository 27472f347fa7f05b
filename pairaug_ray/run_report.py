"""The visual report of an augmentation run (report.html): example grids, score histograms,
kept/pruned counts. (Not to be confused with ``io/reports.py``, which reads radiology reports.)

Usage::

    from pairaug_ray.io.store import Store
    from pairaug_ray.run_report import write_report
    rel = write_report(Store("s3://bucket/run1"), studies_store=Store("s3://bucket/ingest"))
    # -> "report.html" in the run folder, its PNGs under "report/"

Reads the run folder's ``candidates`` table (every scored candidate; falls back to ``pairs``, the
kept ones) and the ``studies`` table the candidates came from. Only the small columns of the
candidates are read in full; image bytes are read for the shown examples only. Everything is
written through ``Store.write_bytes``, so the report lands next to the tables on local disk or s3.
The HTML holds no external CSS or JS; images are relative ``<img src="report/...png">``.

Two steps: :func:`gather` reads the tables into a :class:`ReportData` (rows, means, thresholds,
counts), then one renderer per section (:func:`render_summary`, :func:`render_scores`,
:func:`render_examples`) turns it into HTML; :func:`write_report` runs both.
"""

from __future__ import annotations

import html
import io
import json
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairaug_ray import schema as S
from pairaug_ray.io.store import Store
from pairaug_ray.labeler import NEGATIVE, POSITIVE, UNCERTAIN
from pairaug_ray.stages import prune as P
from pairaug_ray.vocab import BRANCH_DESCRIPTIONS, BRANCH_TITLES, BRANCHES as BRANCH_NAMES, SCORE_COLUMNS, SCORE_LABELS, normalize_branch

REPORT_FILE = "report.html"
REPORT_DIR = "report"
THUMB_SIZE = 192

BRANCHES = tuple((b, BRANCH_TITLES[b], BRANCH_DESCRIPTIONS[b]) for b in BRANCH_NAMES)
# Small candidate columns read in full (no image bytes).
META_COLUMNS = ["pair_id", "branch", "variant", "source_row_id", "study_id", "report",
                "rewritten_report", "change", *SCORE_COLUMNS, "kept", "prune_reason",
                "rewrite_backend", "rewrite_model", "generator_model", "score_model",
                "config_fingerprint", "code_version", "edit_source", "inversion_method", "inversion_psnr",
                "sampler", "unet_sample_steps"]
PROVENANCE_COLUMNS = ["rewrite_backend", "rewrite_model", "generator_model", "score_model",
                      "config_fingerprint", "code_version"]

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table.t{border-collapse:collapse;margin:.5em 0}table.t td,table.t th{border:1px solid #ccc;
padding:3px 8px;text-align:left;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin:.4em 0 1em}
.card{border:1px solid #ccc;border-radius:6px;padding:6px;width:220px;font-size:.8em;background:#fafafa}
.card.src{background:#eef4ff}.card.kept{border-color:#2a8a2a}.card.pruned{border-color:#b33;opacity:.85}
.card img{width:192px;height:192px;object-fit:contain;background:#000;display:block}
.txt{white-space:pre-wrap;max-height:11em;overflow:auto;margin:4px 0}
.badge{display:inline-block;padding:1px 6px;border-radius:4px;color:#fff;font-weight:bold}
.badge.kept{background:#2a8a2a}.badge.pruned{background:#b33}
.fail{color:#b33;font-weight:bold}.muted{color:#777}.noimg{width:192px;height:60px;color:#777}
"""


# ---------------------------------------------------------------- reading

def _shard_schema(store: Store, shard: str) -> pa.Schema:
    with store.fs.open(shard, "rb") as f:
        return pq.read_schema(f)


def _read(store: Store | None, table_dir: str, columns: list[str],
          key: str | None = None, values: list[str] | None = None) -> pa.Table | None:
    """Shards of `table_dir`, only `columns` (missing ones become nulls), optionally only the rows
    whose `key` is in `values` (pushed down to Parquet, so image bytes of other rows are skipped).
    None when the table does not exist."""
    if store is None:
        return None
    shards = store.shards(table_dir)
    if not shards:
        return None
    tables = []
    for shard in shards:
        present = set(_shard_schema(store, shard).names)
        wanted = [c for c in columns if c in present]
        if key is not None and key not in present:
            continue
        filters = [(key, "in", list(values))] if key is not None else None
        with store.fs.open(shard, "rb") as f:
            t = pq.read_table(f, columns=wanted, filters=filters) if wanted else None
        if t is None:
            continue
        for c in columns:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows))
        tables.append(t.select(columns))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def _row_count(store: Store | None, table_dir: str) -> int | None:
    if store is None:
        return None
    shards = store.shards(table_dir)
    if not shards:
        return None
    total = 0
    for shard in shards:
        with store.fs.open(shard, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _num(value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


def _fill_kept(rows: list[dict], pair_ids_kept: set[str] | None, thr: float, margin: float,
               means: dict) -> None:
    """Candidates are written before pruning and carry no `kept`. It comes from the pairs table when
    there is one (what training reads); the reason a candidate was pruned comes from the pruning
    rules of stages/prune.py with the run's threshold, margin and IntraAug means (e.g. "score_align
    0.120 ≤ threshold 0.200"). Without a pairs table the rules alone decide."""
    missing = [r for r in rows if r["kept"] is None]
    if not missing:
        return
    have_means = all(means.get(c) is not None for c in SCORE_COLUMNS)
    frame = {"branch": np.array([r["branch"] for r in missing], dtype=object),
             **{c: np.array([_num(r[c]) for r in missing], dtype=np.float64) for c in SCORE_COLUMNS}}
    cfg = P.PruneConfig(inter_threshold=thr, intra_margin=margin)
    if pair_ids_kept is None:
        pruned = P.apply_prune(frame, means if have_means else None, cfg)
        for r, kept, reason in zip(missing, pruned["kept"], pruned["prune_reason"]):
            r["kept"], r["prune_reason"] = bool(kept), str(reason)
        return
    try:
        reasons = list(P.apply_prune(frame, means if have_means else None, cfg)["prune_reason"])
    except ValueError:  # IntraAug rows but no means to judge them by
        reasons = [""] * len(missing)
    for r, reason in zip(missing, reasons):
        r["kept"] = r["pair_id"] in pair_ids_kept
        if not r["kept"]:
            r["prune_reason"] = r["prune_reason"] or str(reason) or "not in the pairs table"


def _state_words(state) -> str:
    """``[state, severity, laterality]`` (a labeler.Finding's) → "moderate, left", "none",
    "possible mild", "present"; null → "not mentioned"."""
    if state is None or state == []:
        return "not mentioned"
    if not isinstance(state, (list, tuple)):
        return str(state)
    st, severity, side = (list(state) + [None, None, None])[:3]
    if st == NEGATIVE:
        return "none"
    if st == UNCERTAIN:
        words = " ".join(w for w in ("possible", severity) if w)
    elif st == POSITIVE:
        words = severity or "present"
    else:
        words = str(st)
    return ", ".join(w for w in (words, side) if w)


def describe_change(change) -> list[str]:
    """The rewrite's requested change (the ``change`` column: JSON ``{observation: [before, after]}``,
    each ``[state, severity, laterality]`` or null) in words, one line per observation:
    ``"Edema: mild → none"``, ``"Pleural Effusion: none → moderate, left"``. Text that is not such
    JSON comes back as one line."""
    if change in (None, "", "{}", "null"):
        return []
    try:
        data = json.loads(change) if isinstance(change, str) else change
    except ValueError:
        return [str(change)]
    if not isinstance(data, dict):
        return [str(change)]
    lines = []
    for obs, pair in sorted(data.items()):
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            lines.append(f"{obs}: {_state_words(pair[0])} → {_state_words(pair[1])}")
        else:
            lines.append(f"{obs}: {pair}")
    return lines


# ---------------------------------------------------------------- images

def _thumbnail(data: bytes | None, size: int = THUMB_SIZE) -> bytes | None:
    """8-bit grayscale PNG thumbnail of an 8- or 16-bit PNG/JPEG; None when it cannot be read."""
    if not data:
        return None
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64) / 65535.0
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
        out = Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
        out.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, format="PNG", optimize=True)
        return buf.getvalue()
    except Exception:  # a broken image must not sink the whole report
        return None


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _split_kept(rows: list[dict], col: str) -> tuple[np.ndarray, np.ndarray]:
    kept = np.array([_num(r[col]) for r in rows if r["kept"]], dtype=np.float64)
    pruned = np.array([_num(r[col]) for r in rows if not r["kept"]], dtype=np.float64)
    return kept[np.isfinite(kept)], pruned[np.isfinite(pruned)]


def _hist(ax, rows: list[dict], col: str, lines: list[tuple[float, str, str, str]]) -> None:
    kept, pruned = _split_kept(rows, col)
    allv = np.concatenate([kept, pruned, [x for x, *_ in lines if math.isfinite(x)]])
    if len(kept) + len(pruned):
        lo, hi = float(allv.min()), float(allv.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.01, hi + 0.01
        bins = np.linspace(lo, hi, 21)
        ax.hist([kept, pruned], bins=bins, stacked=True, color=["#2a8a2a", "#b33"],
                label=[f"kept ({len(kept)})", f"pruned ({len(pruned)})"])
    for x, label, color, style in lines:
        if math.isfinite(x):
            ax.axvline(x, color=color, linestyle=style, linewidth=1.5, label=label)
    ax.set_xlabel(SCORE_LABELS[col], fontsize=8)
    ax.set_ylabel("candidates", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, framealpha=0.6, loc="upper left")  # "best" searches (slow, and warns)


def _inter_hist(rows: list[dict], thr: float) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    _hist(ax, rows, "score_align", [(thr, f"threshold {thr:.3f}", "black", "--")])
    ax.set_title("InterAug: keep iff align > threshold", fontsize=9)
    return _figure_png(fig)


def _intra_hist(rows: list[dict], means: dict, margin: float) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.3), layout="constrained")
    for i, col in enumerate(SCORE_COLUMNS):
        ax = fig.add_subplot(1, 3, i + 1)
        m = _num(means.get(col))
        _hist(ax, rows, col, [(m, f"mean {m:.4f}", "gray", ":"),
                              (m - margin, f"mean − {margin:g} = {m - margin:.4f}", "black", "--")])
        ax.set_title(f"IntraAug {col}", fontsize=9)
    fig.suptitle("IntraAug: keep iff all three > mean − margin", fontsize=9)
    return _figure_png(fig)


# ---------------------------------------------------------------- html pieces

def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value, digits: int = 3) -> str:
    x = _num(value)
    return f"{x:.{digits}f}" if math.isfinite(x) else "–"


def _img(src: str | None, alt: str) -> str:
    if src is None:
        return f'<div class="noimg">{_e(alt)}: no readable image</div>'
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list], cls: str = "t", row_ids: list[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rid = f' id="{_e(row_ids[i])}"' if row_ids else ""
        body.append(f"<tr{rid}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return f'<table class="{cls}"><tr>{head}</tr>{"".join(body)}</table>'


def _score_html(row: dict, branch: str, thr: float, margin: float, means: dict) -> str:
    parts = []
    for col in SCORE_COLUMNS:
        x = _num(row[col])
        if branch == "inter":
            cutoff = thr if col == "score_align" else None
        else:
            m = _num(means.get(col))
            cutoff = m - margin if math.isfinite(m) else None
        if branch == "inter" and col != "score_align" and not math.isfinite(x):
            continue  # InterAug is pruned on alignment alone; the other two are IntraAug's
        fail = cutoff is not None and math.isfinite(x) and not x > cutoff
        cls = ' class="fail"' if fail else ""
        parts.append(f"<span{cls}>{_e(col.removeprefix('score_'))} {_fmt(x)}</span>")
    return " · ".join(parts)


def _badge(row: dict) -> str:
    if row["kept"]:
        return '<span class="badge kept">kept</span>'
    reason = row.get("prune_reason") or ""
    return f'<span class="badge pruned">pruned</span> <span class="muted">{_e(reason)}</span>'


# ---------------------------------------------------------------- gather

@dataclass
class ReportData:
    """What the report shows, read from the run and studies folders."""

    store: Store
    studies_store: Store
    table_name: str                     # "candidates" or "pairs": where the rows came from
    rows: list[dict]                    # META_COLUMNS per candidate, "kept" filled in
    by_branch: dict[str, list[dict]]
    thr: float                          # InterAug threshold
    margin: float                       # IntraAug margin
    means: dict[str, float | None]      # IntraAug means per score column
    means_from: str
    pngs: dict[str, bytes | None] = field(default_factory=dict)   # written under report/


def gather(store: Store, studies_store: Store | None = None, inter_threshold: float | None = None,
           intra_margin: float | None = None, intra_means: dict | None = None) -> ReportData:
    """Reads the run's candidates (or pairs), fills in kept/pruned, and the IntraAug means."""
    defaults = P.PruneConfig()
    thr = defaults.inter_threshold if inter_threshold is None else float(inter_threshold)
    margin = defaults.intra_margin if intra_margin is None else float(intra_margin)
    studies_store = studies_store or store

    table_name = S.CANDIDATES_DIR
    cands = _read(store, S.CANDIDATES_DIR, META_COLUMNS)
    if cands is None:
        table_name = S.PAIRS_DIR
        cands = _read(store, S.PAIRS_DIR, META_COLUMNS)
    rows = [] if cands is None else cands.to_pylist()
    for r in rows:
        r["branch"] = normalize_branch(r["branch"])
    by_branch = {b: [r for r in rows if r["branch"] == b] for b, *_ in BRANCHES}

    if intra_means is not None:
        means = {c: intra_means.get(c) for c in SCORE_COLUMNS}
        means_from = "given"
    else:
        means = P.intra_means(cands) if cands is not None else {c: None for c in SCORE_COLUMNS}
        means_from = f"computed over {len(by_branch['intra'])} IntraAug candidates"

    if any(r["kept"] is None for r in rows):
        kept_ids = None
        if table_name == S.CANDIDATES_DIR:
            pairs = _read(store, S.PAIRS_DIR, ["pair_id"])
            kept_ids = None if pairs is None else set(pairs.column("pair_id").to_pylist())
        _fill_kept(rows, kept_ids, thr, margin, means)
    return ReportData(store, studies_store, table_name, rows, by_branch, thr, margin, means, means_from)


def _put_png(data: ReportData, name: str, png: bytes | None) -> str | None:
    if png is None:
        return None
    rel = posixpath.join(REPORT_DIR, name)
    data.store.write_bytes(rel, png)
    return rel


# ---------------------------------------------------------------- renderers

def render_kept_fidelity(result: dict | None) -> str:
    """The classifier fidelity of the kept pairs (``train.fidelity.kept_pair_fidelity``), in words
    and as a table; empty without a result."""
    if not result or not result.get("branches"):
        return ""
    rows = []
    for branch, b in result["branches"].items():
        for r in b["rows"]:
            ci = "–" if r.get("ci_low") is None else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            rows.append([branch, r["finding"], _fmt(r.get("auc"), 3) if r.get("auc") is not None else "too few",
                         ci, r["n_with"], r["n_without"]])
    scored = ", ".join(f"{b}: {v['n_scored']}" for b, v in result["branches"].items())
    return ('<h2 id="kept-fidelity">Do the kept images show what their reports say?</h2>'
            f"<p>Classifier fidelity of the kept pairs ({_e(scored)} scored): per finding, the ROC-AUC of "
            f"the scorer's zero-shot probability of the finding between kept images whose report states "
            f"it and kept images whose report negates or omits it. 1.0 = every image shows the finding "
            f"where its report states it; 0.5 = no relation (or a scorer that cannot see it). Scorer: "
            f"<code>{_e(result.get('vlp'))}</code>.</p>"
            + _table(["branch", "finding", "AUC", "95% CI", "stated", "negated / omitted"], rows))


def render_summary(data: ReportData) -> str:
    """Counts per branch, the pruning rules, the quarantine, the provenance."""
    store, studies_store, by_branch = data.store, data.studies_store, data.by_branch
    thr, margin, means = data.thr, data.margin, data.means
    out = ['<h2 id="summary">Summary</h2>']
    n_studies = _row_count(studies_store, S.STUDIES_DIR)
    out.append(f"<p>Source studies in the studies table: {_e('–' if n_studies is None else n_studies)}</p>")
    count_rows, count_ids = [], []
    for b, title, _ in BRANCHES:
        br = by_branch[b]
        kept = sum(1 for r in br if r["kept"])
        rate = f"{kept / len(br):.0%}" if br else "–"
        reasons = Counter(P.reason_kind(r["prune_reason"]) or "?" for r in br if not r["kept"])
        top = " · ".join(f"{k} ×{v}" for k, v in reasons.most_common(4)) or "–"
        count_rows.append([title, len(br), kept, len(br) - kept, rate, top])
        count_ids.append(f"counts-{b}")
    out.append(_table(["branch", "candidates", "kept", "pruned", "keep rate", "prune reasons"],
                      count_rows, row_ids=count_ids))

    rule_rows = [["InterAug", "score_align", "–", "–", f"{thr:.3f}"]]
    for col in SCORE_COLUMNS:
        m = _num(means.get(col))
        rule_rows.append(["IntraAug", col, _fmt(m, 4), f"{margin:g}",
                          _fmt(m - margin, 4) if math.isfinite(m) else "–"])
    out.append(f"<p>Pruning rules (keep iff score &gt; cutoff; IntraAug means {_e(data.means_from)}):</p>")
    out.append(_table(["branch", "score", "mean", "margin", "cutoff"], rule_rows))

    quarantine_parts = []
    for label, qstore in [("run", store)] + ([("studies", studies_store)]
                                              if studies_store.uri != store.uri else []):
        q = _read(qstore, S.QUARANTINE_DIR, ["stage", "error_class"])
        if q is None:
            continue
        quarantine_parts.append(
            f'<p id="quarantine-{label}">Quarantined rows ({_e(label)} folder): {q.num_rows}</p>')
        groups = Counter(zip(q.column("stage").to_pylist(), q.column("error_class").to_pylist()))
        if groups:
            quarantine_parts.append(_table(["stage", "error class", "rows"],
                                           [[s, c, n] for (s, c), n in sorted(groups.items(), key=str)]))
    out.append('<h3>Quarantine</h3>' + ("".join(quarantine_parts) or "<p>no quarantine table</p>"))

    prov_rows = []
    for b, title, _ in BRANCHES:
        for col in PROVENANCE_COLUMNS:
            vals = sorted({str(r[col]) for r in by_branch[b] if r[col] not in (None, "")})
            if vals:
                prov_rows.append([title, col, ", ".join(vals[:5]) + (" …" if len(vals) > 5 else "")])
    if prov_rows:
        out.append("<h3>Provenance</h3>" + _table(["branch", "field", "values"], prov_rows))

    return "".join(out)


def render_scores(data: ReportData) -> str:
    """The score histograms with each branch's cut-offs."""
    by_branch, thr, margin, means = data.by_branch, data.thr, data.margin, data.means
    out: list[str] = []
    out.append('<h2 id="scores">Pruning scores</h2>')
    for b, title, _ in BRANCHES:
        out.append(f"<h3>{title}</h3>")
        if not by_branch[b]:
            out.append(f'<p class="muted" id="hist-{b}-empty">{title}: no candidates</p>')
            continue
        png = (_inter_hist(by_branch[b], thr) if b == "inter"
               else _intra_hist(by_branch[b], means, margin))
        out.append(_img(_put_png(data, f"hist_{b}.png", png), f"{title} score histogram"))

    return "".join(out)


def render_examples(data: ReportData, max_examples: int = 6, max_variants: int = 4) -> str:
    """Example grids: the source study, then its InterAug and IntraAug candidates."""
    store, studies_store, rows, by_branch = data.store, data.studies_store, data.rows, data.by_branch
    thr, margin, means, table_name = data.thr, data.margin, data.means, data.table_name
    out: list[str] = []
    out.append('<h2 id="examples">Examples</h2>')
    sources: dict[str, set] = {}
    for r in rows:
        if r["branch"] and r["source_row_id"] is not None:
            sources.setdefault(r["source_row_id"], set()).add(r["branch"])
    chosen = sorted(sources, key=lambda s: (-len(sources[s]), s))[:max(0, max_examples)]
    if not chosen:
        out.append('<p class="muted">no candidates</p>')

    shown = {s: {b: sorted((r for r in by_branch[b] if r["source_row_id"] == s),
                           key=lambda r: (r["variant"] if r["variant"] is not None else 0,
                                          str(r["pair_id"])))[:max(1, max_variants)]
                 for b, *_ in BRANCHES} for s in chosen}
    shown_ids = [r["pair_id"] for s in chosen for b in shown[s] for r in shown[s][b]]
    pix = {}
    if shown_ids:
        t = _read(store, table_name, ["pair_id", "image_png", "source_image_png"],
                  key="pair_id", values=shown_ids)
        pix = {} if t is None else {r["pair_id"]: r for r in t.to_pylist()}
    study_rows = {}
    if chosen:
        t = _read(studies_store, S.STUDIES_DIR,
                  ["row_id", "study_id", "view_position", "image_png", "report"],
                  key="row_id", values=chosen)
        study_rows = {} if t is None else {r["row_id"]: r for r in t.to_pylist()}

    for i, src in enumerate(chosen):
        study = study_rows.get(src)
        any_row = next(r for b in shown[src] for r in shown[src][b])
        study_id = (study or {}).get("study_id") or any_row.get("study_id") or ""
        out.append(f'<h3 id="example-{i}">Example {i + 1}: study {_e(study_id)} '
                   f'<span class="muted">(row {_e(src)})</span></h3>')
        src_report = (study or {}).get("report") or any_row.get("report") or ""
        src_img = _put_png(data, f"ex{i}_source.png", _thumbnail((study or {}).get("image_png")))
        view = (study or {}).get("view_position") or ""
        note = "" if study else '<div class="muted">source row not in the studies table</div>'
        out.append('<div class="grid"><div class="card src"><b>original</b> '
                   f'<span class="muted">{_e(view)}</span>{_img(src_img, "original")}{note}'
                   f'<div class="txt">{_e(src_report)}</div></div></div>')
        for b, title, blurb in BRANCHES:
            cards = []
            cand_rows = shown[src][b]
            if not cand_rows:
                out.append(f'<div class="muted">{title}: no candidates for this study</div>')
                continue
            if b == "intra":
                cards += _intra_source_cards(data, i, cand_rows, pix, src_img)
            for k, r in enumerate(cand_rows):
                img = _put_png(data, f"ex{i}_{b}_{k}.png", _thumbnail(pix.get(r["pair_id"], {}).get("image_png")))
                state = "kept" if r["kept"] else "pruned"
                change = describe_change(r["change"])
                change_html = (f'<div class="muted change">change: {"; ".join(_e(c) for c in change[:6])}'
                               f'{" …" if len(change) > 6 else ""}</div>' if change else "")
                cards.append(f'<div class="card {state}"><b>{title} v{_e(r["variant"])}</b> '
                             f'{_badge(r)}{_img(img, title)}'
                             f'<div>{_score_html(r, b, thr, margin, means)}</div>'
                             f'<div class="txt">{_e(r["rewritten_report"])}</div>{change_html}</div>')
            more = len([r for r in by_branch[b] if r["source_row_id"] == src]) - len(cand_rows)
            extra = f' <span class="muted">(+{more} more not shown)</span>' if more > 0 else ""
            out.append(f'<div class="branch branch-{b}"><b>{title}</b> '
                       f'<span class="muted">{_e(blurb)}</span>{extra}'
                       f'<div class="grid">{"".join(cards)}</div></div>')

    return "".join(out)


def _intra_source_cards(data: ReportData, i: int, cand_rows: list[dict], pix: dict,
                        src_img: str | None) -> list[str]:
    """What IntraAug's edits start from, before the edits: for edits of the real image
    (``edit_source`` "real") the real image and its reconstruction (the inversion decoded without
    an edit, with its PSNR against the real image); for edits from noise (the reference; a missing
    ``edit_source`` reads as noise) the generation of the source report."""
    ref = next((pix.get(r["pair_id"], {}).get("source_image_png") for r in cand_rows
                if pix.get(r["pair_id"], {}).get("source_image_png")), None)
    real = [r for r in cand_rows if (r.get("edit_source") or "noise") == "real"]
    cards = []
    if real:
        r0 = real[0]
        method = r0.get("inversion_method") or "?"
        cards.append('<div class="card src real"><b>real image</b>'
                     f'{_img(src_img, "real image")}<div class="muted">the study image the edits '
                     'start from</div></div>')
        if ref:
            rec = _put_png(data, f"ex{i}_intra_recon.png", _thumbnail(ref))
            cards.append('<div class="card src recon"><b>reconstruction</b>'
                         f'{_img(rec, "reconstruction")}<div class="muted">{_e(method)} inversion '
                         f'({_e(r0.get("sampler") or "?")}), decoded without an edit: PSNR '
                         f'{_fmt(r0.get("inversion_psnr"), 1)} dB vs the real image</div></div>')
        if len(real) < len(cand_rows):
            cards.append(f'<div class="muted">{len(cand_rows) - len(real)} of these edits started from '
                         'noise (no study image)</div>')
    elif ref:
        ref_img = _put_png(data, f"ex{i}_intra_ref.png", _thumbnail(ref))
        cards.append('<div class="card src"><b>p2p reference</b>'
                     f'{_img(ref_img, "p2p reference")}<div class="muted">generation '
                     'of the source report that the edits start from</div></div>')
    return cards


# ---------------------------------------------------------------- the report

def write_report(store: Store, studies_store: Store | None = None, max_examples: int = 6,
                 inter_threshold: float | None = None, intra_margin: float | None = None,
                 intra_means: dict | None = None, max_variants: int = 4,
                 kept_fidelity: dict | None = None) -> str:
    """Write ``report.html`` and ``report/*.png`` into the run folder of `store`; return
    ``"report.html"`` (relative to the run folder).

    `studies_store` holds the ``studies`` table of the source studies (default: `store`).
    Thresholds default to stages/prune.py's PruneConfig; `intra_means`
    ({"score_align": m, "score_delta": m, "score_img": m}) defaults to the means over the
    IntraAug candidates. `max_variants` caps the candidates shown per branch and source study.
    `kept_fidelity` (``train.fidelity.kept_pair_fidelity``'s result) adds its table.
    """
    data = gather(store, studies_store, inter_threshold, intra_margin, intra_means)
    page = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>PairAug run report</title>"
            f"<style>{CSS}</style></head><body>",
            f"<h1>PairAug run report</h1><p class=\"muted\">run folder: {_e(store.uri)}<br>"
            f"studies: {_e(data.studies_store.uri)} · candidates read from "
            f"<code>{_e(data.table_name)}</code></p>",
            render_summary(data), render_kept_fidelity(kept_fidelity), render_scores(data),
            render_examples(data, max_examples, max_variants),
            "</body></html>"]
    store.write_bytes(REPORT_FILE, "\n".join(page).encode("utf-8"))
    return REPORT_FILE

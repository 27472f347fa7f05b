"""The Ray Data jobs, built from a config in numbered steps.

Usage::

    from pairaug_ray.config import load_config
    from pairaug_ray.pipeline import run_augment, run_ingest
    cfg = load_config("jobs/configs/demo.yaml")
    manifest = run_ingest(cfg)                      # a whole job config (.ingest, .storage, .ray)
    manifest = run_augment(cfg.augment, storage=cfg.storage, ray=cfg.ray)   # or its sections

Ingest: 1 list the source on the driver → 2 drop rows a previous run already wrote (resume) →
3 decode in an actor pool → 4 label → 5 write Parquet shards (studies + quarantine) → 6 the run
manifest with counts. Only small summary rows come back to the driver.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray import __version__
from pairaug_ray import schema as S
from pairaug_ray.io.sources import list_items
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.runtime import RayConfig, init_ray
from pairaug_ray.stages.base import TIMING_PREFIX, StageConfig, fingerprint, output_fingerprint
from pairaug_ray.stages.decode import DecodeConfig, DecodeStage
from pairaug_ray.stages.edit import EditConfig
from pairaug_ray.stages.generate import GenerateConfig
from pairaug_ray.stages.label import LabelConfig, LabelStage
from pairaug_ray.stages.plan import PLAN_COLUMNS, pair_seed, plan_candidates  # noqa: F401 (re-exported)
from pairaug_ray.stages.prune import PruneConfig
from pairaug_ray.stages.rewrite import RewriteConfig
from pairaug_ray.stages.score import ScoreConfig
from pairaug_ray.stages.write import WriteConfig, WriteStage

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class WritePoolConfig(StageConfig):
    batch_size: int = 64
    num_cpus: float = 0.25


class IngestConfig(_Strict):
    """The ``ingest:`` section: where studies come from and go, and the decode/label/write pools."""

    source: str = Field("phantom://48?seed=0", description="folder, manifest, s3:// URI, iu:// or phantom://N?seed=S")
    out: str = Field("pairaug_out/ingest", description="output folder or s3:// URI")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    write: WritePoolConfig = Field(default_factory=WritePoolConfig)


class AugmentConfig(_Strict):
    """The ``augment:`` section: which studies, how many candidates, and every stage's settings."""

    studies: str = Field("pairaug_out/ingest", description="an ingest output folder (local or s3://)")
    out: str = Field("pairaug_out/augment", description="output folder or s3:// URI")
    seed: int = Field(0, description="job seed: every candidate's seed and pair id derive from it")
    splits: list[str] = Field(default_factory=lambda: ["train"],
                              description="splits to augment; never the test split you evaluate on")
    inter_variants: int = Field(1, ge=0, description="InterAug candidates per study")
    intra_variants: int = Field(2, ge=0, description="IntraAug candidates per study (reference: 10)")
    limit: int | None = Field(None, ge=1, description="augment at most this many studies")
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    write: WritePoolConfig = Field(default_factory=WritePoolConfig)
    report: bool = Field(True, description="write report.html with example grids and score histograms")


def _sections(cfg, name: str, storage: StorageConfig | None, ray_cfg: RayConfig | None):
    """(section, storage, ray) from a whole job config (anything with ``.<name>``, ``.storage`` and
    ``.ray``, e.g. ``config.PairAugConfig``) or from the section itself plus the keywords."""
    if hasattr(cfg, name):
        return getattr(cfg, name), storage or cfg.storage, ray_cfg or cfg.ray
    return cfg, storage or StorageConfig(), ray_cfg or RayConfig()


class Progress:
    """Counts summary rows as they stream back and prints a line every few seconds."""

    def __init__(self, label: str, total: int, every_s: float = 5.0, stream=None):
        self.label, self.total, self.every_s = label, total, every_s
        self.stream = stream or sys.stderr  # looked up now: sys.stderr may be swapped (pytest)
        self.t0 = self.last = time.perf_counter()
        self.done = 0
        self.counts: Counter = Counter()

    def update(self, batch: pd.DataFrame) -> None:
        self.done += len(batch)
        self.counts.update(batch["status"].tolist())
        for cls in batch.loc[batch["status"] == "error", "error_class"]:
            self.counts[f"error:{cls}"] += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.print()

    def print(self) -> None:
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        errs = self.counts.get("error", 0)
        of = f"/{self.total}" if self.total >= 0 else ""
        print(f"[{self.label}] {self.done}{of} rows, {errs} errors, {rate:.2f} rows/s",
              file=self.stream, flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def run_ingest(cfg, *, storage: StorageConfig | None = None, ray: RayConfig | None = None) -> dict:
    """Decode, label and write a source's studies; returns the run manifest (also written).

    ``cfg`` is an ``IngestConfig`` (with ``storage``/``ray`` keywords) or a whole job config.
    """
    icfg, storage, ray_cfg = _sections(cfg, "ingest", storage, ray)
    import ray

    store = Store(icfg.out, storage)
    init_ray(ray_cfg)

    # 1. List the source (no pixels: paths, ids and, for IU, report text).
    items = list_items(icfg.source, storage)

    # 2. Resume: rows already in the studies or quarantine table are not redone.
    done = set(store.read_column(S.STUDIES_DIR, "row_id")) | set(store.read_column(S.QUARANTINE_DIR, "row_id"))
    todo = [it for it in items if it["row_id"] not in done]
    log.info("ingest %s: %d items, %d already written, %d to do", icfg.source, len(items),
             len(items) - len(todo), len(todo))

    progress = Progress("ingest", len(todo))
    if todo:
        decode = icfg.decode.model_copy(update={"storage": storage})
        blocks = max(1, min(len(todo) // max(1, decode.batch_size), 200))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        # 3. Decode pixels and parse reports in an actor pool.
        ds = ds.map_batches(DecodeStage, **decode.map_batches_kwargs(DecodeStage))
        # 4. Label the reports.
        ds = ds.map_batches(LabelStage, **icfg.label.map_batches_kwargs(LabelStage))
        # 5. Write studies + quarantine shards; only summaries come back.
        wcfg = WriteConfig(out=icfg.out, storage=storage, table=S.STUDIES_DIR, schema_name="study",
                           **icfg.write.model_dump())
        ds = ds.map_batches(WriteStage, **wcfg.map_batches_kwargs(WriteStage))
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            progress.update(batch)
        progress.print()

    # 6. The run manifest.
    counts = progress.counts
    manifest = {
        "job": "ingest",
        "source": icfg.source,
        "out": icfg.out,
        "listed": len(items),
        "skipped_already_written": len(items) - len(todo),
        "written": counts.get("ok", 0),
        "quarantined": counts.get("error", 0),
        "quarantined_by_class": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("error:")},
        "totals": {
            "studies": len(store.read_column(S.STUDIES_DIR, "row_id")),
            "quarantined": len(store.read_column(S.QUARANTINE_DIR, "row_id")),
        },
        "seconds": round(progress.seconds, 2),
        "rows_per_s": round(len(todo) / progress.seconds, 2) if todo and progress.seconds else None,
        "config_fingerprint": fingerprint(icfg, exclude={"out", "decode", "label", "write"}) + "-"
        + fingerprint(icfg.decode, exclude={"batch_size", "min_actors", "max_actors", "num_cpus",
                                            "num_gpus", "accelerator_type", "resources", "storage"}),
        "version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_json(S.MANIFEST_FILE, manifest)
    return manifest


# ----------------------------------------------------------------------------- augmentation

def _stage_throughput(totals: dict[str, float], rows: dict[str, int]) -> dict:
    return {stage.removeprefix(TIMING_PREFIX): {
        "busy_seconds": round(sec, 2),
        "rows_per_busy_s": round(rows[stage] / sec, 2) if sec else None,
    } for stage, sec in sorted(totals.items())}


class _StageClock:
    """Sums the per-row ``_sec_<stage>`` columns of the summaries streaming back."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.rows: Counter = Counter()

    def update(self, batch: pd.DataFrame) -> None:
        for col in batch.columns:
            if col.startswith(TIMING_PREFIX):
                vals = pd.to_numeric(batch[col], errors="coerce")
                self.seconds[col] += float(vals.sum(skipna=True))
                self.rows[col] += int(vals.notna().sum())


def run_augment(cfg, *, storage: StorageConfig | None = None, ray: RayConfig | None = None) -> dict:
    """Rewrite, generate/edit, score, prune and write augmented pairs; returns the run manifest.

    ``cfg`` is an ``AugmentConfig`` (with ``storage``/``ray`` keywords) or a whole job config.
    """
    acfg, storage, ray_cfg = _sections(cfg, "augment", storage, ray)
    import ray

    from pairaug_ray.stages.edit import EditStage
    from pairaug_ray.stages.generate import GenerateStage
    from pairaug_ray.stages.prune import apply_prune, intra_means
    from pairaug_ray.stages.rewrite import RewriteStage
    from pairaug_ray.stages.score import ScoreStage

    studies = Store(acfg.studies, storage)
    store = Store(acfg.out, storage)
    init_ray(ray_cfg)
    t0 = time.perf_counter()
    fp = output_fingerprint(acfg.rewrite, acfg.generate, acfg.edit, acfg.score)
    _claim_output(store, fp)

    # 1. Studies to augment: the configured splits of the ingest table, text columns only (no
    #    pixels), read on the driver: a Ray read's file-listing task wants a whole CPU, which a
    #    small cluster with the stage pools already placed does not have.
    table = studies.read_table(S.STUDIES_DIR, columns=PLAN_COLUMNS)
    if table is None:
        raise FileNotFoundError(f"no studies table under {acfg.studies}: run `pairaug ingest` first")
    table = table.filter(pc.is_in(table.column("split"), pa.array(acfg.splits, pa.string())))
    if acfg.limit:
        table = table.slice(0, acfg.limit)
    chunk = 16
    src = ray.data.from_arrow([table.slice(i, chunk) for i in range(0, max(table.num_rows, 1), chunk)])

    # 2. Plan candidates with deterministic pair ids; drop those a previous run wrote (resume).
    done = frozenset(store.read_column(S.CANDIDATES_DIR, "pair_id")) | frozenset(
        store.read_column(S.QUARANTINE_DIR, "row_id"))
    per_study = acfg.inter_variants + acfg.intra_variants
    planned = src.map_batches(plan_candidates, batch_format="pandas", batch_size=16, num_cpus=0.25,
                              fn_kwargs={"inter_variants": acfg.inter_variants,
                                                                  "intra_variants": acfg.intra_variants,
                                                                  "seed": acfg.seed, "fp": fp, "done": done})

    # 3-6. Rewrite → InterAug generate → IntraAug edit → score, each an actor pool.
    if acfg.rewrite.backend == "vllm":
        from pairaug_ray.stages.rewrite_vllm import add_vllm_rewrite

        ds = add_vllm_rewrite(planned, acfg.rewrite)  # ray.data.llm chain (or in-actor engine)
    else:
        ds = planned.map_batches(RewriteStage, **acfg.rewrite.map_batches_kwargs(RewriteStage))
    ds = ds.map_batches(GenerateStage, **acfg.generate.map_batches_kwargs(GenerateStage))
    ds = ds.map_batches(EditStage, **acfg.edit.map_batches_kwargs(EditStage))
    ds = ds.map_batches(ScoreStage, **acfg.score.map_batches_kwargs(ScoreStage))

    # 7. Write every scored candidate (pass 1 of pruning needs them persisted) + quarantine.
    wcfg = WriteConfig(out=acfg.out, storage=storage, table=S.CANDIDATES_DIR, schema_name="pair",
                       summary_columns=["branch", "rewrite_rejections"], **acfg.write.model_dump())
    ds = ds.map_batches(WriteStage, **wcfg.map_batches_kwargs(WriteStage))
    # Total shown = candidates still to do (exact unless ``done`` holds ids of other splits).
    progress = Progress("augment", max(table.num_rows * per_study - len(done), 0))
    clock = _StageClock()
    by_branch: Counter = Counter()
    rejections: Counter = Counter()
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        progress.update(batch)
        clock.update(batch)
        if "rewrite_rejections" in batch:
            for s in batch["rewrite_rejections"].dropna():
                rejections.update(json.loads(s) if isinstance(s, str) and s else {})
        for (branch, status), n in batch.groupby(["branch", "status"]).size().items():
            by_branch[f"{branch}:{status}"] += int(n)
    progress.print()
    pass1_s = time.perf_counter() - t0

    # 8. Pruning pass 1: global IntraAug means over the whole persisted candidate table.
    score_cols = ["pair_id", "branch", "score_align", "score_delta", "score_img"]
    scores = store.read_table(S.CANDIDATES_DIR, columns=score_cols)
    if scores is None:  # every row failed: finish anyway, so the manifest says why
        log.warning("no candidates were written under %s: every row is in the quarantine table "
                    "(see errors_by_stage_class and rewrite_rejections_this_run in the manifest)", acfg.out)
        scores = pa.schema([S.PAIR_SCHEMA.field(c) for c in score_cols]).empty_table()
    means = intra_means(scores)  # the score columns are already here: no second read

    # 9. Pruning pass 2: keep/prune each candidate; the kept ones are the training pairs.
    pruned = apply_prune(scores.to_pandas(), means, acfg.prune)
    kept_ids = set(pruned.loc[pruned["kept"], "pair_id"])
    already = set(store.read_column(S.PAIRS_DIR, "pair_id"))
    to_write = kept_ids - already
    if to_write:
        reasons = dict(zip(pruned["pair_id"], pruned["prune_reason"]))
        cands = store.ray_dataset(S.CANDIDATES_DIR)
        pcfg = WriteConfig(out=acfg.out, storage=storage, table=S.PAIRS_DIR, schema_name="pair",
                           summary_columns=["branch"], **acfg.write.model_dump())
        sel = cands.map_batches(_select_kept, batch_format="pandas",
                                fn_kwargs={"ids": frozenset(to_write), "reasons": reasons}, num_cpus=0.25)
        sel = sel.map_batches(WriteStage, **pcfg.map_batches_kwargs(WriteStage))
        for _ in sel.iter_batches(batch_format="pandas", batch_size=None):
            pass

    # 10. Manifest and visual report.
    branch_counts = {}
    for branch in ("inter", "intra"):
        b = pruned[pruned["branch"] == branch]
        branch_counts[branch] = {
            "candidates": int(len(b)),
            "kept": int(b["kept"].sum()),
            "pruned": int((~b["kept"]).sum()),
            "this_run_written": by_branch.get(f"{branch}:ok", 0),
            "this_run_errors": by_branch.get(f"{branch}:error", 0),
        }
    quarantine = store.read_table(S.QUARANTINE_DIR, columns=["stage", "error_class"])
    errors = Counter()
    if quarantine is not None:
        for stage, cls in zip(quarantine.column("stage").to_pylist(), quarantine.column("error_class").to_pylist()):
            errors[f"{stage}:{cls}"] += 1
    total_s = time.perf_counter() - t0
    manifest = {
        "job": "augment",
        "studies": acfg.studies,
        "out": acfg.out,
        "config_fingerprint": fp,
        "version": __version__,
        "per_study": {"inter": acfg.inter_variants, "intra": acfg.intra_variants},
        "skipped_already_written": len(done),
        "this_run_rows": progress.done,
        "branches": branch_counts,
        "pairs_total": len(kept_ids),
        "errors_by_stage_class": dict(sorted(errors.items())),
        "rewrite_rejections_this_run": dict(sorted(rejections.items())),
        "intra_means": means,
        "prune": acfg.prune.model_dump(),
        "stage_throughput": _stage_throughput(clock.seconds, clock.rows),
        "seconds": {"generate_and_score": round(pass1_s, 2), "total": round(total_s, 2)},
        "pairs_per_s": round(progress.counts.get("ok", 0) / pass1_s, 3) if pass1_s else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if acfg.report:
        from pairaug_ray.run_report import write_report

        manifest["report"] = store.uri_of(write_report(
            store, studies, inter_threshold=acfg.prune.inter_threshold,
            intra_margin=acfg.prune.intra_margin, intra_means=means))
    store.write_json(S.MANIFEST_FILE, manifest)
    return manifest


def _claim_output(store: Store, fp: str) -> None:
    """Refuse an output folder that holds candidates made with other output settings: pair ids
    embed the fingerprint, so a resumed run would add a second set beside the first and pruning
    and training would mix them."""
    for name in (S.RUN_FILE, S.MANIFEST_FILE):
        if store.exists(name):
            previous = store.read_json(name).get("config_fingerprint")
            if previous and previous != fp:
                raise ValueError(
                    f"{store.uri_of(name)} records output settings {previous}, this run has {fp}: "
                    "the rewrite/generate/edit/score settings changed since that run. Write to a new "
                    "--out (or delete the folder); pool sizes and batch sizes may change freely.")
    store.write_json(S.RUN_FILE, {"config_fingerprint": fp,
                                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _select_kept(batch: pd.DataFrame, ids: frozenset, reasons: dict) -> pd.DataFrame:
    out = batch[batch["pair_id"].isin(ids)].copy()
    out["kept"] = True
    out["prune_reason"] = [reasons.get(p, "") for p in out["pair_id"]]
    return out

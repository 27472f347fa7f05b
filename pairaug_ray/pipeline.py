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

Augment: 1 the studies of the chosen splits, read on the driver → 2 plan candidates (deterministic
pair ids) and count those not yet written: none = a finished job, no Ray and no pool → 3-7 rewrite,
generate / edit, score, write the candidates: a pool per stage (``augment.profile: cluster``) or one
pool running them all (``local``, ``stages/local.py``) → 8-9 the streaming prune
(``stages/prune.py streaming_prune``: IntraAug means from per-shard partial sums, keep/prune and the
kept pairs' write per shard; skipped when the same candidates were pruned by the same rules) → 10
the manifest (``seconds``: ``to_first_candidate``, ``prune``, ``fixed`` = the two, ``total``).

Both jobs check what the driver can before Ray starts (the source listing; ``checks.py`` for the
rewrite backend, model folders, studies table and splits; the output folder's settings) and show
one ``console.StepProgress`` per step. The manifests give per stage the pool size, busy and wall
seconds (``stage_throughput``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pairaug_ray import __version__
from pairaug_ray import schema as S
from pairaug_ray.checks import check_augment, check_split_selection, describe_splits, split_counts
from pairaug_ray.console import StepProgress
from pairaug_ray.io.sources import DEFAULT_SPLIT_FRACTIONS, assign_hash_splits, list_items
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.runtime import RayConfig, check_placement, init_ray, stage_requirements
from pairaug_ray.stages.base import RESOURCE_FIELDS, TIMING_PREFIX, StageConfig, fingerprint, output_fingerprint
from pairaug_ray.stages.decode import DecodeConfig, DecodeStage
from pairaug_ray.stages.edit import EditConfig, unet_work_summary
from pairaug_ray.stages.generate import GenerateConfig
from pairaug_ray.stages.label import LabelConfig, LabelStage
from pairaug_ray.stages.local import LocalConfig
from pairaug_ray.stages.plan import PLAN_COLUMNS, pair_seed, plan_candidates  # noqa: F401 (re-exported)
from pairaug_ray.stages.prune import PruneConfig, StreamPruneConfig
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
    split_by: Literal["source", "patient_hash"] = Field(
        "source", description="source: the split file (MIMIC *split.csv[.gz]) or a manifest's split "
        "column, else '' (with a warning); patient_hash: studies the source gives no split get one by a "
        "hash of their patient id (same patient, same split, every run)")
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS),
        description="split_by=patient_hash: the share of patients per split")
    max_bad_fraction: float = Field(
        0.5, ge=0, le=1, description="the job fails (non-zero exit, a summary by class) when more than "
        "this share of the inputs in the output is quarantined for a defect (every class but "
        "non_frontal_view, a view filter); bad inputs are quarantined either way")
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
    profile: Literal["cluster", "local"] = Field(
        "cluster", description="cluster: one actor pool per stage (rewrite, generate, edit, score, "
        "write), each with its own resources; local: one pool (augment.local) whose actors run every "
        "model stage and the write on each batch, loading each model once (a laptop or one node)")
    local: LocalConfig = Field(default_factory=LocalConfig,
                               description="profile local: the one pool's size, CPUs and threads")
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    prune_tasks: StreamPruneConfig = Field(
        default_factory=StreamPruneConfig, description="where the pruning pass runs: the driver "
        "process for small tables, Ray tasks (shard groups) from ray_min_shards candidate shards on")
    write: WritePoolConfig = Field(default_factory=WritePoolConfig)
    report: bool = Field(True, description="write report.html with example grids and score histograms")
    kept_fidelity_pairs: int = Field(512, ge=0, description="kept pairs per branch (a seeded sample) "
                                     "whose classifier fidelity the scorer measures for the manifest "
                                     "and report.html (train.fidelity.kept_pair_fidelity); 0 = off")


def _sections(cfg, name: str, storage: StorageConfig | None, ray_cfg: RayConfig | None):
    """(section, storage, ray) from a whole job config (anything with ``.<name>``, ``.storage`` and
    ``.ray``, e.g. ``config.PairAugConfig``) or from the section itself plus the keywords."""
    if hasattr(cfg, name):
        return getattr(cfg, name), storage or cfg.storage, ray_cfg or cfg.ray
    return cfg, storage or StorageConfig(), ray_cfg or RayConfig()


class Progress:
    """Counts the summary rows streaming back (``status``, ``stage``, ``error_class``) and shows
    them as one ``console.StepProgress`` (a bar on a terminal, a line every ``every_s`` otherwise).
    ``counts``: rows per status, and per ``"error:<class>"``."""

    def __init__(self, label: str, total: int | None, every_s: float = 5.0, stream=None):
        self.bar = StepProgress(label, total, "rows", every_s=every_s, stream=stream)
        self.counts: Counter = Counter()

    def update(self, batch: pd.DataFrame) -> None:
        self.counts.update(batch["status"].tolist())
        bad = batch[batch["status"] == "error"]
        stages = bad["stage"] if "stage" in bad else [""] * len(bad)
        detail = Counter(f"{st}:{cls}" if st else str(cls) for st, cls in zip(stages, bad["error_class"]))
        for cls in bad["error_class"]:
            self.counts[f"error:{cls}"] += 1
        self.bar.update(len(batch), errors=len(bad), error_detail=detail)

    def note(self, text: str) -> None:
        self.bar.note(text)

    def close(self) -> None:
        self.bar.close()

    @property
    def done(self) -> int:
        return self.bar.done

    @property
    def seconds(self) -> float:
        return self.bar.seconds


def _note_splits(icfg, items: list[dict]) -> None:
    """Say when the source gives studies no split; with ``split_by=patient_hash``, assign one."""
    if not items or icfg.source.startswith("phantom://"):
        return  # PhantomCXR studies get their split (by patient) in the decode stage
    missing = sum(1 for it in items if not it["split"])
    if not missing:
        return
    if icfg.split_by == "patient_hash":
        assign_hash_splits(items, icfg.split_fractions)
        log.warning("ingest: %d of %d images had no split from the source; assigned by patient-id hash "
                    "(ingest.split_by=patient_hash): %s", missing, len(items),
                    describe_splits(split_counts(it["split"] for it in items)))
        return
    what = ("no split file was found under the source (MIMIC's *split.csv[.gz] with dicom_id and split "
            "columns at its root, or a `split` column in a manifest)" if missing == len(items)
            else "the split file (or the manifest's split column) gives them none")
    log.warning("ingest: %d of %d images get split '' because %s. `pairaug augment` (augment.splits, "
                "default [train]) and training (train.splits) select by split and will skip them. Add a "
                "split file, or set ingest.split_by=patient_hash to assign train/validate/test by a hash "
                "of the patient id (shares: ingest.split_fractions)", missing, len(items), what)


def run_ingest(cfg, *, storage: StorageConfig | None = None, ray: RayConfig | None = None) -> dict:
    """Decode, label and write a source's studies; returns the run manifest (also written).

    ``cfg`` is an ``IngestConfig`` (with ``storage``/``ray`` keywords) or a whole job config.
    """
    icfg, storage, ray_cfg = _sections(cfg, "ingest", storage, ray)
    import ray

    store = Store(icfg.out, storage)
    store.remove_incomplete()  # temporary files of a run killed mid-write
    # 1. List the source (no pixels: paths, ids and, for IU, report text), on the driver and before
    #    Ray starts: a wrong path or an empty source fails here in seconds.
    items = list_items(icfg.source, storage)
    _note_splits(icfg, items)
    init_ray(ray_cfg)
    check_placement(stage_requirements(icfg, "ingest"), ray_cfg)  # fail now, not hang in Ray Data

    # 2. Resume: rows already in the studies or quarantine table are not redone.
    done = set(store.read_column(S.STUDIES_DIR, "row_id")) | set(store.read_column(S.QUARANTINE_DIR, "row_id"))
    todo = [it for it in items if it["row_id"] not in done]

    progress = Progress("ingest", len(todo))
    progress.note(f"{icfg.source}: {len(items)} images listed, {len(items) - len(todo)} already written, "
                  f"{len(todo)} to do (decode → label → write)")
    ds = None
    clock = _StageClock()
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
            clock.update(batch)
    progress.close()

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
        "stage_throughput": _stage_throughput(
            clock.seconds, clock.rows, pools={"decode": icfg.decode, "label": icfg.label, "write": icfg.write},
            op_times=_operator_times(ds) if ds is not None else {}, write_rows=progress.done),
        **_bad_inputs(store, icfg.max_bad_fraction),
        "config_fingerprint": fingerprint(icfg, exclude={"out", "decode", "label", "write",
                                                         "max_bad_fraction"}) + "-"
        + fingerprint(icfg.decode, exclude={"batch_size", "min_actors", "max_actors", "num_cpus",
                                            "num_gpus", "accelerator_type", "resources", "label_selector",
                                            "storage"}),
        "version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_json(S.MANIFEST_FILE, manifest)
    return manifest


# Quarantine classes that select inputs rather than flag defects: not counted as bad.
NOT_DEFECTS = frozenset({"non_frontal_view"})


def _bad_inputs(store: Store, max_bad_fraction: float) -> dict:
    """Manifest fields judging the whole output (so a resumed run judges as an uninterrupted one):
    ``bad_fraction`` = inputs quarantined for a defect (not NOT_DEFECTS) / inputs in the output,
    ``bad_by_class``, ``max_bad_fraction`` and ``too_many_bad`` (bad_fraction > max_bad_fraction)."""
    classes = Counter(store.read_column(S.QUARANTINE_DIR, "error_class"))
    bad = {c: n for c, n in sorted(classes.items()) if c not in NOT_DEFECTS}
    total = len(store.read_column(S.STUDIES_DIR, "row_id")) + sum(classes.values())
    fraction = sum(bad.values()) / total if total else 0.0
    return {"bad_fraction": round(fraction, 4), "bad_by_class": bad, "max_bad_fraction": max_bad_fraction,
            "too_many_bad": fraction > max_bad_fraction}


# ----------------------------------------------------------------------------- augmentation

def _stage_throughput(totals: dict[str, float], rows: dict[str, int], *, pools: dict | None = None,
                      op_times: dict[str, dict] | None = None, write_rows: int = 0) -> dict:
    """Per stage: ``min_actors`` / ``max_actors`` of its pool (the config's), ``busy_seconds`` (time
    inside the stage's UDF summed over its batches, from the rows' ``_sec_<stage>`` columns; for the
    write stage, Ray Data's block wall times), ``rows_per_busy_s`` and ``wall_seconds`` (first
    batch start to last batch end of the stage's operator, from Ray Data's stats; actor start-up,
    e.g. loading a model, comes before it)."""
    pools, op_times = pools or {}, op_times or {}
    names = {k.removeprefix(TIMING_PREFIX) for k in totals} | set(pools)
    out = {}
    for name in sorted(names):
        fig: dict = {}
        if name in pools:
            fig.update(min_actors=pools[name].min_actors,
                       max_actors=max(pools[name].min_actors, pools[name].max_actors))
        sec, n = totals.get(TIMING_PREFIX + name), rows.get(TIMING_PREFIX + name, 0)
        if sec is None and name == "write" and op_times.get(name, {}).get("busy_seconds") is not None:
            sec, n = op_times[name]["busy_seconds"], write_rows
        if sec is not None:
            fig.update(busy_seconds=round(sec, 2), rows_per_busy_s=round(n / sec, 2) if sec else None)
        if op_times.get(name, {}).get("wall_seconds") is not None:
            fig["wall_seconds"] = op_times[name]["wall_seconds"]
        out[name] = fig
    return out


_STAGE_OP = re.compile(r"MapBatches\((\w+?)Stage\)")


def _operator_times(ds) -> dict[str, dict]:
    """``{stage: {"wall_seconds", "busy_seconds"}}`` from Ray Data's execution stats of ``ds``
    after it ran, for operators that map a ``<Name>Stage`` UDF (``MapBatches(GenerateStage)`` →
    ``generate``). Wall = the operator's first block start to last block end; busy = its blocks'
    wall times summed. Empty when the stats cannot be read."""
    try:
        summary = ds._get_stats_summary()  # Ray 2.60: Dataset.stats() has no structured public form
    except Exception as exc:  # noqa: BLE001 - figures for the manifest only
        log.debug("no Ray Data stats: %s", exc)
        return {}
    out: dict[str, dict] = {}
    pending = [summary]
    while pending:
        s = pending.pop()
        for op in s.operators_stats:
            busy = getattr(op.wall_time, "sum", None)
            for m in _STAGE_OP.finditer(op.operator_name):
                out.setdefault(m.group(1).lower(), {
                    "wall_seconds": round(op.time_total_s, 2) if op.time_total_s else None,
                    "busy_seconds": round(busy, 2) if busy else None})
        pending.extend(s.parents)
    return out


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
    t_start = time.perf_counter()
    acfg, storage, ray_cfg = _sections(cfg, "augment", storage, ray)
    import ray

    from pairaug_ray.stages.edit import EditStage
    from pairaug_ray.stages.generate import GenerateStage
    from pairaug_ray.stages.local import LocalStage, local_batch_rows, local_map_kwargs, torch_threads_for
    from pairaug_ray.stages.prune import streaming_prune
    from pairaug_ray.stages.rewrite import RewriteStage
    from pairaug_ray.stages.score import ScoreStage

    # 0. What the driver can check before Ray starts: the rewrite backend, the model folders, the
    #    studies table, the output folder's settings (checks.py, _check_output).
    check_augment(acfg, storage, ray_cfg)
    studies = Store(acfg.studies, storage)
    store = Store(acfg.out, storage)
    fp = output_fingerprint(acfg.rewrite, acfg.generate, acfg.edit, acfg.score)
    settings = output_settings(acfg)
    _check_output(store, fp, settings)
    store.remove_incomplete()  # temporary files of a run killed mid-write

    # 1. Studies to augment: the configured splits of the ingest table, text columns only (no
    #    pixels), read on the driver: a Ray read's file-listing task wants a whole CPU, which a
    #    small cluster with the stage pools already placed does not have. Splits that select no
    #    study stop the job here, before Ray starts.
    table = studies.read_table(S.STUDIES_DIR, columns=PLAN_COLUMNS)
    if table is None:
        raise FileNotFoundError(f"no studies table under {acfg.studies}: run `pairaug ingest` first")
    check_split_selection(table.column("split").to_pylist(), list(acfg.splits), acfg.studies)
    table = table.filter(pc.is_in(table.column("split"), pa.array(acfg.splits, pa.string())))
    if acfg.limit:
        table = table.slice(0, acfg.limit)
    # 2. Plan candidates with deterministic pair ids; drop those a previous run wrote (resume).
    #    Counted on the driver first: a finished job's re-run starts no Ray and no pool.
    done = frozenset(store.read_column(S.CANDIDATES_DIR, "pair_id")) | frozenset(
        store.read_column(S.QUARANTINE_DIR, "row_id"))
    per_study = acfg.inter_variants + acfg.intra_variants
    todo = _count_todo(table.column("row_id").to_pylist(), acfg, fp, done)
    local = acfg.profile == "local"
    inline_rewrite = not (acfg.rewrite.backend == "vllm" and acfg.rewrite.vllm.engine != "actor")
    t0 = time.perf_counter()
    ray_init_s = None
    if todo:
        ray_was_up = ray.is_initialized()
        init_ray(ray_cfg)
        ray_init_s = None if ray_was_up else round(time.perf_counter() - t0, 2)
        check_placement(_used_requirements(acfg, inline_rewrite), ray_cfg)  # fail now, not hang in Ray Data
    t0 = time.perf_counter()
    # local: blocks of one pool batch (whole studies), so every actor gets work from the first blocks on
    local_cfg = acfg.local.model_copy(update={"batch_size": local_batch_rows(
        acfg.local, [acfg.rewrite, acfg.generate, acfg.edit, acfg.score] if inline_rewrite
        else [acfg.generate, acfg.edit, acfg.score], per_study)})
    chunk = max(1, local_cfg.batch_size // max(per_study, 1)) if local else 16

    # 3-7. Rewrite → InterAug generate → IntraAug edit → score → write every scored candidate
    #      (+ quarantine; the pruning pass needs them persisted). cluster: an actor pool per stage;
    #      local: one pool running them all (stages/local.py).
    wcfg = WriteConfig(out=acfg.out, storage=storage, table=S.CANDIDATES_DIR, schema_name="pair",
                       summary_columns=["branch", "rewrite_rejections"], **acfg.write.model_dump())
    # the edit stage reads each IntraAug row's study image from the studies table (edit.source: real)
    edit_cfg = acfg.edit.model_copy(update={"studies": acfg.studies, "storage": storage})
    ds = None
    if todo:
        src = ray.data.from_arrow([table.slice(i, chunk) for i in range(0, max(table.num_rows, 1), chunk)])
        planned = src.map_batches(plan_candidates, batch_format="pandas", batch_size=chunk, num_cpus=0.25,
                                  fn_kwargs={"inter_variants": acfg.inter_variants,
                                             "intra_variants": acfg.intra_variants,
                                             "seed": acfg.seed, "fp": fp, "done": done})
        ds = planned
        if not inline_rewrite:
            from pairaug_ray.stages.rewrite_vllm import add_vllm_rewrite

            ds = add_vllm_rewrite(planned, acfg.rewrite)  # the ray.data.llm chain
        if local:
            ds = ds.map_batches(LocalStage, **local_map_kwargs(
                local_cfg, rewrite=acfg.rewrite if inline_rewrite else None, generate=acfg.generate,
                edit=edit_cfg, score=acfg.score, write=wcfg))
        else:
            if inline_rewrite:
                ds = ds.map_batches(RewriteStage, **acfg.rewrite.map_batches_kwargs(RewriteStage))
            ds = ds.map_batches(GenerateStage, **acfg.generate.map_batches_kwargs(GenerateStage))
            ds = ds.map_batches(EditStage, **edit_cfg.map_batches_kwargs(EditStage))
            ds = ds.map_batches(ScoreStage, **acfg.score.map_batches_kwargs(ScoreStage))
            ds = ds.map_batches(WriteStage, **wcfg.map_batches_kwargs(WriteStage))
    progress = Progress("augment", todo)
    progress.note(f"{table.num_rows} studies of splits {list(acfg.splits)} × {per_study} candidates, "
                  f"{len(done)} already written, {todo} to do (profile {acfg.profile}: "
                  + ("rewrite → generate / edit → score → write in one pool)" if local
                     else "rewrite → generate / edit → score → write)"))
    clock = _StageClock()
    by_branch: Counter = Counter()
    rejections: Counter = Counter()
    claimed = False
    first_candidate_s = None
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None) if ds is not None else ():
        if not claimed and (batch["status"] == "ok").any():  # a candidate is committed: claim now
            _claim_output(store, fp, settings)
            claimed = True
            first_candidate_s = round(time.perf_counter() - t_start, 2)
        progress.update(batch)
        clock.update(batch)
        if "rewrite_rejections" in batch:
            for s in batch["rewrite_rejections"].dropna():
                rejections.update(json.loads(s) if isinstance(s, str) and s else {})
        for (branch, status), n in batch.groupby(["branch", "status"]).size().items():
            by_branch[f"{branch}:{status}"] += int(n)
    progress.close()
    op_times = _operator_times(ds) if ds is not None else {}
    if local and "local" in op_times:  # every sub-stage ran inside the local operator
        op_times = {name: op_times["local"] for name in ("rewrite", "generate", "edit", "score", "write")}
    pass1_s = time.perf_counter() - t0

    # 8-9. Pruning, streamed shard by shard (stages/prune.py streaming_prune): pass 1 = the global
    #      IntraAug means from per-shard partial sums; pass 2 = keep/prune in the workers with only
    #      the means shipped, kept rows written to pairs/; only counts come back. Skipped when the
    #      same candidates were already pruned by the same rules (a finished job's re-run).
    t_prune = time.perf_counter()
    pruning = streaming_prune(store, acfg.prune, acfg.prune_tasks, candidates_dir=S.CANDIDATES_DIR,
                              pairs_dir=S.PAIRS_DIR, on_ray=lambda: init_ray(ray_cfg))
    prune_s = time.perf_counter() - t_prune
    means = pruning["intra_means"]
    if not pruning["shards"]:  # every row failed: finish anyway, so the manifest says why
        log.warning("no candidates were written under %s: every row is in the quarantine table "
                    "(see errors_by_stage_class and rewrite_rejections_this_run in the manifest)", acfg.out)

    # 10. Manifest and visual report.
    branch_counts = {}
    for branch in ("inter", "intra"):
        b = pruning["branches"].get(branch, {"candidates": 0, "kept": 0, "pruned": 0})
        branch_counts[branch] = {
            "candidates": b["candidates"],
            "kept": b["kept"],
            "pruned": b["pruned"],
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
        # UNet sample-steps counted by generate / edit, per candidate and per kept pair, vs the reference
        "unet_work": unet_work_summary(store, {b: c["kept"] for b, c in branch_counts.items()}),
        "pairs_total": pruning["pairs_total"],
        "errors_by_stage_class": dict(sorted(errors.items())),
        "rewrite_rejections_this_run": dict(sorted(rejections.items())),
        "intra_means": means,
        "prune": acfg.prune.model_dump(),
        "prune_reasons": pruning["prune_reasons"],
        "prune_pass": {k: pruning[k] for k in ("skipped", "ran_on", "shards", "seconds")},
        "profile": {"name": acfg.profile, **({"actors": [acfg.local.min_actors, acfg.local.max_actors],
                                              "batch_rows": local_cfg.batch_size,
                                              "num_cpus": acfg.local.num_cpus,
                                              "torch_threads": torch_threads_for(acfg.local)} if local else {})},
        "stage_throughput": _stage_throughput(
            clock.seconds, clock.rows, op_times=op_times, write_rows=progress.done,
            pools={name: acfg.local if local else getattr(acfg, name)
                   for name in ("rewrite", "generate", "edit", "score", "write")}),
        "seconds": {"generate_and_score": round(pass1_s, 2), "prune": round(prune_s, 2),
                    "to_first_candidate": first_candidate_s, "ray_init": ray_init_s,
                    "fixed": round(first_candidate_s + prune_s, 2) if first_candidate_s is not None else None,
                    "total": round(total_s, 2)},
        "pairs_per_s": round(progress.counts.get("ok", 0) / pass1_s, 3) if pass1_s else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if acfg.kept_fidelity_pairs and pruning["pairs_total"]:
        manifest["kept_pair_fidelity"] = _kept_fidelity(store, acfg)
    if acfg.report:
        from pairaug_ray.run_report import write_report

        manifest["report"] = store.uri_of(write_report(
            store, studies, inter_threshold=acfg.prune.inter_threshold,
            intra_margin=acfg.prune.intra_margin, intra_means=means,
            kept_fidelity=manifest.get("kept_pair_fidelity")))
    store.write_json(S.MANIFEST_FILE, manifest)
    return manifest


def _kept_fidelity(store: Store, acfg) -> dict | None:
    """Classifier fidelity of the kept pairs, scored by the run's scorer on the driver (a sample of
    ``kept_fidelity_pairs`` per branch); None (logged) when it cannot be measured."""
    from pairaug_ray.train.fidelity import kept_pair_fidelity

    table = store.read_table(S.PAIRS_DIR, columns=["branch", "image_png", "labels"])
    if table is None or not table.num_rows:
        return None
    table = table.filter(pc.is_in(table["branch"], pa.array(["inter", "intra"])))
    try:
        return kept_pair_fidelity(table, acfg.score.model, max_pairs=acfg.kept_fidelity_pairs, seed=acfg.seed)
    except Exception as e:  # a measurement, not the job's output: never fail a finished job on it
        log.warning("kept-pair fidelity not measured: %s: %s", type(e).__name__, e)
        return None


OUTPUT_SECTIONS = ("rewrite", "generate", "edit", "score")


def output_settings(acfg) -> dict[str, dict]:
    """The settings behind the output fingerprint, per section (``{"rewrite": {...}, ...}``): each
    stage config's dump (``fingerprint_dump`` where a config has one) without ``RESOURCE_FIELDS``;
    ``output_fingerprint`` hashes exactly these."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in RESOURCE_FIELDS}
        return node

    out = {}
    for name in OUTPUT_SECTIONS:
        cfg = getattr(acfg, name)
        out[name] = strip(cfg.fingerprint_dump() if hasattr(cfg, "fingerprint_dump") else cfg.model_dump(mode="json"))
    return out


def settings_diff(before: dict, after: dict, prefix: str = "augment") -> list[str]:
    """``"augment.generate.steps: 10 → 20"`` per dotted key whose value differs (added and removed
    keys included), sorted."""
    def flat(node, path, out):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                flat(v, f"{path}.{k}", out)
        else:
            out[path] = node
        return out

    a, b = flat(before or {}, prefix, {}), flat(after or {}, prefix, {})
    missing = object()
    return [f"{k}: {json.dumps(a.get(k)) if k in a else '(unset)'} → {json.dumps(b.get(k)) if k in b else '(unset)'}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _check_output(store: Store, fp: str, settings: dict) -> None:
    """Refuse an output folder that holds candidates made with other output settings, naming the
    settings that differ: pair ids embed the fingerprint, so a resumed run would add a second set
    beside the first and pruning and training would mix them. A folder without candidates (a run
    that failed before writing one, e.g. on a typo) is free: the claim (``run.json``) is written
    only when the first candidate is committed (``_claim_output``)."""
    table = S.CANDIDATES_DIR if store.shards(S.CANDIDATES_DIR) else S.PAIRS_DIR
    present = {f for f in store.read_column(table, "config_fingerprint") if f}
    if not present or present == {fp}:
        return
    previous = None
    if store.exists(S.RUN_FILE):
        run = store.read_json(S.RUN_FILE)
        if run.get("config_fingerprint") in present:
            previous = run
    old_fp = (previous or {}).get("config_fingerprint") or sorted(present)[0]
    if previous and previous.get("settings"):
        changed = settings_diff(previous["settings"], settings)
        what = "changed settings:\n    " + "\n    ".join(changed or ["(none in run.json: the fingerprint covers something run.json does not, e.g. after a pairaug upgrade)"])
    else:
        what = (f"{store.uri_of(S.RUN_FILE)} does not record the settings of that run (an older "
                "pairaug, or a crash before it was written), so which keys changed is not known")
    raise ValueError(
        f"{store.uri_of(table)} holds candidates made with other output settings (fingerprint "
        f"{old_fp}; this run: {fp}); {what}\n"
        "Pair ids embed these settings, so the two sets would mix in pruning and training. Change "
        "them back, write to a new --out, or delete the folder; pool sizes, batch sizes and devices "
        "may change freely.")


def _claim_output(store: Store, fp: str, settings: dict) -> None:
    """Record the output settings of the candidates in this folder (``run.json``): written when the
    first candidate is committed, read by ``_check_output`` to name what a later run changed."""
    store.write_json(S.RUN_FILE, {"config_fingerprint": fp, "settings": settings,
                                  "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _count_todo(row_ids: list[str], acfg, fp: str, done: frozenset) -> int:
    """How many of the candidates planned for ``row_ids`` (``stages/plan.py``: same ids) are not
    in ``done``: 0 = a finished job, nothing for Ray to do."""
    from pairaug_ray.stages.plan import pair_id_of
    from pairaug_ray.vocab import INTER, INTRA

    n = 0
    for rid in row_ids:
        for branch, variants in ((INTER, acfg.inter_variants), (INTRA, acfg.intra_variants)):
            for v in range(variants):
                n += pair_id_of(rid, branch, v, fp, pair_seed(rid, branch, v, acfg.seed)) not in done
    return n


def _used_requirements(acfg, inline_rewrite: bool) -> list:
    """The placement requirements of the pools this run starts: ``augment.local`` in the local
    profile (plus the rewrite chain's pool when it runs outside it), every stage pool but
    ``augment.local`` in the cluster profile."""
    reqs = stage_requirements(acfg, "augment")
    if acfg.profile == "local":
        keep = {"augment.local"} | (set() if inline_rewrite else {"augment.rewrite"})
    else:
        keep = {r.stage for r in reqs} - {"augment.local"}
    return [r for r in reqs if ".".join(r.stage.split(".")[:2]) in keep]

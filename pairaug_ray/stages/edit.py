"""IntraAug image stage: edit the study's own radiograph into each rewrite with prompt-to-prompt.

Usage::

    cfg = EditConfig(model="tiny://sd?size=64", steps=10, sampler="dpm++", batch_size=16,
                     studies="runs/ingest")          # the augment job sets studies and storage
    ds = pairs.map_batches(EditStage, **cfg.map_batches_kwargs(EditStage))

Rows of branch ``"intra"`` need ``report`` (the source text), ``rewritten_report``, ``seed`` and
``pair_id``; with ``source: real`` (the default) also the study image: the row's
``study_image_png`` (the Serve app puts the request's image there) or, by ``source_row_id``, the
``image_png`` of the studies table named by ``studies`` (read here, a Parquet shard at a time, so
no image travels through the rewrite and generate stages and no InterAug row ever carries one).

``source: real``: every study of a batch is inverted ONCE (``models/inversion.py``: VAE encode,
then the sampler's inverse scheduler, one UNet sample per step; ``inversion`` picks how the edit
stays on the trajectory: direct / negative_prompt / null_text / ddim), and all its variants are
edited in one prompt-to-prompt run from that inversion, sharing one source branch
(``p2p.p2p_edit_real``). Recent inversions are kept per actor (``inversion_cache`` studies), so a
study whose variants land in two batches of the same actor is still inverted once. A row without an
image is edited from noise (``missing_image: noise``, logged, ``edit_source`` says so) or fails with
``missing_study_image`` (``missing_image: error``).

``source: noise`` (the reference): the source is a generation of the source report from the row's
seed (``p2p.p2p_edit_many``); the variants of one report with one seed share it.

All intra rows of a batch go through as few batched runs as ``max_variants_per_call`` allows (a
study is never split unless it alone has more variants); if a run fails, its studies are redone one
by one so one bad study does not sink the others.

Each edited row comes out with ``image_png`` (the edit), ``source_image_png`` (the source branch:
the reconstruction of the real image, or the noise generation; the reference of the Δimage score),
``generator_model``, ``edit_source`` ("real" | "noise"), ``sampler``, ``unet_sample_steps`` (the
UNet sample-steps counted for this row: its own target samples + an equal share of its study's
source branch and inversion, CFG counted), and for real rows ``inversion_method``,
``inversion_psnr`` (dB, the reconstruction against the real image at the model's size) and
``inversion_sample_steps`` (this row's share of its study's inversion). A row's images depend only
on its own report, rewrite, seed and image, never on which rows share its batch (up to float
rounding). Other rows pass through unchanged.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from pairaug_ray.io.dicom import decode_png, encode_png
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.models.diffusion import load_sd_pipeline, truncate_prompt
from pairaug_ray.models.inversion import METHODS, Inversion, InversionSettings, invert_images, psnr
from pairaug_ray.models.p2p import P2PSettings, p2p_edit_many, p2p_edit_real
from pairaug_ray.models.schedulers import INVERSE_SAMPLERS, SAMPLER_NAMES, check_sampler
from pairaug_ray.stages.base import RowStage, StageConfig, StageError

log = logging.getLogger(__name__)

BRANCH = "intra"
STUDY_IMAGE_COLUMN = "study_image_png"  # the Serve app's request image (serve/deployments.py)
REAL, NOISE = "real", "noise"
# The reference's IntraAug recipe (prompt-to-prompt, 10 variants per report, each its own
# source + target generation from noise, DDIM 75 steps, guidance 7.5 -> CFG): UNet sample-steps.
REFERENCE_INTRA = {"variants": 10, "steps": 75, "branches": 2, "cfg": 2}
REFERENCE_INTRA_PER_CANDIDATE = REFERENCE_INTRA["steps"] * REFERENCE_INTRA["branches"] * REFERENCE_INTRA["cfg"]
# Fields that say where the job reads from or how much it caches, not what it makes.
_NOT_OUTPUT = {"studies", "storage", "inversion_cache", "image_cache_shards"}


class EditConfig(StageConfig):
    model: str = Field("tiny://sd", description="tiny://sd?..., a local diffusers folder or a hub id")
    sampler: str = Field("ddim", description=f"diffusers sampler: one of {list(SAMPLER_NAMES)}; "
                         f"source: real needs one with an inverse scheduler ({list(INVERSE_SAMPLERS)})")
    steps: int = Field(75, ge=1, description="sampler steps (the reference: 75 DDIM)")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance; <= 1 = none")
    source: Literal["real", "noise"] = Field(
        "real", description="real: edit the study's own image (inverted once per study); noise: edit a "
        "generation of the source report (the reference)")
    missing_image: Literal["noise", "error"] = Field(
        "noise", description="source: real, a row without a study image: edit from noise, or fail the row")
    inversion: Literal["direct", "negative_prompt", "null_text", "ddim"] = Field(
        "direct", description=f"how the edit stays on the real image's trajectory: one of {list(METHODS)} "
        "(models/inversion.py); null_text is ~10x dearer and needs sampler ddim")
    null_text_iterations: int = Field(10, ge=1, description="null_text: Adam steps per sampler step")
    strength: float = Field(1.0, gt=0, le=1, description="source: real: start the edit from the "
                            "inverted latent at this fraction of the noise schedule and run that "
                            "fraction of the steps (1.0 = fully inverted; lower keeps more of the "
                            "patient's image, as img2img's strength)")
    cross_replace: float = Field(0.5, ge=0, le=1, description="steps fraction, cross-attn control")
    self_replace: float = Field(0.2, ge=0, le=1, description="steps fraction, self-attn control")
    edit: Literal["refine", "replace"] = "refine"
    self_replace_max_tokens: int = Field(256, ge=1, description="layers with <= this many positions")
    blend_words: list[str] = Field(default_factory=list, description="LocalBlend words; empty = off")
    blend_threshold: float = Field(0.3, ge=0, le=1)
    image_size: int | None = Field(None, ge=8, description="pixels; None = the model's native size")
    max_variants_per_call: int = Field(16, ge=1, description="edits per batched run; the UNet batch "
                                       "is <= 4 per edit (source + target, CFG)")
    png_bits: int = Field(16, description="8 or 16")
    device: str = Field("auto", description='"auto" = cuda when the stage has GPUs, else cpu')
    dtype: str = Field("auto", description='"auto" = float16 on cuda, float32 on cpu')
    studies: str | None = Field(None, description="set by the augment job: the ingest folder whose "
                                "studies table holds the rows' source images (by source_row_id)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    inversion_cache: int = Field(64, ge=0, description="inversions kept per actor (studies)")
    image_cache_shards: int = Field(2, ge=1, description="studies-table shards of images kept per actor")

    @model_validator(mode="after")
    def _check_sampler(self):
        check_sampler(self.sampler, invert=self.source == REAL)
        if self.source == REAL and self.inversion == "null_text" and self.sampler != "ddim":
            raise ValueError("edit.inversion: null_text optimises through DDIM steps: set edit.sampler: ddim")
        return self

    def fingerprint_dump(self) -> dict:
        """What decides the outputs: everything but where images are read from and cache sizes
        (resource fields are dropped by ``output_fingerprint``)."""
        return self.model_dump(mode="json", exclude=_NOT_OUTPUT)


def p2p_settings(cfg: EditConfig) -> P2PSettings:
    """The prompt-to-prompt settings of an edit stage config (shared with the benchmarks)."""
    return P2PSettings(steps=cfg.steps, guidance_scale=cfg.guidance_scale, cross_replace=cfg.cross_replace,
                       self_replace=cfg.self_replace, edit=cfg.edit,
                       local_blend_words=tuple(cfg.blend_words) or None, blend_threshold=cfg.blend_threshold,
                       self_replace_max_tokens=cfg.self_replace_max_tokens, image_size=cfg.image_size,
                       sampler=cfg.sampler, strength=cfg.strength)


def inversion_settings(cfg: EditConfig) -> InversionSettings:
    """The inversion settings of an edit stage config (``source: real``)."""
    return InversionSettings(method=cfg.inversion, sampler=cfg.sampler, steps=cfg.steps,
                             guidance_scale=cfg.guidance_scale, null_text_iterations=cfg.null_text_iterations)


def _seed_of(row: dict) -> int | None:
    seed = row.get("seed")
    if seed is None or isinstance(seed, float) and not np.isfinite(seed):
        return None
    return int(seed)


class StudyImages:
    """The studies table's ``image_png`` by ``row_id``, read a shard at a time.

    The first lookup reads the ``row_id`` column of every shard (ids only, no pixels) to know which
    shard holds which row; after that a lookup reads, per shard it needs, the ``row_id`` and
    ``image_png`` columns of that shard once, and keeps the last ``cache_shards`` shards' images
    (consecutive batches of the augment job come from the same shards). ``bytes_read`` and
    ``shard_reads`` count the image data read.
    """

    def __init__(self, studies: str, storage: StorageConfig | None = None, cache_shards: int = 2):
        self.store = Store(studies, storage)
        self.cache_shards = cache_shards
        self._shard_of: dict[str, str] | None = None
        self._cache: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self.shard_reads = 0
        self.bytes_read = 0

    def _read(self, shard: str, columns: list[str]):
        with self.store.fs.open(shard, "rb") as f:
            return pq.read_table(f, columns=columns)

    def _index(self) -> dict[str, str]:
        if self._shard_of is None:
            self._shard_of = {}
            for shard in self.store.shards("studies"):
                for rid in self._read(shard, ["row_id"]).column("row_id").to_pylist():
                    self._shard_of[rid] = shard
        return self._shard_of

    def get(self, row_ids: list[str]) -> dict[str, bytes]:
        """``{row_id: image_png}`` for the ids found (missing ids are left out)."""
        index = self._index()
        out: dict[str, bytes] = {}
        by_shard: dict[str, list[str]] = {}
        for rid in dict.fromkeys(row_ids):
            if rid in index:
                by_shard.setdefault(index[rid], []).append(rid)
        for shard, ids in by_shard.items():
            if shard not in self._cache:
                t = self._read(shard, ["row_id", "image_png"])
                images = dict(zip(t.column("row_id").to_pylist(), t.column("image_png").to_pylist()))
                self.shard_reads += 1
                self.bytes_read += sum(len(v) for v in images.values() if v)
                self._cache[shard] = images
                while len(self._cache) > self.cache_shards:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(shard)
            images = self._cache[shard]
            out.update({rid: images[rid] for rid in ids if images.get(rid)})
        return out


class EditStage(RowStage):
    name = "edit"

    def __init__(self, config: EditConfig):
        super().__init__(config)
        self.cfg = config
        device = config.device
        if device == "auto":
            device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.pipe = load_sd_pipeline(config.model, device=device, dtype=config.dtype)
        self.settings = p2p_settings(config)
        self.inv_settings = inversion_settings(config) if config.source == REAL else None
        self.images = (StudyImages(config.studies, config.storage, config.image_cache_shards)
                       if config.studies and config.source == REAL else None)
        self._inversions: OrderedDict[tuple, Inversion] = OrderedDict()
        self.inversions_run = 0  # studies inverted by this actor (a study's variants share one)
        self.inversion_sample_steps = 0.0
        self._warned = False

    def _prompt(self, text: str) -> str:
        return truncate_prompt(self.pipe.tokenizer, text)

    # ------------------------------------------------------------ from noise (the reference)

    def edit(self, report: str, variants: list[tuple[str, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(source image, edited image) per ``(rewritten report, seed)`` of one source report, from noise."""
        return self.edit_many([(report, text, seed) for text, seed in variants])

    def edit_many(self, edits: list[tuple[str, str, int]],
                  work: list | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(source image, edited image) per ``(source report, rewritten report, seed)``, batched, from
        noise; ``work`` receives each edit's UNet sample-steps."""
        cfg = self.cfg
        prompt = self._prompt
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(edits), cfg.max_variants_per_call):
            chunk = edits[start : start + cfg.max_variants_per_call]
            out += p2p_edit_many(self.pipe, [(prompt(report), prompt(text), seed) for report, text, seed in chunk],
                                 self.settings, work=work)
        return out

    # ------------------------------------------------------------ from the real image

    def invert(self, studies: list[tuple[bytes, str]]) -> list[Inversion]:
        """One ``Inversion`` per ``(image PNG, source report)``: from the actor's cache, or all the
        missing ones in one batched inversion."""
        return self._invert(studies)[0]

    def _invert(self, studies: list[tuple[bytes, str]]) -> tuple[list[Inversion], list[float]]:
        """(inversions, UNet sample-steps charged per study): an inversion's cost is charged once,
        to the first study that needed it; cached ones cost nothing."""
        keys = [(hashlib.blake2b(png, digest_size=16).digest(), self._prompt(report), self.inv_settings)
                for png, report in studies]
        todo = list(dict.fromkeys(k for k in keys if k not in self._inversions))
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            images = [decode_png(studies[first[k]][0]) for k in todo]
            made = invert_images(self.pipe, images, [k[1] for k in todo], self.inv_settings,
                                 size=self.cfg.image_size)
            self.inversions_run += len(made)
            for k, inv in zip(todo, made):
                self.inversion_sample_steps += inv.unet_sample_steps
                self._inversions[k] = inv
        found = [self._inversions[k] for k in keys]
        fresh = set(todo)
        charged = []
        for k, inv in zip(keys, found):
            charged.append(inv.unet_sample_steps if k in fresh else 0.0)
            fresh.discard(k)
            self._inversions.move_to_end(k)
        while len(self._inversions) > max(self.cfg.inversion_cache, len(set(keys))):
            self._inversions.popitem(last=False)
        return found, charged

    def edit_real(self, studies: list[tuple[bytes, str]], edits: list[tuple[int, str]],
                  work: list | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[Inversion], list[float]]:
        """Edits ``(study index, rewritten report)`` of ``studies`` ``(image PNG, source report)``:
        (reconstruction, edited image) per edit, the studies' inversions and the inversion
        sample-steps charged per study (0 for one served from the cache). Studies are packed whole
        into runs of at most ``max_variants_per_call`` edits; ``work`` receives each edit's
        sample-steps in those runs."""
        inversions, charged = self._invert(studies)
        by_study: dict[int, list[int]] = {}
        for j, (s, _) in enumerate(edits):
            by_study.setdefault(s, []).append(j)
        cap = self.cfg.max_variants_per_call
        pieces = [members[k:k + cap] for members in by_study.values() for k in range(0, len(members), cap)]
        runs: list[list[int]] = []
        for piece in pieces:
            if runs and len(runs[-1]) + len(piece) <= cap:
                runs[-1] += piece
            else:
                runs.append(list(piece))
        out: list = [None] * len(edits)
        shares = [0.0] * len(edits)
        for run in runs:
            run_work: list = []
            pairs = p2p_edit_real(self.pipe, inversions, [(edits[j][0], self._prompt(edits[j][1])) for j in run],
                                  self.settings, work=run_work)
            for j, pair, w in zip(run, pairs, run_work):
                out[j], shares[j] = pair, float(w)
        if work is not None:
            work.extend(shares)
        return out, inversions, charged

    # ------------------------------------------------------------ rows

    def _study_images(self, rows: list[dict], idx: list[int]) -> dict[int, bytes]:
        """Row index -> the study image PNG for rows that have one (own column, else the table)."""
        found: dict[int, bytes] = {}
        need: dict[int, str] = {}
        for i in idx:
            own = rows[i].get(STUDY_IMAGE_COLUMN)
            if isinstance(own, (bytes, bytearray)) and own:
                found[i] = bytes(own)
            elif self.images is not None and isinstance(rows[i].get("source_row_id"), str):
                need[i] = rows[i]["source_row_id"]
        if need:
            table = self.images.get(list(need.values()))
            found.update({i: table[rid] for i, rid in need.items() if rid in table})
        return found

    def _why_no_image(self, row: dict) -> str:
        if self.images is None:
            return (f"the row has no {STUDY_IMAGE_COLUMN} and the edit stage was given no studies table "
                    "(augment sets edit.studies)")
        return (f"source_row_id {row.get('source_row_id')!r} has no image_png in the studies table "
                f"{self.images.store.uri}")

    def process(self, rows: list[dict]) -> list:
        results: list = [[row] for row in rows]  # non-intra rows pass through
        valid = []
        for i, row in enumerate(rows):
            if row.get("branch") != BRANCH:
                continue
            report, rewrite = row.get("report"), row.get("rewritten_report")
            if not isinstance(report, str) or not report.strip():
                results[i] = StageError("missing_report", "intra row has no source report text")
            elif not isinstance(rewrite, str) or not rewrite.strip():
                results[i] = StageError("missing_report", "intra row has no rewritten_report text")
            elif _seed_of(row) is None:
                results[i] = StageError("missing_seed", "intra row has no seed")
            else:
                valid.append(i)
        real: dict[int, bytes] = {}
        if self.cfg.source == REAL and valid:
            real = self._study_images(rows, valid)
            missing = [i for i in valid if i not in real]
            if missing:
                why = self._why_no_image(rows[missing[0]])
                if self.cfg.missing_image == "error":
                    for i in missing:
                        results[i] = StageError("missing_study_image", "edit.source is real but "
                                                + self._why_no_image(rows[i]) + " (edit.missing_image: error)")
                    valid = [i for i in valid if i in real]
                else:
                    # once per actor as a warning (a Serve request without an image is no surprise)
                    (log.debug if self._warned else log.warning)(
                        "edit: %d IntraAug row(s) have no study image, edited from noise "
                        "(edit.missing_image: noise); e.g. %s", len(missing), why)
                    self._warned = True
        noise_rows = [i for i in valid if i not in real]
        self._edit_noise(rows, noise_rows, results)
        self._edit_real(rows, [i for i in valid if i in real], real, results)
        return results

    def _row_out(self, row: dict, source: np.ndarray, edited: np.ndarray, **extra) -> list[dict]:
        out = {k: v for k, v in row.items() if k != STUDY_IMAGE_COLUMN}
        return [{**out, "image_png": encode_png(edited, bits=self.cfg.png_bits),
                 "source_image_png": encode_png(source, bits=self.cfg.png_bits),
                 "generator_model": self.cfg.model, "sampler": self.cfg.sampler, **extra}]

    def _edit_noise(self, rows: list[dict], idx: list[int], results: list) -> None:
        if not idx:
            return
        groups: dict[str, list[int]] = {}
        for i in idx:
            groups.setdefault(rows[i]["report"], []).append(i)
        members = [i for group in groups.values() for i in group]
        done: dict[int, tuple] = {}
        try:
            work: list = []
            pairs = self.edit_many([(rows[i]["report"], rows[i]["rewritten_report"], _seed_of(rows[i]))
                                    for i in members], work)
            done = {i: (p, w) for i, p, w in zip(members, pairs, work)}
        except Exception:  # noqa: BLE001 - redo study by study: one study must not sink the batch
            for report, group in groups.items():
                try:
                    work = []
                    pairs = self.edit_many([(report, rows[i]["rewritten_report"], _seed_of(rows[i]))
                                            for i in group], work)
                except Exception as exc:  # noqa: BLE001 - this study's rows become error rows
                    for i in group:
                        results[i] = exc
                    continue
                done.update({i: (p, w) for i, p, w in zip(group, pairs, work)})
        for i, ((source, edited), w) in done.items():
            results[i] = self._row_out(rows[i], source, edited, edit_source=NOISE, unet_sample_steps=float(w))

    def _edit_real(self, rows: list[dict], idx: list[int], images: dict[int, bytes], results: list) -> None:
        if not idx:
            return
        study_of_key: dict[tuple, int] = {}
        studies: list[tuple[bytes, str]] = []
        row_study: dict[int, int] = {}
        for i in idx:
            key = (images[i], rows[i]["report"])
            if key not in study_of_key:
                study_of_key[key] = len(studies)
                studies.append(key)
            row_study[i] = study_of_key[key]

        def run(members: list[int], study_list: list[tuple[bytes, str]], local: dict[int, int]) -> None:
            work: list = []
            pairs, invs, charged = self.edit_real(
                study_list, [(local[i], rows[i]["rewritten_report"]) for i in members], work)
            n_rows = np.bincount([local[i] for i in members], minlength=len(study_list))
            for i, (source, edited), w in zip(members, pairs, work):
                s = local[i]
                inv_share = charged[s] / n_rows[s]
                results[i] = self._row_out(
                    rows[i], source, edited, edit_source=REAL, inversion_method=self.cfg.inversion,
                    inversion_psnr=float(psnr(source, invs[s].image)),
                    inversion_sample_steps=float(inv_share), unet_sample_steps=float(w) + float(inv_share))

        try:
            run(idx, studies, row_study)
        except Exception:  # noqa: BLE001 - redo study by study: one study must not sink the batch
            for key, s in study_of_key.items():
                group = [i for i in idx if row_study[i] == s]
                try:
                    run(group, [key], {i: 0 for i in group})
                except Exception as exc:  # noqa: BLE001 - this study's rows become error rows
                    for i in group:
                        results[i] = exc


# ---------------------------------------------------------------- the manifest's UNet figures

def _read_columns(store: Store, table_dir: str, columns: list[str]):
    """The columns of ``table_dir`` that its shards have (missing ones as nulls: tables written
    before a column existed); None when there is no table."""
    import pyarrow as pa

    tables = []
    for shard in store.shards(table_dir):
        with store.fs.open(shard, "rb") as f:
            present = set(pq.read_schema(f).names)
        with store.fs.open(shard, "rb") as f:
            t = pq.read_table(f, columns=[c for c in columns if c in present])
        for c in columns:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.float64() if c != "edit_source" else pa.string()))
        tables.append(t.select(columns))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def unet_work_summary(store: Store, kept: dict[str, int], candidates_dir: str = "candidates") -> dict:
    """The manifest's ``unet_work``: per branch the UNet sample-steps counted by the generate and
    edit stages (the rows' ``unet_sample_steps``, summed over every candidate of the run folder,
    pruned ones included), per candidate and per kept pair (``kept``: kept pairs per branch), next to
    the reference recipe's count computed from its settings (InterAug: 50 steps x CFG = 100 per
    candidate; IntraAug: 10 variants x 75 steps x (source + target) x CFG = 3,000 per study = 300
    per candidate) and, per kept pair, at the same keep rate. ``ratio_per_kept_pair`` = ours /
    the reference's. IntraAug also gets its rows per ``edit_source``, the mean reconstruction PSNR
    (dB) of real-image rows and the inversion's share of the work.
    """
    from pairaug_ray.stages.generate import REFERENCE_INTER, REFERENCE_INTER_PER_CANDIDATE

    cols = ["branch", "unet_sample_steps", "edit_source", "inversion_psnr", "inversion_sample_steps"]
    table = _read_columns(store, candidates_dir, cols)
    rows = table.to_pandas() if table is not None else None
    reference = {
        "inter": {"per_candidate": REFERENCE_INTER_PER_CANDIDATE,
                  "recipe": f"{REFERENCE_INTER['steps']} steps x CFG"},
        "intra": {"per_candidate": REFERENCE_INTRA_PER_CANDIDATE,
                  "per_study": REFERENCE_INTRA_PER_CANDIDATE * REFERENCE_INTRA["variants"],
                  "recipe": f"{REFERENCE_INTRA['variants']} variants x {REFERENCE_INTRA['steps']} steps x "
                            "(source + target) x CFG"},
    }
    out: dict = {}
    for branch in ("inter", "intra"):
        b = rows[rows["branch"] == branch] if rows is not None else None
        n = 0 if b is None else len(b)
        counted = b["unet_sample_steps"].dropna() if n else []
        total = float(np.sum(counted)) if n else 0.0
        k = int(kept.get(branch, 0))
        ref = reference[branch]
        fig = {"sample_steps": round(total, 1), "candidates": n, "candidates_counted": int(len(counted)),
               "kept": k,
               "per_candidate": round(total / n, 2) if n else None,
               "per_kept_pair": round(total / k, 2) if k else None,
               "reference": {**ref,
                             "per_kept_pair": round(ref["per_candidate"] * n / k, 2) if k else None}}
        if n:
            fig["ratio_per_candidate"] = round(fig["per_candidate"] / ref["per_candidate"], 4)
        if k:
            fig["ratio_per_kept_pair"] = round(fig["per_kept_pair"] / fig["reference"]["per_kept_pair"], 4)
        if branch == "intra" and n:
            sources = b["edit_source"].fillna("unrecorded").value_counts()
            fig["edit_source"] = {str(key): int(v) for key, v in sources.items()}
            real = b[b["edit_source"] == REAL]
            if len(real):
                fig["inversion_psnr_mean_db"] = round(float(real["inversion_psnr"].mean()), 2)
                fig["inversion_sample_steps"] = round(float(real["inversion_sample_steps"].sum()), 1)
        out[branch] = fig
    return out

"""IntraAug image stage: edit the source report's generation into each rewrite with prompt-to-prompt.

Usage::

    cfg = EditConfig(model="tiny://sd?size=64", steps=10, batch_size=16)
    ds = pairs.map_batches(EditStage, **cfg.map_batches_kwargs(EditStage))

Rows of branch ``"intra"`` need ``report`` (the source text), ``rewritten_report``, ``seed`` and
``pair_id``. All IntraAug rows of a batch (the variants of every study in it) go through one
batched prompt-to-prompt run (``p2p_edit_many``: one UNet call per step for all of them, up to
``max_variants_per_call`` edits; if that run fails, the batch is redone study by study so one bad
study does not sink the others). Each row comes
out with ``image_png`` (the edited image), ``source_image_png`` (the source report's generation from
the same seed, the reference of the Δimage score) and ``generator_model``. A row's images depend
only on its own report, rewrite and seed, never on which rows share its batch. Other rows pass
through unchanged.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pairaug_ray.io.dicom import encode_png
from pairaug_ray.models.diffusion import load_sd_pipeline, truncate_prompt
from pairaug_ray.models.p2p import P2PSettings, p2p_edit_many
from pairaug_ray.stages.base import RowStage, StageConfig, StageError

BRANCH = "intra"


class EditConfig(StageConfig):
    model: str = Field("tiny://sd", description="tiny://sd?..., a local diffusers folder or a hub id")
    steps: int = Field(75, ge=1, description="DDIM steps (the reference: 75)")
    guidance_scale: float = Field(4.0, ge=0)
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


def p2p_settings(cfg: EditConfig) -> P2PSettings:
    """The prompt-to-prompt settings of an edit stage config (shared with the benchmarks)."""
    return P2PSettings(steps=cfg.steps, guidance_scale=cfg.guidance_scale, cross_replace=cfg.cross_replace,
                       self_replace=cfg.self_replace, edit=cfg.edit,
                       local_blend_words=tuple(cfg.blend_words) or None, blend_threshold=cfg.blend_threshold,
                       self_replace_max_tokens=cfg.self_replace_max_tokens, image_size=cfg.image_size)


def _seed_of(row: dict) -> int | None:
    seed = row.get("seed")
    if seed is None or isinstance(seed, float) and not np.isfinite(seed):
        return None
    return int(seed)


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

    def _prompt(self, text: str) -> str:
        return truncate_prompt(self.pipe.tokenizer, text)

    def edit(self, report: str, variants: list[tuple[str, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(source image, edited image) per ``(rewritten report, seed)`` of one source report."""
        return self.edit_many([(report, text, seed) for text, seed in variants])

    def edit_many(self, edits: list[tuple[str, str, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(source image, edited image) per ``(source report, rewritten report, seed)``, batched."""
        cfg = self.cfg
        prompt = self._prompt
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(edits), cfg.max_variants_per_call):
            chunk = edits[start : start + cfg.max_variants_per_call]
            out += p2p_edit_many(self.pipe, [(prompt(report), prompt(text), seed) for report, text, seed in chunk],
                                 self.settings)
        return out

    def process(self, rows: list[dict]) -> list:
        results: list = [[row] for row in rows]  # non-intra rows pass through
        groups: dict[str, list[int]] = {}
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
                groups.setdefault(report, []).append(i)
        members = [i for group in groups.values() for i in group]
        try:
            pairs = self.edit_many([(rows[i]["report"], rows[i]["rewritten_report"], _seed_of(rows[i]))
                                    for i in members])
            done = dict(zip(members, pairs))
        except Exception:  # noqa: BLE001 - redo study by study: one study must not sink the batch
            done = {}
            for report, group in groups.items():
                try:
                    pairs = self.edit([(rows[i]["rewritten_report"], _seed_of(rows[i])) for i in group])
                except Exception as exc:  # noqa: BLE001 - this study's rows become error rows
                    for i in group:
                        results[i] = exc
                    continue
                done.update(zip(group, pairs))
        for i, (source, edited) in done.items():
            results[i] = [{
                **rows[i],
                "image_png": encode_png(edited, bits=self.cfg.png_bits),
                "source_image_png": encode_png(source, bits=self.cfg.png_bits),
                "generator_model": self.cfg.model,
            }]
        return results

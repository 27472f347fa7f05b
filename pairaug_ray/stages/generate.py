"""InterAug image stage: draw a new radiograph for each rewritten report (text -> image).

Usage::

    cfg = GenerateConfig(model="tiny://sd?size=64", steps=10, batch_size=8)
    ds = pairs.map_batches(GenerateStage, **cfg.map_batches_kwargs(GenerateStage))

Rows of branch ``"inter"`` need ``pair_id``, ``seed`` and ``rewritten_report``; they come out with
``image_png`` (the generated image, grayscale PNG), ``generator_model``, ``sampler`` and
``unet_sample_steps`` (the UNet sample-steps counted while drawing the batch, an equal share per
row: steps x 2 with classifier-free guidance, x 1 without). Other rows pass through unchanged.
``sampler`` names a diffusers scheduler (``models/schedulers.py``: ddim, dpm++, unipc, euler),
built from the pipeline's scheduler config. A batch is one pipeline call, but every row draws its initial noise from its
own generator seeded with the row's ``seed``, so a row's image does not depend on which rows
share its batch (the reproducibility that resumable, re-runnable jobs rely on).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, field_validator

from pairaug_ray.io.dicom import encode_png
from pairaug_ray.models.diffusion import load_sd_pipeline, to_grayscale, truncate_prompt  # noqa: F401
from pairaug_ray.models.schedulers import SAMPLER_NAMES, check_sampler, count_unet, make_scheduler
from pairaug_ray.stages.base import RowStage, StageConfig, StageError

BRANCH = "inter"
# The reference's InterAug recipe: RoentGen drawn with 50 steps and classifier-free guidance.
REFERENCE_INTER = {"steps": 50, "cfg": 2}
REFERENCE_INTER_PER_CANDIDATE = REFERENCE_INTER["steps"] * REFERENCE_INTER["cfg"]


class GenerateConfig(StageConfig):
    model: str = Field("tiny://sd", description="tiny://sd?..., a local diffusers folder or a hub id")
    sampler: str = Field("ddim", description=f"diffusers sampler: one of {list(SAMPLER_NAMES)}")
    steps: int = Field(50, ge=1, description="sampler steps (the reference: 50 DDIM)")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance; <= 1 = none")
    image_size: int | None = Field(None, ge=8, description="pixels; None = the model's native size")
    negative_prompt: str = ""
    max_prompt_words: int | None = Field(None, ge=1, description="cap before token truncation")
    png_bits: int = Field(16, description="8 or 16")
    device: str = Field("auto", description='"auto" = cuda when the stage has GPUs, else cpu')
    dtype: str = Field("auto", description='"auto" = float16 on cuda, float32 on cpu')

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        return check_sampler(value)


def _generator(seed: int) -> torch.Generator:
    # CPU generators make the initial noise, and so the image, the same on CPU and GPU workers.
    return torch.Generator("cpu").manual_seed(int(seed) % 2**63)


class ImageGenerator:
    """A loaded text-to-image pipeline: prompts + seeds -> grayscale float32 images in [0,1]."""

    def __init__(self, config: GenerateConfig):
        self.config = config
        device = config.device
        if device == "auto":
            device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.device = device
        self.pipe = load_sd_pipeline(config.model, device=device, dtype=config.dtype)
        # The loaded pipeline may be shared (stages/local.py): sample through a pipeline object of
        # the same components with this stage's own scheduler, never by swapping the shared one's.
        self.sampling_pipe = type(self.pipe)(**{**self.pipe.components, "requires_safety_checker": False,
                                               "scheduler": make_scheduler(config.sampler, self.pipe.scheduler.config)})
        self.sampling_pipe.set_progress_bar_config(disable=True)
        native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.image_size = config.image_size or native

    def prompt(self, report: str) -> str:
        return truncate_prompt(self.pipe.tokenizer, report, self.config.max_prompt_words)

    def generate(self, reports: list[str], seeds: list[int]) -> list[np.ndarray]:
        """One grayscale image (float32 HxW in [0, 1]) per report, each from its own seed."""
        return self.generate_counted(reports, seeds)[0]

    @torch.no_grad()
    def generate_counted(self, reports: list[str], seeds: list[int]) -> tuple[list[np.ndarray], int]:
        """``generate`` plus the UNet sample-steps it ran (counted: batch x steps, x 2 with CFG)."""
        if len(reports) != len(seeds):
            raise ValueError(f"{len(reports)} reports but {len(seeds)} seeds")
        if not reports:
            return [], 0
        negative = self.config.negative_prompt
        with count_unet(self.pipe.unet) as work:
            out = self._draw(reports, seeds, negative)
        return [to_grayscale(image) for image in out.images], work.sample_steps

    def _draw(self, reports: list[str], seeds: list[int], negative: str):
        return self.sampling_pipe(
            prompt=[self.prompt(r) for r in reports],
            negative_prompt=[negative] * len(reports) if negative else None,
            generator=[_generator(s) for s in seeds],
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            height=self.image_size,
            width=self.image_size,
            output_type="np",
        )


class GenerateStage(RowStage):
    name = "generate"

    def __init__(self, config: GenerateConfig):
        super().__init__(config)
        self.cfg = config
        self.generator = ImageGenerator(config)

    def process(self, rows: list[dict]) -> list:
        results: list = [[row] for row in rows]  # non-inter rows pass through
        todo, reports, seeds = [], [], []
        for i, row in enumerate(rows):
            if row.get("branch") != BRANCH:
                continue
            report, seed = row.get("rewritten_report"), row.get("seed")
            if not isinstance(report, str) or not report.strip():
                results[i] = StageError("missing_report", "inter row has no rewritten_report text")
            elif seed is None or isinstance(seed, float) and not np.isfinite(seed):
                results[i] = StageError("missing_seed", "inter row has no seed")
            else:
                todo.append(i)
                reports.append(report)
                seeds.append(int(seed))
        images, sample_steps = self.generator.generate_counted(reports, seeds)
        share = sample_steps / max(len(images), 1)
        for i, image in zip(todo, images):
            results[i] = [{
                **rows[i],
                "image_png": encode_png(image, bits=self.cfg.png_bits),
                "generator_model": self.cfg.model,
                "sampler": self.cfg.sampler,
                "unet_sample_steps": float(share),
            }]
        return results

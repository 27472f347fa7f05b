"""Diffusion samplers by name, all diffusers schedulers, and the count of the UNet work they do.

Usage::

    scheduler = ddim_scheduler()                           # the reference's DDIM (SD betas)
    sampler = make_scheduler("dpm++", pipe.scheduler.config)   # DPM-Solver++(2M), same betas
    inverse = make_inverse_scheduler("dpm++", pipe.scheduler.config)   # for real-image inversion
    with count_unet(pipe.unet) as work:
        pipe(prompt, num_inference_steps=10)
    work.sample_steps      # UNet sample-steps: sum over UNet calls of the batch (CFG counted: 2B)

The reference prompt-to-prompt code samples Stable Diffusion with DDIM (``scaled_linear`` betas
0.00085..0.012, no sample clipping, ``steps_offset=1``, eta 0). The other samplers are built with
``from_config`` of the pipeline's scheduler config, so they share its betas, timestep count and
``prediction_type`` (epsilon or v):

========= ====================================== ============================================
name      diffusers class                        inverse scheduler (``edit.source: real``)
========= ====================================== ============================================
ddim      DDIMScheduler (eta 0)                  DDIMInverseScheduler
dpm++     DPMSolverMultistepScheduler            DPMSolverMultistepInverseScheduler
          (``dpmsolver++``, 2nd order, "2M")     (Lu et al. 2022, arXiv 2211.01095)
unipc     UniPCMultistepScheduler (bh2)          none in diffusers: ``source: noise`` only
euler     EulerDiscreteScheduler                 none in diffusers: ``source: noise`` only
========= ====================================== ============================================

Every sampler here is deterministic (no noise injected while sampling) and calls the UNet once per
step, which prompt-to-prompt needs (a source and its targets must share their noise) and which makes
"a fraction of the steps" mean the same share of the chosen schedule for all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DPMSolverMultistepInverseScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

# name -> (scheduler class, overrides of the pipeline's config)
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}
# name -> inverse scheduler class (the samplers that can invert a real image)
INVERSE_SAMPLERS: dict[str, type] = {
    "ddim": DDIMInverseScheduler,
    "dpm++": DPMSolverMultistepInverseScheduler,
}
SAMPLER_NAMES = tuple(SAMPLERS)
# Config keys a sampler must not inherit from another scheduler class's config.
_FOREIGN_KEYS = {"_class_name", "_diffusers_version"}


def ddim_scheduler() -> DDIMScheduler:
    """The DDIM scheduler of the reference prompt-to-prompt code (Stable Diffusion betas)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _base(config) -> dict:
    base = dict(config) if config is not None else dict(ddim_scheduler().config)
    return {k: v for k, v in base.items() if k not in _FOREIGN_KEYS}


def check_sampler(name: str, *, invert: bool = False) -> str:
    """``name`` if it is a known sampler (and has an inverse scheduler when ``invert``), else a
    ValueError that lists the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    if invert and name not in INVERSE_SAMPLERS:
        raise ValueError(
            f"sampler {name!r} has no inverse scheduler in diffusers, so it cannot invert a real "
            f"image (edit.source: real); use one of {list(INVERSE_SAMPLERS)}, or edit.source: noise")
    return name


def make_scheduler(name: str, config=None):
    """A fresh scheduler ``name`` (see ``SAMPLERS``) from ``config`` (a pipeline's
    ``scheduler.config``; None = ``ddim_scheduler``'s). Fresh = private state: multistep samplers
    keep a history, so one instance must never serve two loops at once."""
    cls, overrides = SAMPLERS[check_sampler(name)]
    return cls.from_config({**_base(config), **overrides})


def make_inverse_scheduler(name: str, config=None):
    """The inverse scheduler matching sampler ``name`` (``INVERSE_SAMPLERS``) from ``config``.

    Its ``set_timesteps(n)`` visits the forward sampler's ``n`` noise levels in reverse, so latent
    ``k`` of an inversion (after ``k`` inverse steps) sits at the noise level that forward step
    ``n - 1 - k`` produces. Raises ValueError for a sampler without one.
    """
    check_sampler(name, invert=True)
    overrides = SAMPLERS[name][1]
    return INVERSE_SAMPLERS[name].from_config({**_base(config), **overrides})


# ---------------------------------------------------------------- counting UNet work


@dataclass
class UNetWork:
    """UNet work counted while a ``count_unet`` context was open.

    ``sample_steps``: the sum over UNet forward calls of the batch size (one denoising step of B
    samples with classifier-free guidance is one call on 2B, so 2B sample-steps). ``calls``: UNet
    forward calls. ``backward_sample_steps``: sample-steps that were also back-propagated (null-text
    optimisation), counted by the code that calls ``backward``.
    """

    sample_steps: int = 0
    calls: int = 0
    backward_sample_steps: int = 0
    by_call: list[int] = field(default_factory=list)

    def add(self, batch: int) -> None:
        self.sample_steps += int(batch)
        self.calls += 1
        self.by_call.append(int(batch))


@contextlib.contextmanager
def count_unet(unet) -> Iterator[UNetWork]:
    """Counts the UNet's forward calls and their batch sizes (a forward pre-hook) while open.

    Counts what really ran, whatever the caller (a diffusers pipeline, prompt-to-prompt, an
    inversion): no formula. Nested contexts each count every call.
    """
    work = UNetWork()

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        work.add(sample.shape[0])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield work
    finally:
        handle.remove()

"""Diffusion schedulers by name, all from diffusers, with the reference prompt-to-prompt settings.

Usage::

    scheduler = ddim_scheduler()                       # the reference's DDIM (SD betas)

The reference prompt-to-prompt code samples Stable Diffusion with DDIM (``scaled_linear`` betas
0.00085..0.012, no sample clipping, ``steps_offset=1``, eta 0).
"""

from __future__ import annotations

from diffusers import DDIMScheduler


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

"""Inverting a real radiograph into a sampler's trajectory, for IntraAug edits of the patient's image.

Usage::

    from pairaug_ray.models.inversion import InversionSettings, invert_images, psnr
    settings = InversionSettings(method="direct", sampler="ddim", steps=10, guidance_scale=4.0)
    inv = invert_images(pipe, images, prompts, settings)   # images float32 [S, H, W] in [0, 1]
    inv[0].latents[-1]          # [1, C, h, w]: the inverted "noise" that regenerates image 0
    inv[0].unet_sample_steps    # what the inversion cost, counted (10 for 10 steps, no CFG)

What happens
------------
1. ``encode_images``: grayscale [0, 1] -> 3 equal channels in [-1, 1] (how ``train/t2i.py`` feeds
   the VAE) -> the VAE posterior's mean x ``scaling_factor``: the clean latent ``z_0``.
2. ``invert_images``: the sampler's inverse scheduler (``schedulers.make_inverse_scheduler``:
   ``DDIMInverseScheduler`` for ``ddim``, ``DPMSolverMultistepInverseScheduler`` for ``dpm++``)
   walks ``z_0`` up the same ``steps`` noise levels the forward sampler walks down, with the UNet
   conditioned on the source report and no guidance (one UNet sample per study and step: the cost of
   "one extra pass"). Latent ``k`` of ``latents`` sits where forward step ``steps - 1 - k`` lands;
   ``latents[-1]`` is the start of the edit. All studies of a batch are inverted in one UNet call
   per step.
3. How the edit then keeps the source on that trajectory is the ``method`` (used by
   ``p2p.p2p_edit_real``):

``direct`` (default; Ju et al. 2023, "Direct Inversion: Boosting Diffusion-based Editing with 3
  Lines of Code", arXiv 2310.01506): after every step the source branch is put back on the
  inverted latent of that step (its attention maps, which the targets copy, are those of the
  real image's trajectory), and the same correction (inverted latent minus the source's own step) is
  added to every target of that source, so an edit whose target prompt equals the source prompt
  returns the source exactly. Guidance is negative-prompt style (below): the source branch needs
  the conditional UNet sample only. Reconstruction = the VAE's.
``negative_prompt`` (Miyake et al. 2023, "Negative-prompt Inversion: Fast Image Inversion for
  Editing with Text-guided Diffusion Models", arXiv 2305.16807): classifier-free guidance with the
  source prompt's embedding in place of the empty prompt's, for the source (whose guided noise is
  then its conditional noise, the one the inversion used) and the targets (guided noise = eps(source
  prompt) + w (eps(target prompt) - eps(source prompt))). No replay: the reconstruction error is
  the inversion's own (DDIM inversion's first-order approximation).
``null_text`` (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using Guided
  Diffusion Models", arXiv 2211.09794): per step, the empty prompt's embedding is optimised (Adam,
  ``null_text_iterations`` inner steps, lr 1e-2 decaying, early stop) so that the guided step from
  the current latent lands on the inverted one; the edit uses those embeddings as the unconditional
  half for the source and its targets. About ``null_text_iterations`` forward + backward UNet passes
  per step on top of the inversion: ~10x dearer. DDIM only (the optimisation steps a stateless
  scheduler).
``ddim``: plain DDIM inversion, then ordinary guidance with the empty prompt. The baseline the
  papers above correct: with guidance > 1 the source drifts off the trajectory.

Cost accounting: every UNet forward call is counted by ``schedulers.count_unet`` (batch size per
call; CFG counted as 2 samples) and apportioned equally to the studies inverted in that call;
null-text's back-propagated passes are counted separately (``backward_sample_steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pairaug_ray.models.schedulers import count_unet, make_inverse_scheduler, make_scheduler

METHODS = ("direct", "negative_prompt", "null_text", "ddim")
Method = Literal["direct", "negative_prompt", "null_text", "ddim"]


@dataclass(frozen=True)
class InversionSettings:
    """How a real image is inverted and kept on its trajectory (see the module docstring).

    ``method``: one of ``METHODS``; ``sampler``: a sampler with an inverse scheduler ("ddim",
    "dpm++"; null_text: "ddim" only); ``steps``: sampler steps (the edit's steps); ``guidance_scale``:
    the edit's classifier-free guidance (null_text optimises for it); ``null_text_iterations``: inner
    Adam steps per sampler step (Mokady et al.: 10); ``null_text_lr``: their 1e-2;
    ``null_text_tolerance``: early stop when the step's latent MSE falls below it (their 1e-5).
    """

    method: Method = "direct"
    sampler: str = "ddim"
    steps: int = 10
    guidance_scale: float = 4.0
    null_text_iterations: int = 10
    null_text_lr: float = 1e-2
    null_text_tolerance: float = 1e-5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"inversion method must be one of {METHODS}, not {self.method!r}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.method == "null_text" and self.sampler != "ddim":
            raise ValueError("null_text inversion optimises through a stateless DDIM step: use sampler 'ddim'")
        make_inverse_scheduler(self.sampler)  # ValueError for a sampler without an inverse

    @property
    def replay(self) -> bool:
        """The source branch is put back on the inverted latents after every step."""
        return self.method == "direct"

    @property
    def negative(self) -> str:
        """The unconditional half of guidance: "source" (the source prompt), "empty" or "null_text"."""
        return {"direct": "source", "negative_prompt": "source", "null_text": "null_text"}.get(self.method, "empty")


@dataclass
class Inversion:
    """One study's inversion.

    ``latents``: ``steps + 1`` latents [1, C, h, w] float32 on CPU; ``latents[0]`` = the encoded
    image, ``latents[k]`` = after k inverse steps, ``latents[-1]`` = where the edit starts.
    ``null_embeddings``: per forward step the optimised unconditional embedding [1, L, D] (null_text
    only, else None). ``image``: the real image the inversion started from, float32 [H, W] in [0, 1]
    at the model's size (what reconstruction PSNR compares against). ``unet_sample_steps``: forward
    UNet sample-steps spent on this study's inversion; ``backward_sample_steps``: of those, the ones
    also back-propagated (null_text).
    """

    latents: list[torch.Tensor]
    image: np.ndarray
    prompt: str
    settings: InversionSettings
    null_embeddings: list[torch.Tensor] | None = None
    unet_sample_steps: float = 0.0
    backward_sample_steps: float = 0.0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- images and text


def resize_gray(image: np.ndarray, size: int) -> np.ndarray:
    """float32 [H, W] -> [size, size] (bilinear with antialias, as ``train.data`` resizes for training)."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (size, size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0, 0].numpy().astype(np.float32)


def model_image_size(pipe) -> int:
    """The pipeline's native image size in pixels (UNet sample size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode_images(pipe, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """Grayscale float [S, H, W] in [0, 1] -> clean latents [S, C, h, w] float32 (the VAE
    posterior's mean x ``scaling_factor``; deterministic)."""
    x = torch.as_tensor(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
    if x.ndim != 3:
        raise ValueError(f"expected images [S, H, W], got shape {tuple(x.shape)}")
    vae = pipe.vae
    x = (x * 2 - 1)[:, None].repeat(1, 3, 1, 1).to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return latents.float()


@torch.no_grad()
def decode_gray(pipe, latents: torch.Tensor) -> np.ndarray:
    """Latents [M, C, h, w] -> float32 [M, H, W] in [0, 1] (channel mean = grayscale)."""
    vae = pipe.vae
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1).mean(1)
    return images.cpu().numpy().astype(np.float32)


def tokenize(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """Padded ids [n, max_len] for the text encoder and the unpadded id lists (for alignment)."""
    tok = pipe.tokenizer
    enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt")
    lengths = enc.attention_mask.sum(-1).tolist()
    unpadded = [ids[:n].tolist() for ids, n in zip(enc.input_ids, lengths)]
    return enc.input_ids, unpadded


@torch.no_grad()
def encode_text(pipe, ids: torch.Tensor) -> torch.Tensor:
    """Token ids [n, L] -> the text encoder's last hidden state [n, L, D] in the UNet's dtype."""
    return pipe.text_encoder(ids.to(pipe.unet.device))[0].to(pipe.unet.dtype)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (peak 1), over ``mask`` if given
    (bool, same shape). ``inf`` for identical images."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr of images of different shapes {a.shape} and {b.shape}")
    d = (a - b) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


# ---------------------------------------------------------------- inversion


@torch.no_grad()
def _invert_latents(pipe, z0: torch.Tensor, cond: torch.Tensor, settings: InversionSettings) -> list[torch.Tensor]:
    """The inverse scheduler's walk from ``z0`` [S, C, h, w] with conditional noise only:
    ``steps + 1`` latents [S, C, h, w] (on the UNet's device)."""
    inverse = make_inverse_scheduler(settings.sampler, pipe.scheduler.config)
    inverse.set_timesteps(settings.steps, device=pipe.unet.device)
    latents = z0.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    out = [latents]
    for t in inverse.timesteps:
        model_in = inverse.scale_model_input(latents, t)
        noise = pipe.unet(model_in, t, encoder_hidden_states=cond).sample
        latents = inverse.step(noise, t, latents).prev_sample
        out.append(latents)
    return out


def _null_text(pipe, trajectory: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
               settings: InversionSettings, work) -> list[torch.Tensor]:
    """Mokady et al.'s null-text optimisation for ONE study (trajectory latents [1, C, h, w]):
    per forward step, the unconditional embedding that makes the guided DDIM step land on the
    inverted latent. Returns one embedding [1, L, D] per forward step."""
    scheduler = make_scheduler("ddim", pipe.scheduler.config)
    scheduler.set_timesteps(settings.steps, device=pipe.unet.device)
    n = len(scheduler.timesteps)
    w = settings.guidance_scale
    latents = trajectory[-1]
    u = uncond.detach().clone()
    out = []
    frozen = [p for p in pipe.unet.parameters() if p.requires_grad]
    for p in frozen:  # gradients for the embedding only, never the UNet's weights
        p.requires_grad_(False)
    try:
        _null_text_steps(pipe, scheduler, trajectory, cond, u, settings, work, out, n, w, latents)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return out


def _null_text_steps(pipe, scheduler, trajectory, cond, u, settings, work, out, n, w, latents) -> None:
    for i, t in enumerate(scheduler.timesteps):
        target = trajectory[n - 1 - i]
        with torch.no_grad():
            eps_c = pipe.unet(latents, t, encoder_hidden_states=cond).sample
        u = u.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=settings.null_text_lr * (1.0 - i / 100.0))
        for _ in range(settings.null_text_iterations):
            eps_u = pipe.unet(latents, t, encoder_hidden_states=u).sample
            eps = eps_u + w * (eps_c - eps_u)
            prev = scheduler.step(eps, t, latents).prev_sample
            loss = F.mse_loss(prev.float(), target.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            work.backward_sample_steps += latents.shape[0]
            if loss.item() < settings.null_text_tolerance + i * 2e-5:
                break
        u = u.detach()
        out.append(u)
        with torch.no_grad():
            eps_u = pipe.unet(latents, t, encoder_hidden_states=u).sample
            latents = scheduler.step(eps_u + w * (eps_c - eps_u), t, latents).prev_sample


def invert_images(pipe, images: Sequence[np.ndarray], prompts: Sequence[str],
                  settings: InversionSettings, size: int | None = None) -> list[Inversion]:
    """Invert ``images`` (float32 [H, W] in [0, 1], any size: resized to ``size`` pixels, None = the
    model's native size, a multiple of the VAE's scale factor) each under its source ``prompts``
    (already cut to the text encoder's length), in one batched walk.

    Returns one ``Inversion`` per image, in order. Raises ValueError for mismatched lengths or a
    sampler without an inverse scheduler.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not len(images):
        return []
    size = int(size or model_image_size(pipe))
    if size % pipe.vae_scale_factor:
        raise ValueError(f"image size {size} is not a multiple of the VAE scale factor {pipe.vae_scale_factor}")
    images = [resize_gray(im, size) for im in images]
    return invert_latents(pipe, encode_images(pipe, images), prompts, settings, images=images)


def invert_latents(pipe, z0: torch.Tensor, prompts: Sequence[str], settings: InversionSettings,
                   images: Sequence[np.ndarray] | None = None) -> list[Inversion]:
    """Invert clean latents ``z0`` [S, C, h, w] (``encode_images``' output, or a generation's final
    latent) each under its source prompt; ``images``: the images they encode (kept on the
    ``Inversion`` for PSNR; None = decoded from ``z0``). One ``Inversion`` per latent, in order."""
    n = z0.shape[0]
    if len(prompts) != n:
        raise ValueError(f"{n} latents but {len(prompts)} prompts")
    if images is None:
        images = list(decode_gray(pipe, z0))
    distinct = list(dict.fromkeys(prompts))
    ids, _ = tokenize(pipe, distinct + [""])
    emb = encode_text(pipe, ids)
    index = {p: i for i, p in enumerate(distinct)}
    cond = emb[torch.as_tensor([index[p] for p in prompts])]
    with count_unet(pipe.unet) as work:
        walk = _invert_latents(pipe, z0, cond, settings)
    per_study = work.sample_steps / n
    out = []
    for s in range(n):
        traj = [z[s:s + 1].detach().float().cpu() for z in walk]
        out.append(Inversion(traj, np.asarray(images[s], np.float32), prompts[s], settings,
                             unet_sample_steps=per_study))
    if settings.method == "null_text":
        device = pipe.unet.device
        for s, inv in enumerate(out):
            with count_unet(pipe.unet) as nt:
                traj = [z.to(device=device, dtype=pipe.unet.dtype) for z in inv.latents]
                inv.null_embeddings = [u.cpu() for u in _null_text(pipe, traj, cond[s:s + 1], emb[-1:],
                                                                   settings, nt)]
            inv.unet_sample_steps += nt.sample_steps
            inv.backward_sample_steps += nt.backward_sample_steps
    return out

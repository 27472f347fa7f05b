"""Prompt-to-prompt editing (Hertz et al., 2022) as diffusers attention processors, for IntraAug.

Usage::

    settings = P2PSettings(steps=75, guidance_scale=4.0, cross_replace=0.5, self_replace=0.2)
    pairs = p2p_edit_many(pipe, [(report_1, rewrite_1, seed_1), (report_2, rewrite_2, seed_2)], settings)
    source, targets = p2p_edit(pipe, "small left pleural effusion",
                               ["large left pleural effusion"], steps=75, seed=7)   # one shared latent
    pairs = p2p_edit_variants(pipe, report, [(rewrite_a, seed_a), (rewrite_b, seed_b)])  # one report
    invs = invert_images(pipe, [image], [report], InversionSettings(steps=10, sampler="dpm++"))
    pairs = p2p_edit_real(pipe, invs, [(0, rewrite_a), (0, rewrite_b)],
                          P2PSettings(steps=10, sampler="dpm++"))    # the patient's image, edited

How it works
------------
The source prompt (the original report) and the target prompt (a rewritten report) are denoised
together from the SAME initial latent with the chosen sampler (DDIM by default, as the reference)
and classifier-free guidance. While they are, a
custom attention processor (``P2PAttnProcessor``, installed on every ``Attention`` layer of the
UNet with ``unet.set_attn_processor`` and always restored by ``attention_control``) rewrites the
target's attention probabilities from the source's:

- cross-attention, for the first ``cross_replace`` fraction of steps:
  ``replace`` (same token count) copies the source's maps; ``refine`` (any prompts) aligns the two
  token sequences (``difflib.SequenceMatcher`` over token ids) and takes, for every target token
  that has a source counterpart, the counterpart's map; new target tokens keep their own map;
- self-attention, for the first ``self_replace`` fraction of steps, in layers with at most
  ``self_replace_max_tokens`` query positions (the reference: 16x16 = 256 at 512 px);
- ``LocalBlend`` (optional): after every step the target latent is pulled back to the source's
  outside the region that the given words attend to (cross-attention maps averaged over layers and
  steps, max-normalised, thresholded): ``x_tgt = x_src + mask * (x_tgt - x_src)``.
Only the conditional half of the CFG batch is edited, as in the reference.

Batch layout: one UNet call per step holds every variant of one report. A variant is a
``(target prompt, seed)``; the seed picks the initial latent that the variant's target shares with
its source generation. Sources are generated once per distinct seed, so the batch per CFG half is
``[source(seed) for each distinct seed] + [target for each variant]``: 1 + N images when all
variants share one seed (``p2p_edit``), 2N with N distinct seeds (``p2p_edit_variants``), and the
full UNet batch is ``[uncond half, cond half]``. Every edit only reads its own source, so a
variant's result does not depend on the other variants in the batch (up to float rounding).

Sources: from noise (as the reference: ``p2p_edit_many`` & co.; the source image is a generation
of the source report, not the patient) or from a real image (``p2p_edit_real``): the study image
inverted once (``inversion.invert_images``) and kept on its inverted trajectory by the inversion
method (direct / negative-prompt / null-text, see ``models/inversion.py``). A real source is shared
by all variants of its study: the batch per CFG half is ``[one source per study] + [targets]``.

Samplers: ``P2PSettings.sampler`` names a diffusers scheduler (``schedulers.SAMPLERS``: ddim,
dpm++, unipc, euler; all deterministic, one UNet call per step, so sources and targets share their
noise). ``cross_replace`` / ``self_replace`` are fractions of the chosen sampler's steps (step
``i`` of ``n`` is controlled while ``i < int(n * fraction)``). A ``guidance_scale`` <= 1 means no
classifier-free guidance (conditional samples only), as in diffusers pipelines.

UNet work: every run counts its UNet calls (``schedulers.count_unet``) and, when given a ``work``
list, apportions the count to the edits: a target's own samples plus an equal share of its source's.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from pairaug_ray.models.inversion import Inversion, decode_gray, encode_text, tokenize
from pairaug_ray.models.schedulers import check_sampler, count_unet, make_scheduler

EDITS = ("refine", "replace")


# ---------------------------------------------------------------- token alignment


@dataclass(frozen=True)
class TokenAlignment:
    """For each target token position: which source position's attention it takes, and how much."""

    mapper: torch.Tensor  # long [max_len]: source position per target position
    alphas: torch.Tensor  # float [max_len]: 1 = take the source's map, 0 = new token, keep own


def replace_alignment(
    source_ids: Sequence[int], target_ids: Sequence[int], max_len: int
) -> TokenAlignment:
    """Identity alignment for ``replace``: both prompts must have the same number of tokens."""
    if len(source_ids) != len(target_ids):
        raise ValueError(
            f"edit='replace' needs prompts with the same token count "
            f"({len(source_ids)} != {len(target_ids)}); use edit='refine'"
        )
    return TokenAlignment(torch.arange(max_len), torch.ones(max_len))


def refine_alignment(
    source_ids: Sequence[int], target_ids: Sequence[int], max_len: int
) -> TokenAlignment:
    """Word-level alignment of two token sequences (both with their special tokens, unpadded).

    Tokens in matching blocks take the source token's attention; inserted or substituted tokens keep
    their own (alpha 0). Padding positions after the target's end map to the source's padding.
    """
    mapper = torch.zeros(max_len, dtype=torch.long)
    alphas = torch.zeros(max_len)
    matcher = difflib.SequenceMatcher(None, list(source_ids), list(target_ids), autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            mapper[block.b + k] = block.a + k
            alphas[block.b + k] = 1.0
    n_src, n_tgt = len(source_ids), len(target_ids)
    for pos in range(n_tgt, max_len):
        mapper[pos] = min(n_src + pos - n_tgt, max_len - 1)
        alphas[pos] = 1.0
    return TokenAlignment(mapper, alphas)


def word_token_mask(
    word_ids: Sequence[Sequence[int]], prompt_ids: Sequence[int], max_len: int
) -> torch.Tensor:
    """float [max_len]: 1 wherever one of the words' token runs occurs in ``prompt_ids``."""
    mask = torch.zeros(max_len)
    ids = list(prompt_ids)
    for run in word_ids:
        run = list(run)
        if not run:
            continue
        for start in range(len(ids) - len(run) + 1):
            if ids[start : start + len(run)] == run:
                mask[start : start + len(run)] = 1.0
    return mask


# ---------------------------------------------------------------- controllers


class LocalBlend:
    """Keeps the target latent equal to its source's outside the region the blend words attend to.

    ``word_masks`` [M, L] marks the blend words' token positions in each sample's prompt (sources
    then targets, as in the batch). The mask of a target is the union of its own and its source's
    thresholded word maps. A variant whose prompts contain none of the words is left unblended.
    """

    def __init__(
        self,
        word_masks: torch.Tensor,
        target_sources: torch.Tensor,
        threshold: float = 0.3,
        max_tokens: int = 256,
    ):
        self.word_masks = word_masks
        self.target_sources = target_sources
        self.num_sources = word_masks.shape[0] - target_sources.shape[0]
        self.threshold = threshold
        self.max_tokens = max_tokens
        self._sums: dict[int, torch.Tensor] = {}  # query count -> summed [M, Q] word maps

    def store(self, cond_maps: torch.Tensor) -> None:
        """``cond_maps`` [M, Q, L]: one layer's head-averaged cross-attention (conditional half)."""
        word_map = (cond_maps * self.word_masks[:, None, :].to(cond_maps)).sum(-1).float()
        q = word_map.shape[1]
        self._sums[q] = self._sums[q] + word_map if q in self._sums else word_map

    def mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """bool [T, 1, h, w]: where each target may differ from its source."""
        h, w = latent_hw
        maps = []
        for q, summed in self._sums.items():
            factor = math.sqrt(h * w / q)
            mh, mw = max(1, round(h / factor)), max(1, round(w / factor))
            grid = summed.view(-1, 1, mh, mw)
            grid = F.max_pool2d(grid, 3, stride=1, padding=1)
            maps.append(F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False))
        m = torch.stack(maps).mean(0)  # [M, 1, h, w]
        peak = m.amax(dim=(2, 3), keepdim=True)
        sample_mask = (m / peak.clamp_min(1e-12)).gt(self.threshold) & peak.gt(0)
        src = self.target_sources
        tgt_mask = sample_mask[self.num_sources :] | sample_mask[src]
        has_words = (self.word_masks[self.num_sources :].sum(-1) + self.word_masks[src].sum(-1)) > 0
        return tgt_mask | ~has_words[:, None, None, None].to(tgt_mask.device)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if not self._sums:
            return latents
        s = self.num_sources
        mask = self.mask(tuple(latents.shape[-2:])).to(latents.dtype)
        src = latents[self.target_sources.to(latents.device)]
        return torch.cat([latents[:s], src + mask * (latents[s:] - src)])


class P2PController:
    """Edits attention probabilities of the conditional half of the batch, step by step.

    The batch per CFG half is ``[sources (S), targets (T)]``; ``target_sources[j]`` is the
    source index of target j; ``alignments[j]`` its token alignment (``refine`` or ``replace``).
    """

    def __init__(
        self,
        *,
        num_sources: int,
        target_sources: Sequence[int],
        alignments: Sequence[TokenAlignment],
        steps: int,
        cross_replace: float,
        self_replace: float,
        self_replace_max_tokens: int = 256,
        local_blend: LocalBlend | None = None,
    ):
        if not 0.0 <= cross_replace <= 1.0 or not 0.0 <= self_replace <= 1.0:
            raise ValueError("cross_replace and self_replace are fractions of the steps in [0, 1]")
        self.num_sources = num_sources
        self.target_sources = torch.as_tensor(list(target_sources), dtype=torch.long)
        self.num_targets = len(self.target_sources)
        if self.num_targets:
            self.mapper = torch.stack([a.mapper for a in alignments])  # [T, L]
            self.alphas = torch.stack([a.alphas for a in alignments])  # [T, L]
        self.cross_steps = int(steps * cross_replace)
        self.self_steps = int(steps * self_replace)
        self.self_replace_max_tokens = self_replace_max_tokens
        self.local_blend = local_blend
        self.cur_step = 0
        self.src_pos: torch.Tensor | None = None  # rows of the UNet batch holding the conditional
        self.tgt_pos: torch.Tensor | None = None  # sources / targets (None: [uncond half, cond half])

    def set_layout(self, src_pos: Sequence[int], tgt_pos: Sequence[int]) -> None:
        """Where the conditional sources and targets sit in the UNet batch (their rows, in order),
        when the batch is not ``[uncond (S + T), cond (S + T)]`` (no CFG, or sources without an
        unconditional half)."""
        self.src_pos = torch.as_tensor(list(src_pos), dtype=torch.long)
        self.tgt_pos = torch.as_tensor(list(tgt_pos), dtype=torch.long)

    def _layout(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.src_pos is None:
            half = batch // 2
            src = half + torch.arange(self.num_sources)
            tgt = half + self.num_sources + torch.arange(self.num_targets)
            return src.to(device), tgt.to(device)
        return self.src_pos.to(device), self.tgt_pos.to(device)

    def wants_probs(self, is_cross: bool, num_queries: int) -> bool:
        """Whether this layer needs explicit attention probabilities at the current step."""
        if not self.num_targets:
            return False
        if is_cross:
            blend = self.local_blend is not None and num_queries <= self.local_blend.max_tokens
            return blend or self.cur_step < self.cross_steps
        return self.cur_step < self.self_steps and num_queries <= self.self_replace_max_tokens

    def edit(self, probs: torch.Tensor, is_cross: bool, heads: int) -> torch.Tensor:
        """``probs`` [B * heads, Q, K] -> edited in place, same shape. By default the batch is
        ``[uncond half, cond half]``, each ``[sources, targets]``; ``set_layout`` says otherwise."""
        q, k = probs.shape[-2:]
        p = probs.view(-1, heads, q, k)
        src_pos, tgt_pos = self._layout(p.shape[0], probs.device)
        src_of_tgt = src_pos[self.target_sources.to(probs.device)]
        if is_cross and self.local_blend is not None and q <= self.local_blend.max_tokens:
            self.local_blend.store(p[torch.cat([src_pos, tgt_pos])].mean(1))
        if is_cross and self.cur_step < self.cross_steps:
            src = p[src_of_tgt]  # [T, heads, Q, K]
            mapper = self.mapper.to(probs.device)[:, None, None, :].expand(-1, heads, q, -1)
            mapped = torch.gather(src, -1, mapper)
            alphas = self.alphas.to(probs)[:, None, None, :]
            p[tgt_pos] = mapped * alphas + p[tgt_pos] * (1 - alphas)
        elif not is_cross and self.cur_step < self.self_steps and q <= self.self_replace_max_tokens:
            p[tgt_pos] = p[src_of_tgt]
        return probs


class P2PAttnProcessor:
    """Attention processor that hands the attention probabilities to a ``P2PController``.

    Layers and steps the controller leaves alone run through ``scaled_dot_product_attention``, so
    the large self-attention layers of a 512 px model never materialise their maps.
    """

    def __init__(self, controller: P2PController):
        self.controller = controller

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, num_queries, _ = hidden_states.shape
        key_len = encoder_hidden_states.shape[1] if is_cross else num_queries
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        if self.controller.wants_probs(is_cross, num_queries):
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
            probs = attn.get_attention_scores(query, key, attention_mask)
            probs = self.controller.edit(probs, is_cross, attn.heads)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        else:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            head_dim = key.shape[-1] // attn.heads
            query, key, value = (
                x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
            )
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_control(unet: torch.nn.Module, controller: P2PController) -> Iterator[P2PController]:
    """Installs ``P2PAttnProcessor`` on every attention layer; restores the originals on exit."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor(P2PAttnProcessor(controller))
    try:
        yield controller
    finally:
        # set_attn_processor pops from the dict it is given: hand it a copy
        unet.set_attn_processor(dict(original))


# ---------------------------------------------------------------- the edit


_tokenize = tokenize          # the helpers live in models/inversion.py (shared with the inversion)
_encode_text = encode_text


def _latent_shape(pipe, image_size: int | None) -> tuple[int, int, int]:
    scale = pipe.vae_scale_factor
    size = image_size or pipe.unet.config.sample_size * scale
    if size % scale:
        raise ValueError(f"image_size {size} is not a multiple of the VAE scale factor {scale}")
    return pipe.unet.config.in_channels, size // scale, size // scale


def seed_latent(
    pipe,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    image_size: int | None = None,
) -> torch.Tensor:
    """[1, C, h, w] float32 initial noise from a CPU generator (device-independent per seed)."""
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(int(seed or 0) % 2**63)
    return torch.randn((1, *_latent_shape(pipe, image_size)), generator=generator, dtype=torch.float32)


_decode_gray = decode_gray


def _run(
    pipe,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    target_sources: Sequence[int],
    start_latents: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    cross_replace: float,
    self_replace: float,
    edit: str,
    local_blend_words: Sequence[str] | None,
    blend_threshold: float,
    self_replace_max_tokens: int,
    sampler: str = "ddim",
    negative: str = "empty",
    trajectories: Sequence[Sequence[torch.Tensor]] | None = None,
    null_embeddings: Sequence[Sequence[torch.Tensor]] | None = None,
    work: list | None = None,
    start_step: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The prompt-to-prompt loop over S sources (prompt s, start latent s) and T targets.

    ``negative``: the unconditional half of guidance: "empty" (the empty prompt, for sources and
    targets), "source" (targets: their source's prompt; sources: none, their guided noise is the
    conditional one) or "null_text" (per step, the source's ``null_embeddings[s][i]``, for the
    source and its targets). ``trajectories``: per source the inverted latents (``Inversion.latents``,
    ``steps + 1`` of [1, C, h, w]); when given, the source is put back on them after every step and
    the correction is added to its targets (direct inversion). ``start_latents`` [S, C, h, w] are
    used as they are (noise: already scaled by the caller). ``start_step``: the first of the
    sampler's ``steps`` to run (0 = all; > 0: ``start_latents`` sit at that step's noise level, an
    edit ``strength`` < 1; the attention-control fractions apply to the steps run). ``work``: a
    list that receives, per target, its counted UNet sample-steps (own samples + an equal share of
    its source's).
    Returns (source images [S, H, W], target images [T, H, W]) float32 in [0, 1].
    """
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {EDITS}, not {edit!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    check_sampler(sampler)
    num_sources, num_targets = start_latents.shape[0], len(target_prompts)
    if len(source_prompts) != num_sources:
        raise ValueError(f"{len(source_prompts)} source prompts for {num_sources} source latents")
    if len(target_sources) != num_targets:
        raise ValueError(f"{len(target_sources)} target sources for {num_targets} target prompts")
    if any(not 0 <= j < num_sources for j in target_sources):
        raise ValueError("target_sources must index the sources")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    max_len = pipe.tokenizer.model_max_length

    # each distinct prompt is encoded once
    distinct = list(dict.fromkeys(source_prompts))
    index = {text: i for i, text in enumerate(distinct)}
    prompt_of_source = [index[text] for text in source_prompts]
    n_prompts = len(distinct)
    ids, unpadded = _tokenize(pipe, distinct + list(target_prompts) + [""])
    emb = _encode_text(pipe, ids)
    src_emb = emb[:n_prompts][torch.as_tensor(prompt_of_source, dtype=torch.long)]  # [S, L, D]
    tgt_emb, empty_emb = emb[n_prompts:-1], emb[-1:]
    target_index = torch.as_tensor(list(target_sources), dtype=torch.long)
    tgt_dev = target_index.to(device)

    align = refine_alignment if edit == "refine" else replace_alignment
    src_ids = [unpadded[prompt_of_source[j]] for j in target_sources]
    tgt_unpadded = unpadded[n_prompts:-1]
    alignments = [align(s_ids, t_ids, max_len) for s_ids, t_ids in zip(src_ids, tgt_unpadded)]
    blend = None
    if local_blend_words:
        word_ids = [pipe.tokenizer(w, add_special_tokens=False).input_ids for w in local_blend_words]
        masks = [word_token_mask(word_ids, unpadded[prompt_of_source[s]], max_len)
                 for s in range(num_sources)]
        masks += [word_token_mask(word_ids, t, max_len) for t in tgt_unpadded]
        blend = LocalBlend(torch.stack(masks), target_index, blend_threshold, self_replace_max_tokens)

    # A private scheduler: the pipeline's may be shared with other callers, and multistep
    # samplers keep a history.
    scheduler = make_scheduler(sampler, pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    n_steps = len(scheduler.timesteps)
    if trajectories is not None and any(len(tr) != n_steps + 1 for tr in trajectories):
        raise ValueError(f"an inverted trajectory does not have {n_steps + 1} latents (steps or sampler "
                         "differ between the inversion and the edit)")
    if null_embeddings is not None and any(len(u) != n_steps for u in null_embeddings):
        raise ValueError(f"null-text embeddings are not one per step ({n_steps})")
    if not 0 <= start_step < n_steps:
        raise ValueError(f"start_step {start_step} is outside the {n_steps} steps")
    if start_step and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_step)
    controller = P2PController(
        num_sources=num_sources, target_sources=target_index, alignments=alignments, steps=n_steps - start_step,
        cross_replace=cross_replace, self_replace=self_replace,
        self_replace_max_tokens=self_replace_max_tokens, local_blend=blend,
    )
    cfg = guidance_scale > 1.0
    src_uncond = cfg and negative != "source"
    n_uncond = (num_sources if src_uncond else 0) + num_targets if cfg else 0
    controller.set_layout(n_uncond + torch.arange(num_sources),
                          n_uncond + num_sources + torch.arange(num_targets))
    cond_ctx = torch.cat([src_emb, tgt_emb])

    def uncond_ctx(step: int) -> torch.Tensor:
        if negative == "source":
            return src_emb[target_index]  # targets only
        if negative == "null_text":
            per_src = torch.cat([u[step] for u in null_embeddings]).to(device=device, dtype=dtype)
        else:
            per_src = empty_emb.expand(num_sources, -1, -1)
        return torch.cat([per_src, per_src[target_index]])

    latents = start_latents.to(device=device, dtype=dtype)
    latents = torch.cat([latents, latents[tgt_dev]])
    with count_unet(pipe.unet) as counted, attention_control(pipe.unet, controller):
        for step in range(start_step, n_steps):
            t = scheduler.timesteps[step]
            controller.cur_step = step - start_step
            scaled = scheduler.scale_model_input(latents, t)
            if cfg:
                model_in = torch.cat([scaled if src_uncond else scaled[num_sources:], scaled])
                context = torch.cat([uncond_ctx(step), cond_ctx])
            else:
                model_in, context = scaled, cond_ctx
            out = pipe.unet(model_in, t, encoder_hidden_states=context).sample
            if cfg:
                eps_rows, eps_c = out[:n_uncond], out[n_uncond:]
                eps_u = eps_rows if src_uncond else torch.cat([eps_c[:num_sources], eps_rows])
                noise = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                noise = out
            latents = scheduler.step(noise, t, latents).prev_sample
            if trajectories is not None:
                ref = torch.cat([tr[n_steps - 1 - step] for tr in trajectories]).to(device=device, dtype=dtype)
                delta = ref - latents[:num_sources]
                latents = torch.cat([ref, latents[num_sources:] + delta[tgt_dev]])
            if blend is not None:
                latents = blend(latents)

    if work is not None:
        # per UNet call: a target has 1 (+1 with CFG) samples; a source 1 (+1 with its own
        # unconditional half), shared equally by its targets in this run
        per_src = 1 + int(src_uncond)
        per_tgt = 1 + int(cfg)
        expected = counted.calls * (num_sources * per_src + num_targets * per_tgt)
        scale = counted.sample_steps / expected if expected else 0.0
        n_of = np.bincount(np.asarray(list(target_sources), dtype=np.int64), minlength=num_sources)
        work.extend(scale * counted.calls * (per_tgt + per_src / n_of[s]) for s in target_sources)
    images = _decode_gray(pipe, latents)
    return images[:num_sources], images[num_sources:]


@torch.no_grad()
def p2p_generate(
    pipe,
    source_prompt: str | Sequence[str],
    target_prompts: Sequence[str],
    target_sources: Sequence[int],
    source_latents: torch.Tensor,
    *,
    steps: int = 75,
    guidance_scale: float = 4.0,
    cross_replace: float = 0.5,
    self_replace: float = 0.2,
    edit: str = "refine",
    local_blend_words: Sequence[str] | None = None,
    blend_threshold: float = 0.3,
    self_replace_max_tokens: int = 256,
    sampler: str = "ddim",
    work: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The batched core from noise: S source latents, T targets (target j starts from source
    ``target_sources[j]``).

    ``source_prompt`` is one prompt for every source, or a sequence of S prompts (one per source
    latent: several studies in one batch); each target is aligned to its own source's prompt.
    ``source_latents`` [S, C, h, w] is unit Gaussian noise (scaled by the sampler's
    ``init_noise_sigma`` here). ``sampler``: ``schedulers.SAMPLERS``. ``work``: receives per target
    its UNet sample-steps (see ``_run``). Returns (source images [S, H, W], target images [T, H, W]),
    float32 in [0, 1].
    """
    num_sources = source_latents.shape[0]
    if isinstance(source_prompt, str):
        source_prompts = [source_prompt] * num_sources
    else:
        source_prompts = list(source_prompt)
    check_sampler(sampler)
    init_sigma = make_scheduler(sampler, pipe.scheduler.config)
    init_sigma.set_timesteps(steps)
    latents = source_latents * float(init_sigma.init_noise_sigma)
    return _run(pipe, source_prompts, target_prompts, target_sources, latents, steps=steps,
                guidance_scale=guidance_scale, cross_replace=cross_replace, self_replace=self_replace,
                edit=edit, local_blend_words=local_blend_words, blend_threshold=blend_threshold,
                self_replace_max_tokens=self_replace_max_tokens, sampler=sampler, negative="empty",
                work=work)


@dataclass(frozen=True)
class P2PSettings:
    """How an edit runs: the reference's AttentionRefine settings by default (75 DDIM steps,
    guidance 4, cross-attention control for the first 50% of the steps, self-attention for 20%).

    ``steps`` sampler steps; ``guidance_scale`` classifier-free guidance (<= 1: none);
    ``cross_replace`` / ``self_replace`` fractions of the sampler's steps in [0, 1]; ``edit``
    "refine" | "replace"; ``local_blend_words`` LocalBlend words (None = off) and
    ``blend_threshold`` in [0, 1]; ``self_replace_max_tokens`` only layers with at most this many
    query positions get self-attention injection; ``image_size`` pixels (None = the model's native
    size); ``sampler`` a ``schedulers.SAMPLERS`` name; ``strength`` in (0, 1] (real-image edits
    only): the edit starts from the inverted latent at that fraction of the noise schedule and runs
    that fraction of the steps (1.0 = from the fully inverted latent; lower keeps more of the
    image's layout, as img2img's strength does).
    """

    steps: int = 75
    guidance_scale: float = 4.0
    cross_replace: float = 0.5
    self_replace: float = 0.2
    edit: str = "refine"
    local_blend_words: tuple[str, ...] | None = None
    blend_threshold: float = 0.3
    self_replace_max_tokens: int = 256
    image_size: int | None = None
    sampler: str = "ddim"
    strength: float = 1.0

    def with_overrides(self, **overrides) -> "P2PSettings":
        """A copy with keyword overrides (the keywords of ``p2p_edit``'s earlier signature)."""
        if overrides.get("local_blend_words") is not None:
            overrides["local_blend_words"] = tuple(overrides["local_blend_words"]) or None
        return replace(self, **overrides) if overrides else self

    def loop_kwargs(self) -> dict:
        """The keywords of the loop (``_run``) these settings fix."""
        return dict(steps=self.steps, guidance_scale=self.guidance_scale, cross_replace=self.cross_replace,
                    self_replace=self.self_replace, edit=self.edit, local_blend_words=self.local_blend_words,
                    blend_threshold=self.blend_threshold, self_replace_max_tokens=self.self_replace_max_tokens,
                    sampler=self.sampler)


def _settings(settings: P2PSettings | None, overrides: dict) -> P2PSettings:
    return (settings or P2PSettings()).with_overrides(**overrides)


def _core(pipe, source_prompt, target_prompts, target_sources, latents, s: P2PSettings, work=None):
    kw = s.loop_kwargs()
    return p2p_generate(pipe, source_prompt, target_prompts, target_sources, latents, work=work, **kw)


def p2p_edit_many(
    pipe,
    edits: Sequence[tuple[str, str, int]],
    settings: P2PSettings | None = None,
    work: list | None = None,
    **overrides,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(source prompt, target prompt, seed)`` edits of any number of reports in ONE batched run.

    Each distinct (source prompt, seed) gets one source generation, shared by its targets; returns
    ``(source image, target image)`` per edit, in order, float32 HxW in [0, 1]. A result depends
    only on its own prompts and seed (up to float rounding), so batching the IntraAug variants of
    many studies together (one UNet call per step for all of them) changes nothing but the speed.
    ``overrides`` are ``P2PSettings`` fields (``steps=10``) applied over ``settings``. ``work``: a
    list that receives each edit's counted UNet sample-steps.
    """
    s = _settings(settings, overrides)
    keys = list(dict.fromkeys((src, int(seed)) for src, _, seed in edits))
    if not keys:
        return []
    source_of = {key: i for i, key in enumerate(keys)}
    latents = torch.cat([seed_latent(pipe, seed, image_size=s.image_size) for _, seed in keys])
    target_sources = [source_of[(src, int(seed))] for src, _, seed in edits]
    sources, targets = _core(pipe, [src for src, _ in keys], [tgt for _, tgt, _ in edits],
                             target_sources, latents, s, work)
    return [(sources[j], targets[i]) for i, j in enumerate(target_sources)]


def p2p_edit_variants(pipe, source_prompt: str, variants: Sequence[tuple[str, int]],
                      settings: P2PSettings | None = None, **overrides) -> list[tuple[np.ndarray, np.ndarray]]:
    """IntraAug: N variants ``(target prompt, seed)`` of one report in one batched run
    (``p2p_edit_many`` with one source prompt); ``(source image, target image)`` per variant."""
    return p2p_edit_many(pipe, [(source_prompt, prompt, seed) for prompt, seed in variants],
                         settings, **overrides)


def p2p_edit(pipe, source_prompt: str, target_prompts: Sequence[str], settings: P2PSettings | None = None,
             *, seed: int = 0, generator: torch.Generator | None = None,
             latents: torch.Tensor | None = None, **overrides) -> tuple[np.ndarray, list[np.ndarray]]:
    """Edit one source generation into every target prompt; all targets share ONE initial latent.

    The latent comes from ``latents`` ([1, C, h, w]) if given, else ``generator``, else ``seed``.
    Returns (source image, [target image per prompt]), float32 HxW in [0, 1].
    """
    s = _settings(settings, overrides)
    if latents is None:
        latents = seed_latent(pipe, seed, generator, s.image_size)
    if latents.ndim == 3:
        latents = latents[None]
    if latents.shape[0] != 1:
        raise ValueError("p2p_edit takes one shared latent [1, C, h, w]; use p2p_edit_many for several")
    sources, targets = _core(pipe, source_prompt, target_prompts, [0] * len(target_prompts), latents, s)
    return sources[0], list(targets)


@torch.no_grad()
def p2p_edit_real(
    pipe,
    inversions: Sequence[Inversion],
    edits: Sequence[tuple[int, str]],
    settings: P2PSettings | None = None,
    work: list | None = None,
    **overrides,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """IntraAug on real images: ``(inversion index, target prompt)`` edits in ONE batched run.

    ``inversions`` come from ``inversion.invert_images`` (one per study, with the same sampler and
    steps as ``settings``); each inversion used by an edit is ONE source branch, shared by all of
    its edits, started from its inverted latent and kept on the trajectory by its method (see
    ``models/inversion.py``). Returns ``(reconstruction, edited image)`` per edit, float32 HxW in
    [0, 1]: the reconstruction is the source branch decoded (the inversion without an edit). An
    edit whose target prompt is its source prompt returns the reconstruction (exactly with
    ``direct``). ``work`` receives each edit's UNet sample-steps in this run (the inversion's own
    cost is ``Inversion.unet_sample_steps``). Raises ValueError when an inversion's sampler, steps
    or (null_text) guidance differ from ``settings``, or when inversions of one run mix methods.
    """
    s = _settings(settings, overrides)
    if not edits:
        return []
    used = list(dict.fromkeys(int(i) for i, _ in edits))
    invs = [inversions[i] for i in used]
    methods = {inv.settings.method for inv in invs}
    if len(methods) != 1:
        raise ValueError(f"one run edits inversions of one method, not {sorted(methods)}")
    inv_settings = invs[0].settings
    for inv in invs:
        if inv.settings.sampler != s.sampler or inv.settings.steps != s.steps:
            raise ValueError(f"inversion made with sampler {inv.settings.sampler!r} x {inv.settings.steps} "
                             f"steps; this edit runs {s.sampler!r} x {s.steps}: invert again")
        if inv.settings.method == "null_text" and inv.settings.guidance_scale != s.guidance_scale:
            raise ValueError("null-text embeddings were optimised for guidance "
                             f"{inv.settings.guidance_scale}, the edit uses {s.guidance_scale}")
    source_of = {i: k for k, i in enumerate(used)}
    if not 0 < s.strength <= 1:
        raise ValueError(f"strength {s.strength} must be in (0, 1]")
    n_run = max(1, round(s.strength * s.steps))
    first = s.steps - n_run            # the first sampler step run; inv.latents[k] sits where step steps-1-k lands
    start = torch.cat([inv.latents[len(inv.latents) - 1 - first] for inv in invs])
    sources, targets = _run(
        pipe, [inv.prompt for inv in invs], [t for _, t in edits], [source_of[int(i)] for i, _ in edits],
        start, negative=inv_settings.negative,
        trajectories=[inv.latents for inv in invs] if inv_settings.replay else None,
        null_embeddings=[inv.null_embeddings for inv in invs] if inv_settings.method == "null_text" else None,
        work=work, start_step=first, **s.loop_kwargs())
    return [(sources[source_of[int(i)]], targets[j]) for j, (i, _) in enumerate(edits)]

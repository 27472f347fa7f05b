"""Seeded, offline tiny model factories (no downloads): a tiny Stable Diffusion pipeline.

Usage: ``pipe = tiny_sd_pipeline(seed=0, image_size=64)``; ``save_tiny_sd("/tmp/tiny_sd")``.

The same seed gives bit-identical weights in any process, so a ``tiny://sd?seed=0`` model
named in a config means the same model on every Ray worker.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pairaug_ray.models.schedulers import ddim_scheduler

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
TEXT_MAX_LENGTH = 77  # as in real CLIP, so truncation behaves like the real models
VAE_CHANNELS = (16, 32, 32)  # three blocks: latent = image / 4, cheap at 64-128 px

# Words of chest radiograph reports the tiny BPE learns its merges from. Any text still
# tokenizes (the byte alphabet is in the vocabulary); these words just get short encodings.
_REPORT_WORDS = """
the lungs are clear there is no focal consolidation pleural effusion or pneumothorax
heart size is normal mildly moderately severely enlarged cardiac silhouette mediastinal
contour within normal limits cardiomegaly cardiomediastinum hilar contours unremarkable
left right bilateral basilar bibasilar apical upper lower middle lobe lung zone base apex
small moderate large trace minimal mild severe stable unchanged increased decreased new
interval improvement worsening resolved resolving persistent since prior study comparison
opacity opacities airspace disease atelectasis subsegmental linear plate like scarring
pulmonary edema vascular congestion interstitial markings prominence cephalization
pneumonia infection aspiration consolidation lesion nodule mass granuloma calcified
fracture rib ribs healed deformity osseous structures intact degenerative changes spine
support devices endotracheal tube enteric nasogastric tube central venous catheter line
tip terminates projects over the superior vena cava right atrium stomach pacemaker leads
sternotomy wires surgical clips chest radiograph frontal lateral views pa ap portable
upright supine semi erect there has been no acute cardiopulmonary process abnormality
findings impression suggest may represent cannot be excluded likely possibly possible
probable concerning for consistent with compatible with evidence of without with and of
blunting costophrenic angle angles hemidiaphragm diaphragm elevated flattening
hyperinflated hyperexpanded emphysema copd effusions pleural thickening tortuous aorta
calcification atherosclerotic knob thoracic spondylosis kyphosis scoliosis soft tissues
free air below not seen identified demonstrated present noted again otherwise in at is a
""".split()


def _byte_alphabet() -> list[str]:
    """The 256 characters the byte-level pre-tokenizer maps bytes to, in a fixed order."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _learn_merges(words: list[str], max_merges: int = 600) -> list[tuple[str, str]]:
    """Plain BPE over ``words`` (CLIP style: last symbol carries ``</w>``), deterministic ties."""
    counts = collections.Counter(words)
    splits = {w: list(w[:-1]) + [w[-1] + END_OF_WORD] for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: collections.Counter = collections.Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in splits.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return merges


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose vocabulary is built here, offline.

    Vocabulary = special tokens + the 256 byte symbols (plain and end-of-word) + merges learned
    from a built-in list of report words, so it encodes arbitrary text deterministically.
    """
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in [BOS, EOS] + alphabet + [c + END_OF_WORD for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges = _learn_merges([w.lower() for w in _REPORT_WORDS])
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=TEXT_MAX_LENGTH,
    )


def tiny_sd_pipeline(
    seed: int = 0,
    image_size: int = 64,
    unet_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 64,
    cross_attention_levels: str = "inner",
    text_layers: int = 2,
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with tiny random weights drawn from ``torch.manual_seed(seed)``.

    UNet (``unet_channels``, one layer per block, cross-attention on all but the outermost
    block, or on every block with ``cross_attention_levels="all"``: the prompt then also reaches
    the full latent resolution, as in SD 1.x whose outermost blocks attend to it), 3-block VAE
    (latent = image / 4), ``text_layers``-layer CLIP text encoder as wide as
    ``cross_attention_dim``, the offline tokenizer above and the reference prompt-to-prompt DDIM
    scheduler. The global torch RNG state is restored afterwards. Raises ``ValueError`` for an
    image size that is not a multiple of 4, unknown levels or fewer than one text layer.
    """
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    if text_layers < 1:
        raise ValueError(f"text_layers must be >= 1, got {text_layers}")
    if cross_attention_levels not in ("inner", "all"):
        raise ValueError(f"cross_attention_levels must be inner or all, not {cross_attention_levels!r}")
    n = len(unet_channels)
    outer = "CrossAttn" if cross_attention_levels == "all" else ""
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 4,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=tuple(unet_channels),
            down_block_types=(f"{outer}DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + (f"{outer}UpBlock2D",),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=min(32, unet_channels[0]),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=VAE_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=image_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=2 * cross_attention_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=4,
                max_position_embeddings=TEXT_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(path: str | Path, **kwargs) -> Path:
    """Write ``tiny_sd_pipeline(**kwargs)`` as a diffusers folder loadable by ``load_sd_pipeline``."""
    path = Path(path)
    tiny_sd_pipeline(**kwargs).save_pretrained(path)
    return path

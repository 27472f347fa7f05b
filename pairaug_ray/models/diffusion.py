"""Loading Stable Diffusion pipelines from one model string, and converting their images.

Usage: ``pipe = load_sd_pipeline("tiny://sd?size=64&seed=0")`` (or a local diffusers folder,
or a hub id such as ``"stanfordmimi/RoentGen"`` when its weights are cached or online);
``gray = to_grayscale(pipe(prompt, output_type="np").images[0])``.

Every pipeline gets the reference prompt-to-prompt DDIM scheduler, so InterAug generation and
IntraAug editing sample the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path


def _bind_pil_image_processors() -> None:
    """Bind transformers' PIL image processors under the names diffusers imports.

    diffusers' Stable Diffusion module imports ``CLIPImageProcessor`` (the safety checker's feature
    extractor, which this project never loads) and ``SiglipImageProcessor`` (IP-Adapter). In
    transformers 5 those names are torchvision backends; without torchvision (not a dependency:
    PyPI torchvision does not import beside the torch this project uses) transformers falls back to
    the ``...Pil`` classes and warns once per process, i.e. in every Ray worker. Binding the PIL
    classes first is that same fallback, without the warning.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    import transformers

    for name in ("CLIPImageProcessor", "SiglipImageProcessor"):
        pil = getattr(importlib.import_module("transformers"), f"{name}Pil", None)
        if pil is not None:
            # The lazy module may replace itself in sys.modules on first attribute access.
            setattr(sys.modules.get("transformers", transformers), name, pil)


_bind_pil_image_processors()

import diffusers.utils.deprecation_utils  # noqa: E402 (after the binding above)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from pairaug_ray.models.schedulers import ddim_scheduler
from pairaug_ray.models.uri import TINY_SCHEME, parse_tiny_uri as _parse_tiny

# diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
_NEW_DTYPE_NAME = hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype")
_DTYPE_KWARG = "dtype" if _NEW_DTYPE_NAME else "torch_dtype"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None``/"auto" -> float16 on CUDA, float32 elsewhere; strings like "fp16" or "bfloat16"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def parse_tiny_uri(model: str, seed: int = 0) -> dict:
    """``tiny://sd?size=64&seed=0&channels=32,64&cross=64`` -> ``tiny_sd_pipeline`` kwargs
    (``seed`` when the URI names none); the rules are ``models.uri``'s."""
    return _parse_tiny(model, kinds=("sd",), defaults={"seed": seed})[1]


def truncate_prompt(tokenizer, text: str, max_words: int | None = None) -> str:
    """``text`` cut (at a word boundary when possible) to fit the text encoder's context.

    ``max_words`` caps the words first; then the text is cut to ``tokenizer.model_max_length - 2``
    tokens (room for the start and end tokens), as the pipelines truncate, but at a word boundary
    so the prompt never ends in half a word. Pipelines then see no over-long input.
    """
    text = " ".join(text.split()[:max_words] if max_words else text.split())
    limit = tokenizer.model_max_length - 2
    # Truncating in the call (one token past the limit tells whether the text is longer) keeps the
    # tokenizer from warning "Token indices sequence length is longer than the specified maximum".
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=limit + 1)
    if len(enc["input_ids"]) <= limit:
        return text
    cut = enc["offset_mapping"][limit][0]
    head = text[:cut]
    if cut > 0 and not text[cut - 1].isspace() and not text[cut].isspace():
        # the cut falls inside a word: drop the partial word when there is a whole one before it
        head = head.rsplit(" ", 1)[0] if " " in head else head
    return head.rstrip()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_sd_pipeline(
    model: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline named by ``model``, on ``device`` in ``dtype``.

    ``model`` is a ``tiny://sd?...`` URI (seeded offline tiny weights; ``seed`` is the default
    when the URI names none), a local diffusers folder, or a hub id. Safety checker off,
    progress bars off, reference DDIM scheduler.
    """
    torch_dtype = resolve_dtype(dtype, device)
    if model.startswith(TINY_SCHEME):
        from pairaug_ray.models.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(**parse_tiny_uri(model, seed))
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
    else:
        local = Path(model).expanduser()
        is_local = local.is_dir()
        looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
        if not is_local and looks_like_path:  # hub ids are "org/name"
            raise FileNotFoundError(f"diffusion model folder {model!r} does not exist")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(local) if is_local else model,
                **{_DTYPE_KWARG: torch_dtype},
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=is_local or _hub_offline(),
            )
        except (OSError, ValueError) as exc:
            where = "local folder" if is_local else (
                "hub model (offline, not in the local cache)" if _hub_offline() else "hub model")
            raise RuntimeError(f"cannot load Stable Diffusion {where} {model!r}: {exc}") from exc
        pipe.scheduler = ddim_scheduler()
    if torch.device(device).type != "cpu":
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Pipeline output (HxWx3 or HxW float in [0,1]) -> float32 HxW in [0,1] (channel mean)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")
    return np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)

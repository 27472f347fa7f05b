"""Score augmented candidate pairs with the VLP dual encoder (input to stages/prune.py).

Every candidate row gets ``score_align`` = cos(new image, new text). IntraAug rows also get
``score_delta`` = cos(img_new - img_ref, txt_new - txt_orig) and ``score_img`` = cos(img_new,
img_ref); InterAug rows get NaN (null in Arrow) for those two. ``score_model`` records the scorer's URI.

Scale: the scores are plain cosine similarities in [-1, 1] of the L2-normalized embeddings, not
logits multiplied by the learned temperature. The paper's InterAug rule "CLIP score > 0.3" is read
on this cosine scale (as CLIPScore / LAION filtering do), so `PruneConfig.inter_threshold` is a
cosine.

Reference image of IntraAug (``img_ref``): by default the *generated source image*
(``source_image_png``), i.e. the prompt-to-prompt image drawn from the original report with the
same noise as the edited one. The paper's Δimage is "edited image minus original image"; in
prompt-to-prompt both come out of the same run, so their difference isolates the edit and not the
gap between the generator and the real scanner. ``ScoreConfig.reference_image_column`` switches to
another column (e.g. the real study image) when wanted.

Batched: one ``encode_image`` call (new + reference images) and one ``encode_text`` call (new +
original texts) per batch.

Usage:
    cfg = ScoreConfig(model="tiny://vlp?seed=0", batch_size=16)
    ds = ds.map_batches(ScoreStage, **cfg.map_batches_kwargs(ScoreStage))
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from pairaug_ray.stages.base import RowStage, StageConfig, StageError, resolve_device
from pairaug_ray.vocab import INTER, INTRA, SCORE_COLUMNS, normalize_branch  # noqa: F401 (re-exported)

BRANCH_INTER, BRANCH_INTRA = INTER, INTRA


class ScoreConfig(StageConfig):
    model: str = "tiny://vlp?seed=0"      # load_vlp URI: a saved folder or tiny://vlp?seed=N
    image_size: int | None = None           # decode → resize to this; None = the model's input size
    reference_image_column: str = "source_image_png"
    device: str = "auto"                    # auto = cuda when the actor got a GPU (num_gpus > 0), else cpu


def branch_of(row: dict) -> str:
    """Normalize the branch name: "inter"/"InterAug" → "inter", "intra"/"IntraAug" → "intra"."""
    branch = normalize_branch(row.get("branch"))
    if branch:
        return branch
    raise StageError("bad_branch", f"unknown branch {row.get('branch')!r}")


def _decode_png_pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
        if arr.ndim == 3:  # RGB(A) → luminance of the first three channels
            arr = arr[..., :3].mean(axis=-1)
        scale = 65535.0 if arr.dtype == np.uint16 or im.mode.startswith("I") else 255.0
    return (arr.astype(np.float32) / scale).clip(0.0, 1.0)


def decode_png_bytes(data) -> np.ndarray:
    """PNG bytes (8 or 16 bit grayscale) → float32 HxW in [0,1]."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise StageError("not_an_image", f"expected PNG bytes, got {type(data).__name__}")
    try:
        from pairaug_ray.io.dicom import decode_png
    except ImportError:
        decode_png = _decode_png_pillow
    try:
        return np.asarray(decode_png(bytes(data)), dtype=np.float32)
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this row's bad_image
        raise StageError(getattr(exc, "error_class", "bad_image"), f"cannot decode PNG: {exc}") from exc


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise StageError("missing_text", f"row has no {column!r} text")
    return value


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8).clamp(-1.0, 1.0)


def pair_scores(img_new: torch.Tensor, txt_new: torch.Tensor, img_ref: torch.Tensor | None = None,
                txt_orig: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three similarities for [N,D] embeddings (rows of the same index belong together)."""
    out = {"score_align": _cos(img_new, txt_new)}
    if img_ref is not None and txt_orig is not None:
        out["score_delta"] = _cos(img_new - img_ref, txt_new - txt_orig)
        out["score_img"] = _cos(img_new, img_ref)
    return out


class ScoreStage(RowStage):
    name = "score"

    def __init__(self, config: ScoreConfig):
        super().__init__(config)
        from pairaug_ray.models.vlp import load_vlp

        self.device = resolve_device(config.device, config.num_gpus)
        self.model = load_vlp(config.model, device=self.device)
        self.image_size = config.image_size or self.model.config.image_size

    def _pixels(self, data) -> torch.Tensor:
        arr = decode_png_bytes(data)
        if arr.ndim != 2:
            raise StageError("bad_image", f"expected a 2-D grayscale image, got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x[0]

    def process(self, rows: list[dict]) -> list[list[dict] | BaseException]:
        results: list[list[dict] | BaseException | None] = [None] * len(rows)
        images: list[torch.Tensor] = []
        texts: list[str] = []
        # per valid row: (row index, branch, image slots, text slots)
        plan: list[tuple[int, str, tuple[int, ...], tuple[int, ...]]] = []
        for i, row in enumerate(rows):
            try:
                branch = branch_of(row)
                imgs = [self._pixels(row.get("image_png"))]
                txts = [_text(row, "rewritten_report")]
                if branch == BRANCH_INTRA:
                    imgs.append(self._pixels(row.get(self.config.reference_image_column)))
                    txts.append(_text(row, "report"))
            except Exception as exc:  # noqa: BLE001 - becomes this row's error row
                results[i] = exc
                continue
            img_slots = tuple(range(len(images), len(images) + len(imgs)))
            txt_slots = tuple(range(len(texts), len(texts) + len(txts)))
            images.extend(imgs)
            texts.extend(txts)
            plan.append((i, branch, img_slots, txt_slots))

        if plan:
            with torch.inference_mode():
                img_emb = self.model.encode_image(torch.stack(images)).float().cpu()
                txt_emb = self.model.encode_text(texts).float().cpu()
            for i, branch, img_slots, txt_slots in plan:
                if branch == BRANCH_INTRA:
                    s = pair_scores(img_emb[img_slots[0]], txt_emb[txt_slots[0]],
                                    img_emb[img_slots[1]], txt_emb[txt_slots[1]])
                else:
                    s = pair_scores(img_emb[img_slots[0]], txt_emb[txt_slots[0]])
                # NaN, not None: an all-InterAug batch must still give float columns (stable schema).
                scores = {k: (float(s[k]) if k in s else float("nan")) for k in SCORE_COLUMNS}
                results[i] = [{**rows[i], **scores, "score_model": self.config.model}]
        return results  # type: ignore[return-value]


"""The VLP training set: which image-report pairs, in which order, and how a batch becomes tensors.

Usage::

    items = load_items("runs/ingest", "runs/augment", mix=["original", "inter"], splits=["train"])
    plan = plan_batches(items, mix=["original", "inter"], ratio={}, steps=200, batch_size=32, seed=0)
    ds = build_dataset(items, plan, world_size=2)         # one Ray Data block per (step, worker)
    pixels, texts = collate(batch, image_size=64, augment=True, seed=0)   # in a training worker

Sources (a training *item* is one image + one text):

- ``original``   the studies rows of the chosen splits (image + report);
- ``inter`` / ``intra``  the kept augmented pairs of that branch (pairs/ table: image + rewritten report);
- ``text_only``  every kept pair's rewritten report with the *original* study image (join on
  ``source_row_id``): text augmentation alone;
- ``image_only`` the original report with a classical transform of the original image (affine
  jitter, contrast/gamma, noise; no flips: left/right matters in a chest radiograph), fixed per
  row by a seed derived from its row id: image augmentation alone.

Determinism: the *plan* (which item fills which slot of which step) is a function of the items,
the mix, the ratio, the step budget, the batch size and the seed, and so is every random number a
sample sees (transform seed per row, on-the-fly augmentation seeded by (seed, step, slot)). A run
that resumes from a checkpoint at step k therefore sees exactly the batches an uninterrupted run
would have seen from step k on.

The plan is turned into a Ray Dataset whose blocks are, in order, (step 0, rank 0), (step 0,
rank 1), (step 1, rank 0), ...; with ``preserve_order`` Ray Data's ``streaming_split`` hands block
``i`` to rank ``i % world_size`` (equal-sized blocks, least-filled split first), so each worker
gets its part of each global batch in step order. Tables are read on the driver (small reads;
Ray Data's ListFiles task would need a whole CPU that the training workers already hold).
"""
from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from pairaug_ray import schema as S
from pairaug_ray.io.store import StorageConfig, Store
from pairaug_ray.vocab import TRAIN_SOURCES

log = logging.getLogger(__name__)

SOURCES = TRAIN_SOURCES
ITEM_SCHEMA = pa.schema([
    ("item_id", pa.string()),          # row id of the study or pair it came from (+ source)
    ("source", pa.string()),
    ("image_png", pa.binary()),
    ("text", pa.string()),
    ("transform", pa.string()),        # "none" | "classic" (image_only)
    ("transform_seed", pa.int64()),
])


def _seed64(*parts) -> int:
    """A stable non-negative 63-bit seed from any printable parts."""
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _items(source: str, ids, images, texts, transform: str = "none") -> pa.Table:
    ids = [f"{source}:{i}" for i in ids]
    seeds = [_seed64(i) if transform != "none" else 0 for i in ids]
    return pa.table({"item_id": ids, "source": [source] * len(ids), "image_png": images,
                     "text": texts, "transform": [transform] * len(ids), "transform_seed": seeds},
                    schema=ITEM_SCHEMA)


def _usable(table: pa.Table, text_col: str) -> pa.Table:
    """Rows with an image and a text that is not empty or whitespace only."""
    text = pc.utf8_trim_whitespace(pc.fill_null(table[text_col], ""))
    mask = pc.and_(pc.is_valid(table["image_png"]), pc.greater(pc.utf8_length(text), 0))
    return table.filter(mask)


def load_items(studies: str, pairs: str | None = None, mix: list[str] = ("original",),
               splits: list[str] = ("train",), storage: StorageConfig | None = None) -> pa.Table:
    """The training items (ITEM_SCHEMA) of the chosen sources, read on the driver."""
    unknown = set(mix) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown mix sources {sorted(unknown)}; known: {list(SOURCES)}")
    cols = ["row_id", "split", "image_png", "report"]
    st = Store(studies, storage).read_table(S.STUDIES_DIR, columns=cols)
    if st is None:
        raise FileNotFoundError(f"no studies table under {studies}/{S.STUDIES_DIR}")
    st = _usable(st.filter(pc.is_in(st["split"], pa.array(list(splits)))), "report")

    pr = None
    if {"inter", "intra", "text_only"} & set(mix):
        if not pairs:
            raise ValueError(f"mix {list(mix)} needs a pairs folder (TrainConfig.pairs)")
        pcols = ["row_id", "branch", "split", "kept", "source_row_id", "image_png", "rewritten_report"]
        pr = Store(pairs, storage).read_table(S.PAIRS_DIR, columns=pcols)
        if pr is None:
            raise FileNotFoundError(f"no pairs table under {pairs}/{S.PAIRS_DIR}")
        pr = pr.filter(pc.and_(pc.fill_null(pr["kept"], False),
                               pc.is_in(pr["split"], pa.array(list(splits)))))

    parts = []
    for source in dict.fromkeys(mix):
        if source == "original":
            t = _items(source, st["row_id"].to_pylist(), st["image_png"], st["report"].to_pylist())
        elif source == "image_only":
            t = _items(source, st["row_id"].to_pylist(), st["image_png"], st["report"].to_pylist(),
                       transform="classic")
        elif source in ("inter", "intra"):
            b = _usable(pr.filter(pc.equal(pr["branch"], source)), "rewritten_report")
            t = _items(source, b["row_id"].to_pylist(), b["image_png"],
                       b["rewritten_report"].to_pylist())
        else:  # text_only: the rewritten report with the source study's own image
            image_of = dict(zip(st["row_id"].to_pylist(), st["image_png"].to_pylist()))
            rows = [(r["row_id"], image_of[r["source_row_id"]], r["rewritten_report"])
                    for r in pr.select(["row_id", "source_row_id", "rewritten_report"]).to_pylist()
                    if r["source_row_id"] in image_of and r["rewritten_report"]]
            t = _items(source, [r[0] for r in rows], pa.array([r[1] for r in rows], pa.binary()),
                       [r[2] for r in rows])
        if len(t) == 0:
            log.warning("training source %r has no rows", source)
        parts.append(t)
    items = pa.concat_tables(parts)
    if len(items) == 0:
        raise ValueError(f"no training items for mix {list(mix)} in splits {list(splits)}")
    return items


def source_counts(items: pa.Table) -> dict[str, int]:
    values, counts = np.unique(np.asarray(items["source"].to_pylist(), dtype=object), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


class _Stream:
    """Endless epoch-wise shuffled indices: every index once per epoch, a new order each epoch."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator):
        self.indices, self.rng, self.buf, self.pos = indices, rng, np.empty(0, np.int64), 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.buf):
                self.buf, self.pos = self.rng.permutation(self.indices), 0
            k = min(n, len(self.buf) - self.pos)
            out.append(self.buf[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(out) if out else np.empty(0, np.int64)


def plan_batches(items: pa.Table, mix: list[str], ratio: dict[str, float], steps: int,
                 batch_size: int, seed: int) -> np.ndarray:
    """[steps, batch_size] item indices.

    Without ``ratio``, sources are sampled by their natural counts (shuffled epochs over all
    items). With ``ratio``, each slot draws its source with probability weight/sum(weights)
    (sources of the mix missing from ``ratio`` weigh 1.0), then the next item of that source's
    own shuffled epochs.
    """
    rng = np.random.default_rng(_seed64("plan", seed))
    if not ratio:
        return _Stream(np.arange(len(items)), rng).take(steps * batch_size).reshape(steps, batch_size)
    extra = set(ratio) - set(mix)
    if extra:
        raise ValueError(f"ratio names sources not in the mix: {sorted(extra)}")
    sources = np.asarray(items["source"].to_pylist(), dtype=object)
    names = list(dict.fromkeys(mix))
    weights = np.array([float(ratio.get(s, 1.0)) for s in names])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"ratio weights must be >= 0 with a positive sum, got {ratio}")
    for s, w in zip(names, weights):
        if w > 0 and not (sources == s).any():
            raise ValueError(f"source {s!r} has weight {w} but no rows")
    # Separate generators per purpose: a plan for fewer steps is a prefix of a longer one.
    streams = {s: _Stream(np.flatnonzero(sources == s), np.random.default_rng(_seed64("plan", seed, s)))
               for s in names}
    choice = rng.choice(len(names), size=steps * batch_size, p=weights / weights.sum())
    plan = np.empty(steps * batch_size, np.int64)
    for k, s in enumerate(names):
        where = np.flatnonzero(choice == k)
        plan[where] = streams[s].take(len(where))
    return plan.reshape(steps, batch_size)


def plan_weighted(weights: np.ndarray, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """[steps, batch_size] item indices drawn with replacement, item i with probability
    ``weights[i] / sum(weights)``; a plan for fewer steps is a prefix of a longer one."""
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 1 or not len(weights) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("weights must be a non-empty 1-D array of non-negative numbers with a positive sum")
    rng = np.random.default_rng(_seed64("plan-weighted", seed))
    return rng.choice(len(weights), size=steps * batch_size, p=weights / weights.sum()).reshape(steps, batch_size)


def build_dataset(items: pa.Table, plan: np.ndarray, world_size: int):
    """A Ray Dataset with one block of ``batch_size / world_size`` rows per (step, rank), in order."""
    import ray.data

    steps, batch = plan.shape
    if batch % world_size:
        raise ValueError(f"batch_size {batch} is not divisible by num_workers {world_size}")
    local = batch // world_size
    blocks = []
    for step in range(steps):
        for rank in range(world_size):
            idx = plan[step, rank * local:(rank + 1) * local]
            t = items.take(pa.array(idx)).select(["image_png", "text", "transform", "transform_seed"])
            slots = np.arange(rank * local, (rank + 1) * local, dtype=np.int64)
            t = t.append_column("slot", pa.array(slots)).append_column(
                "step", pa.array(np.full(local, step, np.int64))).append_column(
                "item", pa.array(idx.astype(np.int64)))
            blocks.append(t)
    return ray.data.from_arrow(blocks)


# ----------------------------------------------------------------------------------------------
# Images: decoding and augmentation (torch, no torchvision)

def _affine(x: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor,
            ty: torch.Tensor) -> torch.Tensor:
    """Per-sample zoom (>1 = zoom in), rotation (radians) and shift (fraction of the half-width)."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gamma_contrast(x: torch.Tensor, gamma: torch.Tensor, contrast: torch.Tensor,
                    brightness: torch.Tensor) -> torch.Tensor:
    v = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    x = x.clamp(0, 1) ** v(gamma)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * v(contrast) + mean + v(brightness)).clamp(0, 1)


def classic_transform(pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """The image-only augmentation of one image [1,H,W] in [0,1], fixed by ``seed``: rotation
    ±5°, zoom 0.92-1.08, shift ±4%, gamma 0.8-1.25, contrast ±15%, Gaussian noise σ 0-0.02."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(7, generator=g) * 2 - 1           # uniform in [-1, 1]
    x = pixels.unsqueeze(0)
    x = _affine(x, 1 + 0.08 * u[0:1], math.radians(5) * u[1:2], 0.08 * u[2:3], 0.08 * u[3:4])
    x = _gamma_contrast(x, 1.25 ** u[4:5], 1 + 0.15 * u[5:6], torch.zeros(1))
    noise = torch.randn(x.shape, generator=g) * 0.01 * (1 + u[6])
    return (x + noise).clamp(0, 1)[0]


def random_augment(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """On-the-fly training augmentation of a batch [B,1,H,W] in [0,1], one seed per sample:
    random crop (zoom 1-1.15, shift within the zoomed margin), rotation ±3°, brightness ±5%,
    contrast ±10%."""
    b = x.shape[0]
    u = torch.stack([torch.rand(6, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 2 - 1
    scale = 1 + 0.075 * (u[:, 0] + 1)
    margin = 1 - 1 / scale
    x = _affine(x, scale, math.radians(3) * u[:, 1], margin * u[:, 2], margin * u[:, 3])
    return _gamma_contrast(x, torch.ones(b), 1 + 0.1 * u[:, 4], 0.05 * u[:, 5])


def decode_batch_images(pngs, image_size: int) -> torch.Tensor:
    """PNG bytes (8/16-bit grayscale) -> float [B,1,S,S] in [0,1]."""
    from pairaug_ray.io.dicom import decode_png

    out = []
    for data in pngs:
        x = torch.from_numpy(np.ascontiguousarray(decode_png(bytes(data)), dtype=np.float32))[None, None]
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        out.append(x[0])
    return torch.stack(out)


def collate(batch: dict, image_size: int, augment: bool, seed: int) -> tuple[torch.Tensor, list[str]]:
    """A numpy batch of plan rows -> (pixels [b,1,S,S] float, texts). Deterministic per slot."""
    pixels = decode_batch_images(batch["image_png"], image_size)
    for i, (kind, tseed) in enumerate(zip(batch["transform"], batch["transform_seed"])):
        if kind == "classic":
            pixels[i] = classic_transform(pixels[i], int(tseed))
    if augment:
        # Seeded per (step, slot): the same global batch gets the same augmentation whatever
        # the number of workers, and a resumed run the same as an uninterrupted one.
        pixels = random_augment(pixels, [_seed64("augment", seed, int(st), int(sl))
                                         for st, sl in zip(batch["step"], batch["slot"])])
    return pixels, [str(t) for t in batch["text"]]

"""PhantomCXR anatomy: one patient's normal chest in normalised image units, seeds, geometry.

Usage::

    a = Anatomy.sample(seed=3); a.cp_y; a.hilum(-1)

Geometry works in normalised image coordinates (x, y in [0, 1], y down). Frontal views are shown
the radiological way: the patient's right is on the image left. In code, side s = -1 is the
patient's right (image left) and s = +1 the patient's left.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pairaug_ray.labeler import OBSERVATIONS, POSITIVE, UNCERTAIN, Finding
from pairaug_ray.vocab import NO_FINDING

RIGHT, LEFT = -1, 1
SEVERITY_GAIN = {"mild": 0.6, "moderate": 1.0, "severe": 1.5, None: 1.0}
UNCERTAIN_GAIN = 0.5  # uncertain findings render at half strength
RENDERED = [o for o in OBSERVATIONS if o != NO_FINDING]
# MIMIC-CXR's chexpert csv lists the 14 observations in alphabetical order.
CHEXPERT_COLUMNS = sorted(OBSERVATIONS)
REPORT_SOURCES = ("iu", "template", "auto")


def _seed_of(*parts) -> int:
    """Stable 32-bit seed from ints / strings (Python's hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0xFFFFFFFF


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(_seed_of(*parts))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64 arrays (wraps on purpose)."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# ------------------------------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True)
class Anatomy:
    """One patient's normal chest, in normalised image units."""

    cx: float = 0.5              # midline
    thorax_hw: float = 0.38      # half width of the rib cage's inner margin (lower thorax)
    apex_y: float = 0.12         # lung apices
    apex_x: float = 0.16         # apex distance from the midline
    lung_med: float = 0.055      # medial lung margin (mediastinal edge)
    dome_y: tuple[float, float] = (0.70, 0.72)   # hemidiaphragm domes (right, left)
    dome_x: float = 0.17         # dome distance from the midline
    cp_drop: float = 0.08        # costophrenic angle below the dome
    ctr: float = 0.45            # cardiothoracic ratio
    heart_shift: float = 0.12    # heart centre to the patient's left, as a fraction of its width
    heart_hh: float = 0.15       # heart half height
    mediastinum_hw: float = 0.05
    body_margin: float = 0.075   # soft tissue outside the rib cage
    lung_density: float = 0.16
    soft_density: float = 0.53
    heart_density: float = 0.76
    rib_y0: float = 0.10
    rib_spacing: float = 0.058
    gamma: float = 1.0
    noise: float = 0.012
    blur_px: float = 0.8         # at 256 px
    vessel_seed: int = 0

    @classmethod
    def sample(cls, seed: int) -> "Anatomy":
        r = _rng("anatomy", seed)
        u = lambda lo, hi: float(r.uniform(lo, hi))  # noqa: E731
        dome_r = u(0.685, 0.715)
        return cls(
            cx=u(0.485, 0.515), thorax_hw=u(0.355, 0.395), apex_y=u(0.10, 0.14),
            apex_x=u(0.15, 0.175), lung_med=u(0.05, 0.06),
            dome_y=(dome_r, dome_r + u(0.005, 0.03)), dome_x=u(0.15, 0.19), cp_drop=u(0.07, 0.09),
            ctr=u(0.42, 0.48), heart_shift=u(0.08, 0.16), heart_hh=u(0.13, 0.16),
            mediastinum_hw=u(0.045, 0.058), body_margin=u(0.06, 0.095),
            lung_density=u(0.13, 0.18), soft_density=u(0.52, 0.57), heart_density=u(0.73, 0.8),
            rib_y0=u(0.085, 0.11), rib_spacing=u(0.055, 0.062), gamma=u(0.9, 1.1),
            noise=u(0.008, 0.016), blur_px=u(0.6, 1.0), vessel_seed=int(r.integers(2**31)))

    @property
    def cp_y(self) -> float:
        return max(self.dome_y) + self.cp_drop

    def hilum(self, s: int) -> tuple[float, float]:
        return self.cx + s * 0.1, 0.45 + 0.15 * (self.apex_y - 0.12)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :], c[:, None]


def _lat(a: Anatomy, Y):
    """Lateral lung margin (distance from the midline) at height Y: round apex, then the wall."""
    t = np.clip((Y - a.apex_y) / (0.62 * (a.cp_y - a.apex_y)), 0, 1)
    return a.apex_x + (a.thorax_hw - a.apex_x) * np.sqrt(1 - (1 - t) ** 2)


def _med(a: Anatomy, Y):
    t = np.clip((Y - a.apex_y) / (0.22 * (a.cp_y - a.apex_y)), 0, 1)
    return a.apex_x - (a.apex_x - a.lung_med) * np.sqrt(1 - (1 - t) ** 2)


def _diaphragm(a: Anatomy, s: int, d):
    """Height of side s's hemidiaphragm at distance d from the midline."""
    dome = a.dome_y[0 if s < 0 else 1]
    lat = np.clip((d - a.dome_x) / (a.thorax_hw - a.dome_x), 0, None)
    med = np.clip((a.dome_x - d) / a.dome_x, 0, None)
    return dome + a.cp_drop * lat ** 2 + 0.07 * med ** 2


def _lung_mask(a: Anatomy, s: int, X, Y) -> np.ndarray:
    d = s * (X - a.cx)
    return (Y >= a.apex_y) & (d >= _med(a, Y)) & (d <= _lat(a, Y)) & (Y <= _diaphragm(a, s, d))


def _inside_lung(a: Anatomy, s: int, x: float, y: float, margin: float = 0.0) -> bool:
    d = s * (x - a.cx)
    return bool(y >= a.apex_y + margin and _med(a, y) + margin <= d <= _lat(a, y) - margin
                and y <= _diaphragm(a, s, d) - margin)


def _body_mask(a: Anatomy, X, Y) -> np.ndarray:
    """Body outline: neck, rounded shoulders, chest wall tapering slightly towards the waist."""
    d = np.abs(X - a.cx)
    full = a.thorax_hw + a.body_margin + 0.03 - 0.04 * np.clip((Y - 0.2) / 0.6, 0, 1)
    shoulder_top = 0.015 + 0.1 * np.clip((d - 0.09) / (a.thorax_hw + a.body_margin), 0, 1) ** 2
    return (d <= full) & (Y >= np.where(d < 0.09, 0.0, shoulder_top))


# ------------------------------------------------------------------------------------------------
# Drawing primitives


def _raise(D: np.ndarray, alpha, level: float) -> None:
    """Blend D towards `level` by alpha, only ever making it denser."""
    D += alpha * np.clip(level - D, 0, None)


def _draw_segments(layer: np.ndarray, segs, widths, values, mode: str = "max") -> None:
    """Gaussian-profile line segments (normalised coords) drawn into `layer` inside their bboxes."""
    S = layer.shape[0]
    for (x0, y0, x1, y1), w, v in zip(segs, widths, values):
        m = 3 * w
        c0, c1 = int(max(0, (min(x0, x1) - m) * S)), int(min(S, (max(x0, x1) + m) * S + 1))
        r0, r1 = int(max(0, (min(y0, y1) - m) * S)), int(min(S, (max(y0, y1) + m) * S + 1))
        if c1 <= c0 or r1 <= r0:
            continue
        px = ((np.arange(c0, c1) + 0.5) / S)[None, :]
        py = ((np.arange(r0, r1) + 0.5) / S)[:, None]
        dx, dy = x1 - x0, y1 - y0
        L2 = dx * dx + dy * dy or 1e-12
        t = np.clip(((px - x0) * dx + (py - y0) * dy) / L2, 0, 1)
        dist2 = (px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2
        val = v * np.exp(-dist2 / (w * w))
        patch = layer[r0:r1, c0:c1]
        if mode == "max":
            np.maximum(patch, val, out=patch)
        else:
            patch += val


def _bezier(p0, p1, p2, n: int = 16) -> list[tuple[float, float, float, float]]:
    t = np.linspace(0, 1, n + 1)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t ** 2 * np.array(p2)
    return [(*pts[i], *pts[i + 1]) for i in range(n)]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 24) -> np.ndarray:
    """Low-frequency noise in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    out = ndimage.zoom(coarse, size / cells, order=1, mode="nearest", grid_mode=True)
    return out[:size, :size]


# ------------------------------------------------------------------------------------------------
# Reading findings (severity / laterality / details the report names)


def _active(findings: dict) -> dict[str, tuple[Finding, float]]:
    """Observations to draw, with their gain (severity x certainty)."""
    out = {}
    for obs, f in findings.items():
        if obs not in RENDERED or f.state not in (POSITIVE, UNCERTAIN):
            continue
        gain = SEVERITY_GAIN.get(f.severity, 1.0) * (1.0 if f.state == POSITIVE else UNCERTAIN_GAIN)
        out[obs] = (f, gain)
    return out


def _sides(f: Finding, rng: np.random.Generator, bilateral_ok: bool = True) -> list[int]:
    lat = f.laterality
    if lat is None:  # the evidence may still name a side
        text = (f.evidence or "").lower()
        has_r, has_l = bool(re.search(r"\bright\b", text)), bool(re.search(r"\bleft\b", text))
        lat = ("bilateral" if re.search(r"\b(?:bilateral|both|bibasilar)\b", text) or (has_r and has_l)
               else "right" if has_r else "left" if has_l else None)
    if lat == "right":
        return [RIGHT]
    if lat == "left":
        return [LEFT]
    if lat == "bilateral":
        return [RIGHT, LEFT] if bilateral_ok else [RIGHT if rng.random() < 0.5 else LEFT]
    choices = [[RIGHT], [LEFT]] + ([[RIGHT, LEFT]] if bilateral_ok else [])
    return choices[int(rng.integers(len(choices)))]


def _lobe(f: Finding, rng: np.random.Generator) -> str:
    text = (f.evidence or "").lower()
    for word, lobe in (("upper", "upper"), ("apical", "upper"), ("apex", "upper"), ("middle", "middle"),
                       ("lingul", "middle"), ("mid lung", "middle"), ("lower", "lower"),
                       ("bas", "lower")):
        if word in text:
            return lobe
    return str(rng.choice(["upper", "middle", "lower", "lower"]))


def _lobe_center(a: Anatomy, s: int, lobe: str) -> tuple[float, float]:
    dome = a.dome_y[0 if s < 0 else 1]
    dx, y = {"upper": (0.19, a.apex_y + 0.13), "middle": (0.2, 0.5), "lower": (0.24, dome - 0.1)}[lobe]
    return a.cx + s * dx, y


_DEVICE_WORDS = (
    ("ett", ("endotracheal", "et tube", "ett", "intubat")),
    ("pacer", ("pacemaker", "pacer", "icd", "defibrillator", "pacing")),
    ("ng", ("nasogastric", "ng tube", "enteric", "feeding tube", "orogastric", "og tube", "dobhoff")),
    ("cvc", ("central", "catheter", "picc", "port", "line", "ij ", "jugular", "subclavian")),
    ("chest_tube", ("chest tube", "pigtail", "thoracostomy", "drain")),
    ("sternotomy", ("sternotomy", "wires", "cabg", "cardiac surgery")),
)


def _device_kinds(f: Finding, rng: np.random.Generator) -> list[str]:
    text = (f.evidence or "").lower()
    kinds = [k for k, words in _DEVICE_WORDS if any(w in text for w in words)]
    if not kinds:
        pool = ["ett", "cvc", "ng", "pacer"]
        kinds = list(rng.choice(pool, size=int(rng.integers(1, 3)), replace=False))
    return kinds

"""PhantomCXR: procedural chest radiographs whose anatomy shows the findings of a report.

Every study is a (report, labels, image, DICOM) tuple. The labels are what the project's labeler
(`pairaug_ray.findings.label_report`) reads from the report, and the image is rendered from those
labels, so a model that learns image <-> report alignment on PhantomCXR can beat chance.

Usage:
    from pairaug_ray import phantom
    img = phantom.render(label_report("Moderate left pleural effusion."), size=256, seed=3)
    for st in phantom.iter_studies(100, seed=0): ...
    phantom.write_dataset("/tmp/phantom", n=200, seed=0)

Geometry works in normalised image coordinates (x, y in [0, 1], y down). Frontal views are shown
the radiological way: the patient's right is on the image left. In code, side s = -1 is the
patient's right (image left) and s = +1 the patient's left.

Study indexing (so Ray tasks can make shards in parallel): patient p owns a seeded number of
studies k_p in `studies_per_patient`; study i belongs to the patient whose block of consecutive
indices holds i (block starts are a cumulative sum of the k_p, each a hash of (seed, p)). Study i
therefore depends only on (i, seed, studies_per_patient) and `study(i)` equals the i-th item of
`iter_studies`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import hashlib
import io
import os
import re
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
from scipy import ndimage

from pairaug_ray import findings as F
from pairaug_ray.findings import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN, Finding

RIGHT, LEFT = -1, 1
SEVERITY_GAIN = {"mild": 0.6, "moderate": 1.0, "severe": 1.5, None: 1.0}
UNCERTAIN_GAIN = 0.5  # uncertain findings render at half strength
RENDERED = [o for o in OBSERVATIONS if o != "No Finding"]
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


# ------------------------------------------------------------------------------------------------
# Rendering


def render(findings: dict, size: int = 256, seed: int = 0, anatomy: Anatomy | None = None,
           noise_seed: int | None = None) -> np.ndarray:
    """Frontal chest radiograph showing `findings` (float32 HxW in [0, 1], bright = dense).

    `seed` fixes the anatomy (unless given) and where findings sit; `noise_seed` (default: seed)
    fixes the quantum noise, so one patient's studies share anatomy and lesion positions.
    """
    return render_with_layout(findings, size, seed, anatomy, noise_seed)[0]


def render_with_layout(findings: dict, size: int = 256, seed: int = 0, anatomy: Anatomy | None = None,
                       noise_seed: int | None = None) -> tuple[np.ndarray, dict]:
    """`render` plus where each finding was drawn (normalised coords), for checks and evaluation."""
    a = anatomy or Anatomy.sample(seed)
    S = int(size)
    X, Y = _grid(S)
    act = _active(findings)
    layout: dict = {}
    rng_of = lambda obs: _rng("place", seed, obs)  # noqa: E731  per-observation placement

    # Shape changes first: heart size and mediastinal width.
    ctr = a.ctr
    if "Cardiomegaly" in act:
        f, _ = act["Cardiomegaly"]
        ctr = ({"mild": 0.55, "moderate": 0.59, "severe": 0.65}.get(f.severity, 0.58)
               if f.state == POSITIVE else 0.505)
    layout["ctr"] = ctr
    med_scale = 1.0
    if "Enlarged Cardiomediastinum" in act:
        f, g = act["Enlarged Cardiomediastinum"]
        med_scale = 1.0 + 0.8 * g
    W = ctr * 2 * a.thorax_hw
    hha = W / 2  # half of the heart's horizontal extent (what the CTR measures)
    theta, hb = 0.4, 0.7 * a.heart_hh  # long axis tilted down to the patient's left; short semi-axis
    ha = np.sqrt(hha ** 2 - (hb * np.sin(theta)) ** 2) / np.cos(theta)
    hvert = np.sqrt((ha * np.sin(theta)) ** 2 + (hb * np.cos(theta)) ** 2)
    hcx, hcy = a.cx + a.heart_shift * W, float(np.mean(a.dome_y)) - hvert + 0.045

    # Soft tissue and lungs.
    body = _body_mask(a, X, Y)
    soft = a.soft_density * (1 - 0.22 * np.clip(np.abs(X - a.cx) / (a.thorax_hw + a.body_margin), 0, 1) ** 6)
    D = np.where(body, soft, 0.02).astype(np.float32)
    lungs = {s: _lung_mask(a, s, X, Y) for s in (RIGHT, LEFT)}
    lung_any = lungs[RIGHT] | lungs[LEFT]

    vessels = np.zeros((S, S), np.float32)
    vr = np.random.default_rng(a.vessel_seed)
    segs, widths, values = [], [], []
    for s in (RIGHT, LEFT):
        hx, hy = a.hilum(s)
        for phi in np.linspace(-1.25, 1.15, 9) + vr.normal(0, 0.08, 9):
            L = vr.uniform(0.1, 0.17)
            ex, ey = hx + s * L * np.cos(phi), hy + L * np.sin(phi)
            segs.append((hx, hy, ex, ey)); widths.append(0.0045); values.append(0.07)
            for dphi in (-0.35, 0.35):
                L2 = vr.uniform(0.06, 0.1)
                p = phi + dphi + vr.normal(0, 0.1)
                segs.append((ex, ey, ex + s * L2 * np.cos(p), ey + L2 * np.sin(p)))
                widths.append(0.003); values.append(0.045)
    _draw_segments(vessels, segs, widths, values)
    tex = _smooth_noise(vr, S, 32)
    lung_level = (a.lung_density * (0.9 + 0.25 * tex) + 0.05 * np.clip((Y - 0.45) / 0.3, 0, 1)
                  + 0.03 * np.clip(np.abs(X - a.cx) / a.thorax_hw - 0.75, 0, None) * 4).astype(np.float32)

    # Pneumothorax: the lung retracts towards the hilum, leaving a lucent rim without markings.
    if "Pneumothorax" in act:
        f, g = act["Pneumothorax"]
        r = rng_of("Pneumothorax")
        frac = {"mild": 0.87, "moderate": 0.76, "severe": 0.58}.get(f.severity, 0.78)
        layout["Pneumothorax"] = []
        for s in _sides(f, r, bilateral_ok=False):
            hx, hy = a.hilum(s)
            hy += 0.05
            shrunk = _lung_mask(a, s, hx + (X - hx) / frac, hy + (Y - hy) / frac)
            fade = np.clip((hy + 0.12 - Y) / 0.08, 0, 1)
            rim = (lungs[s] & ~shrunk) * fade
            vessels *= 1 - rim
            lung_level -= rim * a.lung_density * 0.6 * min(1.0, 0.5 + g / 2)
            edge = ndimage.gaussian_gradient_magnitude(shrunk.astype(np.float32), 0.6 * S / 256)
            edge = edge / (edge.max() + 1e-6) * (ndimage.maximum_filter(rim, 5) > 0.2)
            lung_level += 0.14 * min(1.0, g) * edge
            layout["Pneumothorax"].append({"side": s, "fraction": frac})

    D = np.where(lung_any, lung_level + vessels, D)

    # Abdomen under the diaphragm (denser) with a gastric bubble on the left.
    d_abs = np.abs(X - a.cx)
    below = (Y > np.where(X < a.cx, _diaphragm(a, RIGHT, d_abs), _diaphragm(a, LEFT, d_abs))) & body
    D += 0.05 * below * np.clip((a.thorax_hw + 0.04 - d_abs) / 0.05, 0, 1)
    gb = ((X - a.cx - 0.15) / 0.04) ** 2 + ((Y - a.dome_y[1] - 0.045) / 0.022) ** 2 < 1
    D = np.where(gb & below, D - 0.22, D)

    # Mediastinum, trachea, aortic knob, hila, heart.
    yy = np.clip((Y - 0.2) / 0.25, 0, 1)
    med_hw = a.mediastinum_hw * (1 + (med_scale - 1) * np.sin(np.pi * np.clip((Y - 0.12) / 0.4, 0, 1)))
    med_hw = med_hw * (0.85 + 0.25 * yy)
    mediastinum = (np.abs(X - a.cx - 0.008) <= med_hw) & (Y < hcy) & body
    _raise(D, mediastinum.astype(np.float32), a.heart_density - 0.06)
    knob = ((X - a.cx - med_hw - 0.005) / 0.035) ** 2 + ((Y - 0.31) / 0.035) ** 2 < 1
    _raise(D, knob.astype(np.float32) * (Y < hcy - 0.1), a.heart_density - 0.06)
    carina = 0.33
    trachea = (np.abs(X - a.cx) < 0.017) & (Y < carina) & (Y > 0.0)
    D = np.where(trachea, D - 0.22 * np.clip((carina - Y) / 0.05, 0, 1), D)
    bronchi = np.zeros((S, S), np.float32)
    _draw_segments(bronchi, [(a.cx, carina, a.cx - 0.07, carina + 0.07), (a.cx, carina, a.cx + 0.08, carina + 0.08)],
                   [0.009, 0.009], [0.15, 0.15])
    D -= bronchi
    for s in (RIGHT, LEFT):
        hx, hy = a.hilum(s)
        hil = np.exp(-(((X - hx) / 0.03) ** 2 + ((Y - hy) / 0.045) ** 2))
        _raise(D, 0.7 * hil * lungs[s], 0.36)
    hu = (X - hcx) * np.cos(theta) + (Y - hcy) * np.sin(theta)
    hv = -(X - hcx) * np.sin(theta) + (Y - hcy) * np.cos(theta)
    heart_mask = (hu / ha) ** 2 + (hv / hb) ** 2 <= 1
    # The heart sits on the diaphragm: fill between its lower contour and the domes.
    chord = 1 / np.sqrt((np.cos(theta) / ha) ** 2 + (np.sin(theta) / hb) ** 2)
    heart_mask |= (Y >= hcy) & (np.abs(X - hcx) <= chord)
    heart_mask = (heart_mask & ~below).astype(np.float32)  # below the domes it merges with the abdomen
    _raise(D, heart_mask, a.heart_density)
    layout["heart"] = {"cx": hcx, "cy": hcy, "half_width": hha}

    # Findings that fill air space (before bones, which project over them).
    _draw_findings(D, a, act, lungs, X, Y, S, rng_of, layout, hcx, hcy, hha)

    # Bones: spine, posterior + anterior ribs, clavicles.
    spine_w = 0.032
    spine = np.clip(1 - (np.abs(X - a.cx) / spine_w) ** 6, 0, 1) * (Y > 0.05)
    D += 0.1 * spine * (0.85 + 0.15 * np.cos(2 * np.pi * (Y - a.rib_y0) / a.rib_spacing))
    # Bones project over the heart less visibly (it is already near the film's shoulder).
    D += _ribs(a, X, Y, act, rng_of, layout) * body * (1 - 0.6 * heart_mask - 0.4 * mediastinum)
    for s in (RIGHT, LEFT):
        d = s * (X - a.cx)
        t = np.clip((d - 0.03) / 0.27, 0, 1)
        yc = 0.165 + (0.105 - 0.165) * t + 0.01 * np.sin(2 * np.pi * t) + 0.1 * (a.apex_y - 0.12)
        clav = np.clip(1 - ((Y - yc) / 0.012) ** 2, 0, 1) * ((d > 0.03) & (d < 0.31))
        D += 0.16 * clav

    # Film: blur, contrast curve, noise. Devices go on after the blur: radiopaque edges stay sharp.
    D = ndimage.gaussian_filter(D, a.blur_px * S / 256)
    if "Support Devices" in act:
        _draw_devices(D, a, act["Support Devices"], S, rng_of, layout, hcx, hcy, carina)
    D = np.clip(D, 0, 1) ** a.gamma
    nr = np.random.default_rng(_seed_of("noise", seed if noise_seed is None else noise_seed))
    D += a.noise * nr.standard_normal((S, S)).astype(np.float32)
    D += 0.03 * (_smooth_noise(nr, S, 6) - 0.5)
    return np.clip(D, 0, 1).astype(np.float32), layout


def _ribs(a: Anatomy, X, Y, act, rng_of, layout) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(X.shape, Y.shape), np.float32)
    fracture = None
    if "Fracture" in act:
        f, g = act["Fracture"]
        r = rng_of("Fracture")
        text = (f.evidence or "").lower()
        m = re.search(r"(\d+)(?:st|nd|rd|th)", text)
        k = int(np.clip(int(m.group(1)) - 1, 2, 8)) if m else int(r.integers(3, 8))
        fracture = {"side": _sides(f, r, bilateral_ok=False)[0], "rib": k, "u": float(r.uniform(0.55, 0.8)),
                    "gain": min(1.0, g)}
        layout["Fracture"] = [fracture]
    for s in (RIGHT, LEFT):
        d = s * (X - a.cx)
        u = d / a.thorax_hw
        extent = ((u > 0.07) & (u < 1.1)).astype(np.float32)
        for k in range(10):
            w = 0.0095 + 0.0008 * k
            yc = a.rib_y0 + k * a.rib_spacing - 0.05 * u + 0.17 * u ** 2 + 0.04 * np.clip(u - 0.8, 0, None)
            gap = 1.0
            if fracture and fracture["side"] == s and fracture["rib"] == k:
                yc = yc + (u > fracture["u"]) * 1.4 * w * fracture["gain"]
                gap = 1 - fracture["gain"] * np.exp(-(((u - fracture["u"]) * a.thorax_hw) / 0.006) ** 2)
            p = np.abs(Y - yc) / w
            out += np.where(p < 1, 0.075 + 0.05 * p ** 4, 0) * extent * gap
        for k in range(6):  # anterior ribs: faint, running down towards the sternum
            yc = a.rib_y0 + 0.07 + k * 0.07 + 0.1 * (1 - u)
            p = np.abs(Y - yc) / 0.008
            out += np.where(p < 1, 0.03, 0) * ((u > 0.35) & (u < 1.05))
    return out


def _patch(rng, S, X, Y, cx, cy, rx, ry, patchy: float) -> np.ndarray:
    """Soft blob around (cx, cy); `patchy` in [0, 1] breaks it up with low-frequency noise."""
    env = np.exp(-(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2))
    n = _smooth_noise(rng, S, 20)
    return np.clip((env * (1 - patchy + patchy * 1.6 * n) - 0.3) / 0.35, 0, 1)


def _draw_findings(D, a: Anatomy, act, lungs, X, Y, S, rng_of, layout, hcx, hcy, hha) -> None:
    lung_any = (lungs[RIGHT] | lungs[LEFT]).astype(np.float32)

    if "Edema" in act:
        f, g = act["Edema"]
        r = rng_of("Edema")
        haze = np.zeros_like(D)
        for s in (RIGHT, LEFT):
            hx, hy = a.hilum(s)
            haze += np.exp(-(((X - hx - s * 0.03) / 0.11) ** 2 + ((Y - hy - 0.02) / 0.15) ** 2))
        _raise(D, np.clip(0.55 * g, 0, 0.85) * haze * lung_any, 0.5)
        segs = []
        for s in (RIGHT, LEFT):
            dome = a.dome_y[0 if s < 0 else 1]
            for yk in np.linspace(dome - 0.19, dome - 0.02, 7) + r.normal(0, 0.004, 7):
                xl = a.cx + s * (_lat(a, yk) - 0.005)
                segs.append((xl, yk, xl - s * r.uniform(0.025, 0.04), yk))
        kerley = np.zeros_like(D)
        _draw_segments(kerley, segs, [0.0025] * len(segs), [0.12 * min(1.3, g)] * len(segs))
        D += kerley * lung_any
        layout["Edema"] = {"gain": g}

    for obs, level, patchy, size in (("Consolidation", 0.62, 0.45, 0.085), ("Pneumonia", 0.56, 0.8, 0.095),
                                     ("Lung Opacity", 0.4, 0.1, 0.1)):
        if obs not in act:
            continue
        f, g = act[obs]
        r = rng_of(obs)
        lobe = _lobe(f, r)
        layout[obs] = []
        for s in _sides(f, r, bilateral_ok=True):
            x0, y0 = _lobe_center(a, s, lobe)
            x0 += float(r.normal(0, 0.015)); y0 += float(r.normal(0, 0.015))
            rad = size * (0.8 + 0.3 * SEVERITY_GAIN.get(f.severity, 1.0))
            blob = _patch(r, S, X, Y, x0, y0, rad, rad * 1.15, patchy)
            if obs == "Lung Opacity":  # hazy: no hard edge
                blob = ndimage.gaussian_filter(blob, 4 * S / 256)
            strength = 1.0 if f.state == POSITIVE else UNCERTAIN_GAIN
            _raise(D, strength * blob * lungs[s], level)
            layout[obs].append({"side": s, "lobe": lobe, "center": (x0, y0), "radius": rad})

    if "Atelectasis" in act:
        f, g = act["Atelectasis"]
        r = rng_of("Atelectasis")
        plates = np.zeros_like(D)
        layout["Atelectasis"] = []
        for s in _sides(f, r):
            dome = a.dome_y[0 if s < 0 else 1]
            n = 1 + (f.severity in ("moderate", "severe", None)) + (f.severity == "severe")
            segs = []
            for j in range(n):
                yc = dome - 0.05 - 0.045 * j + float(r.normal(0, 0.006))
                xc = a.cx + s * float(r.uniform(0.16, 0.25))
                half, tilt = float(r.uniform(0.05, 0.085)), float(r.normal(0, 0.12))
                segs.append((xc - half, yc - tilt * half * s, xc + half, yc + tilt * half * s))
                layout["Atelectasis"].append({"side": s, "center": (xc, yc)})
            _draw_segments(plates, segs, [0.0075] * n, [1.0] * n)
            if f.severity == "severe":  # lower-lobe collapse: wedge at the base
                plates = np.maximum(plates, 0.7 * _patch(r, S, X, Y, a.cx + s * 0.12, dome - 0.04, 0.07, 0.05, 0.2))
        strength = 1.0 if f.state == POSITIVE else UNCERTAIN_GAIN
        _raise(D, 0.8 * strength * plates * lung_any, 0.55)

    if "Lung Lesion" in act:
        f, g = act["Lung Lesion"]
        r = rng_of("Lung Lesion")
        text = (f.evidence or "").lower()
        m = re.search(r"(\d+(?:\.\d+)?)\s*(cm|mm)", text)
        if m:
            cm = float(m.group(1)) / (10 if m.group(2) == "mm" else 1)
        else:
            cm = {"mild": 0.9, "moderate": 1.8, "severe": 4.5}.get(f.severity, 1.5)
            if "mass" in text:
                cm = max(cm, 4.0)
        radius = float(np.clip(cm / 2 * (2 * a.thorax_hw / 30.0), 0.009, 0.08))
        count = int(r.integers(2, 4)) if re.search(r"nodules|masses|multiple|metasta", text) else 1
        sides = _sides(f, r, bilateral_ok=count > 1)
        strength = 1.0 if f.state == POSITIVE else UNCERTAIN_GAIN
        layout["Lung Lesion"] = []
        for j in range(count):
            s = sides[j % len(sides)]
            for _ in range(200):
                x0 = a.cx + s * float(r.uniform(a.lung_med + 0.03, a.thorax_hw - 0.03))
                y0 = float(r.uniform(a.apex_y + 0.06, max(a.dome_y) - 0.04))
                in_heart = ((x0 - hcx) / hha) ** 2 + ((y0 - hcy) / 0.13) ** 2 < 1.3
                if _inside_lung(a, s, x0, y0, margin=radius + 0.015) and not in_heart:
                    break
            ang = np.arctan2(Y - y0, X - x0)
            rr = radius * (1 + (0.12 * np.sin(3 * ang + r.uniform(0, 6)) if cm >= 3 else 0))
            dist = np.sqrt((X - x0) ** 2 + (Y - y0) ** 2)
            disc = 1 / (1 + np.exp(np.clip((dist - rr) / (0.12 * radius), -30, 30)))
            _raise(D, strength * disc, 0.64)
            layout["Lung Lesion"].append({"side": s, "center": (x0, y0), "radius": radius})

    if "Pleural Effusion" in act:
        f, g = act["Pleural Effusion"]
        r = rng_of("Pleural Effusion")
        height = {"mild": 0.12, "moderate": 0.2, "severe": 0.34}.get(f.severity, 0.18)
        if f.state == UNCERTAIN:
            height = 0.12
        layout["Pleural Effusion"] = []
        for s in _sides(f, r):
            d = s * (X - a.cx)
            cp = a.dome_y[0 if s < 0 else 1] + a.cp_drop
            top = cp - height - 0.03
            q = np.clip((d - a.lung_med) / (a.thorax_hw - a.lung_med), 0, 1)
            meniscus = top + 0.07 * (1 - q ** 2)
            region = (d > 0.01) & (d <= _lat(a, Y) + 0.004) & (Y <= cp + 0.015)
            alpha = np.clip((Y - meniscus) / 0.035, 0, 1) * region
            _raise(D, (1.0 if f.state == POSITIVE else UNCERTAIN_GAIN) * alpha, 0.62)
            layout["Pleural Effusion"].append({"side": s, "top": top})

    if "Pleural Other" in act:
        f, g = act["Pleural Other"]
        r = rng_of("Pleural Other")
        layout["Pleural Other"] = []
        for s in _sides(f, r):
            d = s * (X - a.cx)
            thick = 0.006 + 0.008 * g
            band = ((d > _lat(a, Y) - thick) & (Y > a.apex_y) & (Y < a.cp_y - 0.06)) | (
                (Y < a.apex_y + thick + 0.01) & lungs[s])
            _raise(D, (band & lungs[s]).astype(np.float32) * min(1.0, 0.5 + g / 2), 0.5)
            layout["Pleural Other"].append({"side": s})


def _draw_devices(D, a: Anatomy, fg, S, rng_of, layout, hcx, hcy, carina) -> None:
    f, g = fg
    r = rng_of("Support Devices")
    kinds = _device_kinds(f, r)
    layer = np.zeros_like(D)
    w = 0.0055
    dome_l = a.dome_y[1]
    for kind in kinds:
        segs: list = []
        if kind == "ett":
            tip = carina - float(r.uniform(0.03, 0.06))
            # radiopaque stripe plus the fainter tube walls
            segs += [(a.cx + 0.004, 0.0, a.cx + 0.001, tip)]
            _draw_segments(layer, [(a.cx + off + 0.003, 0.0, a.cx + off, tip) for off in (-0.009, 0.009)],
                           [w] * 2, [0.35] * 2)
        elif kind == "cvc":
            if r.random() < 0.6:  # right internal jugular
                segs += _bezier((a.cx - 0.15, 0.0), (a.cx - 0.07, 0.14), (a.cx - 0.03, 0.37))
            else:  # left subclavian
                segs += _bezier((a.cx + 0.3, 0.13), (a.cx + 0.05, 0.2), (a.cx - 0.03, 0.36))
        elif kind == "ng":
            segs += _bezier((a.cx + 0.004, 0.0), (a.cx + 0.01, dome_l - 0.2), (a.cx + 0.03, dome_l))
            segs += _bezier((a.cx + 0.03, dome_l), (a.cx + 0.06, dome_l + 0.1), (a.cx + 0.16, dome_l + 0.07))
        elif kind == "pacer":
            gx, gy = a.cx + 0.27, 0.17
            box = (np.abs(_grid(S)[0] - gx) < 0.04) & (np.abs(_grid(S)[1] - gy) < 0.028)
            np.maximum(layer, box.astype(np.float32), out=layer)
            segs += _bezier((gx - 0.03, gy), (a.cx + 0.02, 0.2), (a.cx - 0.01, 0.4))
            segs += _bezier((a.cx - 0.01, 0.4), (a.cx - 0.07, 0.5), (a.cx - 0.05, hcy - 0.05))
            segs += _bezier((a.cx - 0.01, 0.4), (hcx, hcy - 0.1), (hcx + 0.05, hcy + 0.08))
        elif kind == "chest_tube":
            s = RIGHT if "right" in (f.evidence or "").lower() else LEFT
            segs += _bezier((a.cx + s * (a.thorax_hw + 0.06), a.cp_y - 0.05),
                            (a.cx + s * (a.thorax_hw - 0.05), 0.45), (a.cx + s * 0.17, a.apex_y + 0.05))
            w = 0.006
        elif kind == "sternotomy":
            Xg, Yg = _grid(S)
            for yk in np.linspace(0.3, 0.58, 5):
                ring = np.abs(np.sqrt(((Xg - a.cx) / 0.02) ** 2 + ((Yg - yk) / 0.012) ** 2) - 1) < 0.35
                np.maximum(layer, ring.astype(np.float32), out=layer)
        _draw_segments(layer, segs, [w] * len(segs), [1.0] * len(segs))
    strength = 1.0 if f.state == POSITIVE else UNCERTAIN_GAIN
    _raise(D, strength * ndimage.gaussian_filter(layer, 0.4 * S / 256), 0.98)
    layout["Support Devices"] = kinds


# ------------------------------------------------------------------------------------------------
# Measurements on an image (tests and evaluation sanity checks)


def _box(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    S0, S1 = img.shape
    return img[int(y0 * S0):max(int(y1 * S0), int(y0 * S0) + 1), int(x0 * S1):max(int(x1 * S1), int(x0 * S1) + 1)]


def region_mean(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    """Mean intensity in a normalised box (x to the image right, y down)."""
    return float(_box(img, x0, x1, y0, y1).mean())


def _side_x(side: str, inner: float, outer: float) -> tuple[float, float]:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    # The patient's right is the image left.
    return (0.5 - outer, 0.5 - inner) if side == "right" else (0.5 + inner, 0.5 + outer)


def basal_opacity(img: np.ndarray, side: str) -> float:
    """Mean intensity of the lower lateral lung zone on the patient's `side`."""
    return region_mean(img, *_side_x(side, 0.2, 0.32), 0.6, 0.7)


def apical_lucency(img: np.ndarray, side: str) -> float:
    """Mean intensity of the apical / upper lateral zone (lower = darker = more lucent)."""
    return region_mean(img, *_side_x(side, 0.17, 0.33), 0.16, 0.36)


def thin_bright_fraction(img: np.ndarray, contrast: float = 0.1, level: float = 0.86) -> float:
    """Fraction of pixels in thin radiopaque structures (tubes, lines, wires): near-white pixels
    that stand out of their surroundings (white top-hat > contrast) over a few pixels only."""
    k = max(3, int(round(img.shape[0] / 42)))
    tophat = img - ndimage.grey_opening(img, size=(k, k))
    return float(((tophat > contrast) & (img > level)).mean())


def cardiothoracic_ratio(img: np.ndarray) -> float:
    """(Max right + max left heart extent from the midline) / widest inner thoracic span.

    Measured like a radiologist's CTR: per row of the lower thorax, the heart is the dense run
    through the image midline and the thorax spans the two lungs' lateral edges. A heart border
    counts only where aerated lung lies lateral to it and the edge there is vertical (where the
    heart meets a hemidiaphragm the edge turns horizontal). Dense vs. aerated is split between the
    mid-lung and the heart's own intensity, so the measure does not depend on the window.
    """
    S = img.shape[0]
    sm = ndimage.gaussian_filter(img.astype(np.float32), S / 160)
    gx, gy = np.abs(ndimage.sobel(sm, axis=1)), np.abs(ndimage.sobel(sm, axis=0))
    lung = float(np.median(np.concatenate([_box(sm, 0.2, 0.3, 0.35, 0.5).ravel(),
                                           _box(sm, 0.7, 0.8, 0.35, 0.5).ravel()])))
    heart = float(np.median(_box(sm, 0.45, 0.6, 0.58, 0.66)))
    thr = lung + 0.45 * (heart - lung)
    c = S // 2
    min_run = max(2, int(0.04 * S))
    mrd = mld = thorax = 0
    for row in range(int(0.35 * S), int(0.85 * S)):
        line = sm[row] >= thr
        if not line[c]:
            continue
        air = np.flatnonzero(~line[:c])
        a = air[-1] + 1 if air.size else 0          # right heart border (image left)
        air = np.flatnonzero(~line[c:])
        b = c + air[0] - 1 if air.size else S - 1   # left heart border
        la = lb = None
        if a > 0:
            dense = np.flatnonzero(line[:a])
            if dense.size and a - dense[-1] > min_run:
                la = dense[-1]
                if gx[row, a - 1:a + 1].mean() > 1.5 * gy[row, a - 1:a + 1].mean():
                    mrd = max(mrd, c - a)
        if b < S - 1:
            dense = np.flatnonzero(line[b + 1:])
            if dense.size and dense[0] > min_run:
                lb = b + 1 + dense[0]
                if gx[row, b:b + 2].mean() > 1.5 * gy[row, b:b + 2].mean():
                    mld = max(mld, b - c + 1)
        if la is not None and lb is not None:
            thorax = max(thorax, lb - la - 1)
    return (mrd + mld) / thorax if thorax and mrd and mld else float("nan")


# ------------------------------------------------------------------------------------------------
# Reports from templates

_LATERAL = {  # which observations take a side in reports, and which sides
    "Pleural Effusion": ("right", "left", "bilateral"), "Pneumothorax": ("right", "left"),
    "Consolidation": ("right", "left"), "Pneumonia": ("right", "left"), "Lung Opacity": ("right", "left"),
    "Atelectasis": ("right", "left", "bilateral"), "Lung Lesion": ("right", "left"),
    "Pleural Other": ("right", "left"), "Fracture": ("right", "left"),
}
_GRADED = {"Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Edema", "Atelectasis", "Lung Opacity",
           "Enlarged Cardiomediastinum", "Lung Lesion"}
# Rough MIMIC-CXR prevalences, used to sample positives.
_PREVALENCE = {
    "Support Devices": 0.2, "Pleural Effusion": 0.2, "Atelectasis": 0.18, "Cardiomegaly": 0.18,
    "Lung Opacity": 0.15, "Edema": 0.12, "Pneumonia": 0.07, "Consolidation": 0.05, "Pneumothorax": 0.05,
    "Lung Lesion": 0.05, "Enlarged Cardiomediastinum": 0.04, "Fracture": 0.03, "Pleural Other": 0.02,
}
_NEGATIVE_SENTENCES = {
    "Enlarged Cardiomediastinum": ["The mediastinal contours are normal.", "Normal mediastinal contours."],
    "Cardiomegaly": ["Heart size is normal.", "The heart is normal in size."],
    "Lung Opacity": ["No focal airspace opacity.", "No focal opacity is seen."],
    "Lung Lesion": ["No pulmonary nodules or masses.", "No suspicious pulmonary nodule."],
    "Edema": ["No pulmonary edema.", "There is no pulmonary edema."],
    "Consolidation": ["No focal consolidation.", "There is no focal consolidation."],
    "Pneumonia": ["No evidence of pneumonia."],
    "Atelectasis": ["No atelectasis."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "Pleural Other": ["No pleural thickening."],
    "Fracture": ["No acute rib fracture.", "No displaced fracture."],
}
_LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}
_ORDINAL = {3: "3rd", 4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th", 9: "9th"}
_DEVICE_SENTENCES = {
    "ett": "Endotracheal tube terminates {n} cm above the carina.",
    "cvc": "Right internal jugular central venous catheter terminates in the SVC.",
    "ng": "Nasogastric tube courses below the diaphragm into the stomach.",
    "pacer": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
    "sternotomy": "Median sternotomy wires are intact.",
}


def _noun_phrase(obs: str, f: Finding, d: np.random.Generator) -> str:
    """The finding as a noun phrase ('small left pleural effusion'); `d` draws the persistent
    details (lobe, rib, nodule size), so one patient's phrase keeps them across studies."""
    side, sev = f.laterality, f.severity
    size_adj = {"mild": "small", "moderate": "moderate", "severe": "large"}.get(sev, "")
    sev_adj = sev or ""
    if obs == "Cardiomegaly":
        return f"{sev_adj} cardiomegaly".strip()
    if obs == "Enlarged Cardiomediastinum":
        return f"{sev_adj} widening of the mediastinum".strip()
    if obs == "Pleural Effusion":
        return f"{size_adj} {side} pleural effusion{'s' if side == 'bilateral' else ''}".replace("  ", " ").strip()
    if obs == "Pneumothorax":
        return f"{size_adj} {side} apical pneumothorax".replace("  ", " ").strip()
    if obs == "Edema":
        return f"{sev_adj} {str(d.choice(['pulmonary', 'interstitial pulmonary']))} edema".strip()
    if obs == "Atelectasis":
        where = "bibasilar" if side == "bilateral" else f"{side} basilar"
        return f"{sev_adj} {where} atelectasis".strip()
    if obs in ("Consolidation", "Pneumonia"):
        lobe = str(d.choice(_LOBES[side]))
        return f"{side} {lobe} lobe {obs.lower()}"
    if obs == "Lung Opacity":
        zone = str(d.choice(["mid", "lower", "upper"]))
        return f"{sev_adj} hazy opacity in the {side} {zone} lung".replace("  ", " ").strip()
    if obs == "Lung Lesion":
        cm = {"mild": d.uniform(0.6, 1.2), "moderate": d.uniform(1.4, 2.5), "severe": d.uniform(3.5, 6.0)}[sev or "moderate"]
        kind = "mass" if cm >= 3 else "nodule"
        lobe = str(d.choice(_LOBES[side]))
        return f"{cm:.1f} cm {kind} in the {side} {lobe} lobe"
    if obs == "Pleural Other":
        return f"{side} pleural thickening"
    if obs == "Fracture":
        return f"acute fracture of the {side} {_ORDINAL[int(d.integers(4, 9))]} rib"
    raise KeyError(obs)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(obs: str, f: Finding, rng: np.random.Generator, d: np.random.Generator) -> str:
    if f.state == NEGATIVE:
        return str(rng.choice(_NEGATIVE_SENTENCES[obs]))
    if obs == "Support Devices":
        kinds = [k for k, _ in _DEVICE_WORDS if k in _DEVICE_SENTENCES and k in (f.evidence or "")] or \
            list(d.choice(list(_DEVICE_SENTENCES), size=int(d.integers(1, 3)), replace=False))
        return " ".join(_DEVICE_SENTENCES[k].format(n=int(d.integers(3, 6))) for k in kinds)
    np_ = _noun_phrase(obs, f, d)
    article = ("" if np_.endswith("s") or obs in ("Cardiomegaly", "Edema")
               else "an " if np_[0] in "aeiou8" else "a ")
    if f.state == UNCERTAIN:
        form = int(rng.integers(2))
        return f"Possible {np_}." if form == 0 else f"Findings suggestive of {article}{np_}."
    if obs == "Lung Lesion":
        return f"There is a {np_}."
    return f"{_cap(np_)}."


def sample_findings(rng: np.random.Generator) -> dict[str, Finding]:
    """A plausible set of findings for one study (positives, maybe an uncertain one, negatives)."""
    out: dict[str, Finding] = {}
    obs_all = list(_PREVALENCE)
    p = np.array([_PREVALENCE[o] for o in obs_all]); p = p / p.sum()
    n_pos = 0 if rng.random() < 0.3 else int(rng.choice([1, 1, 2, 2, 3]))
    pos = [str(o) for o in rng.choice(obs_all, size=n_pos, replace=False, p=p)] if n_pos else []
    rest = [o for o in obs_all if o not in pos and o != "Support Devices"]
    unc = [str(rng.choice(rest))] if rng.random() < 0.25 else []
    negs = [o for o in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Cardiomegaly", "Edema",
                        "Lung Lesion", "Fracture") if o not in pos and o not in unc and rng.random() < 0.5]
    for o in pos + unc:
        sides = _LATERAL.get(o)
        out[o] = Finding(o, POSITIVE if o in pos else UNCERTAIN,
                         str(rng.choice(sides)) if sides else None,
                         str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.35, 0.2])) if o in _GRADED else None)
    if not out and not negs:
        negs = ["Pleural Effusion"]
    for o in negs:
        out[o] = Finding(o, NEGATIVE, None, None)
    return _with_no_finding(out)


def _with_no_finding(found: dict[str, Finding]) -> dict[str, Finding]:
    """CheXpert's rule: No Finding when nothing but Support Devices is positive or uncertain."""
    found = {o: f for o, f in found.items() if o != "No Finding"}
    if not any(f.state in (POSITIVE, UNCERTAIN) for o, f in found.items() if o != "Support Devices"):
        found["No Finding"] = Finding("No Finding", POSITIVE, None, None)
    return found


_ORDER = ["Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum", "Edema", "Consolidation", "Pneumonia",
          "Lung Opacity", "Lung Lesion", "Atelectasis", "Pleural Effusion", "Pneumothorax", "Pleural Other",
          "Fracture"]


def template_report(findings: dict[str, Finding], rng: np.random.Generator, detail_seed: int | None = None) -> str:
    """FINDINGS + IMPRESSION text stating `findings` (with side and severity wording).

    `rng` picks the phrasing; `detail_seed` (default: drawn from rng) picks per-observation details
    (lobe, rib, nodule size, device kinds) so a patient's follow-up reports keep them.
    """
    return _template_report(findings, rng, detail_seed)[0]


def _template_report(findings, rng, detail_seed=None) -> tuple[str, dict[str, str]]:
    if detail_seed is None:
        detail_seed = int(rng.integers(2**31))
    body, impression, said = [], [], {}
    for obs in _ORDER:
        f = findings.get(obs)
        if f is None:
            continue
        sent = _sentence(obs, f, rng, _rng("detail", detail_seed, obs))
        said[obs] = sent
        body.append(sent)
        if f.state != NEGATIVE:
            impression.append(sent)
    if not any(f.state in (POSITIVE, UNCERTAIN) for o, f in findings.items() if o not in ("Support Devices", "No Finding")):
        impression.append(str(rng.choice(["No acute cardiopulmonary process.", "No acute intrathoracic process."])))
    if not body:
        body.append("Unremarkable chest radiograph.")
    return "FINDINGS: " + " ".join(body) + "\n\nIMPRESSION: " + " ".join(impression), said


def _evolve(prev: dict[str, Finding], rng: np.random.Generator) -> dict[str, Finding]:
    """The next study of a patient: findings grow, shrink, resolve; sometimes a new one appears."""
    grades = ["mild", "moderate", "severe"]
    out: dict[str, Finding] = {}
    for o, f in prev.items():
        if o == "No Finding":
            continue
        r = rng.random()
        if f.state == POSITIVE:
            if o == "Support Devices":
                if r < 0.75:
                    out[o] = f
            elif o in _GRADED and r < 0.35:
                k = int(np.clip(grades.index(f.severity or "moderate") + rng.choice([-1, 1]), 0, 2))
                out[o] = replace(f, severity=grades[k])
            elif r < 0.55:
                out[o] = f
            else:
                out[o] = Finding(o, NEGATIVE, None, None)   # resolved
        elif f.state == UNCERTAIN:
            out[o] = replace(f, state=POSITIVE) if r < 0.4 else Finding(o, NEGATIVE, None, None)
        elif r < 0.5:
            out[o] = f
    if rng.random() < 0.35:
        new = str(rng.choice(["Support Devices", "Pleural Effusion", "Atelectasis", "Edema", "Pneumothorax",
                              "Consolidation", "Lung Opacity"]))
        if out.get(new) is None or out[new].state != POSITIVE:
            sides = _LATERAL.get(new)
            out[new] = Finding(new, POSITIVE, str(rng.choice(sides)) if sides else None,
                               "mild" if new in _GRADED else None)
    if not out:
        out["Pleural Effusion"] = Finding("Pleural Effusion", NEGATIVE, None, None)
    return _with_no_finding(out)


# ------------------------------------------------------------------------------------------------
# Studies: patients, splits, reports, images, DICOM


@dataclass
class PhantomStudy:
    index: int                      # position in the (n, seed) stream
    patient_id: str                 # "p10000032"
    study_id: str                   # "s50000001"
    dicom_id: str                   # MIMIC-style "xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx"
    split: str                      # "train" | "validate" | "test", by patient
    view_position: str              # "PA" | "AP"
    report: str                     # "FINDINGS: ...\n\nIMPRESSION: ..."
    findings: dict[str, Finding]    # what the labeler reads from `report` (what the image shows)
    image: np.ndarray               # float32 HxW in [0, 1], bright = dense
    study_date: str                 # "YYYYMMDD" (synthetic, shifted to the future like MIMIC)
    modality: str                   # "CR" | "DX"
    bits_stored: int                # 12..16
    photometric: str                # "MONOCHROME1" | "MONOCHROME2"
    report_source: str              # "iu" | "template"
    study_in_patient: int = 0       # 0 = first study of the patient
    dicom: bytes = field(default=b"", repr=False)

    @property
    def subject_id(self) -> int:
        return int(self.patient_id[1:])

    @property
    def labels(self) -> dict[str, int]:
        return F.label_states(self.findings)


def _patient_starts(seed: int, lo: int, hi: int, n_patients: int) -> np.ndarray:
    """First study index of each patient (length n_patients + 1); prefix-stable in n_patients."""
    key = np.uint64(_seed_of("counts", seed))
    counts = lo + (_mix64(np.arange(n_patients, dtype=np.uint64) ^ key) % np.uint64(hi - lo + 1)).astype(np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


@functools.lru_cache(maxsize=16)
def _starts_cached(seed: int, lo: int, hi: int, n_patients: int) -> np.ndarray:
    return _patient_starts(seed, lo, hi, n_patients)


def locate(i: int, seed: int = 0, studies_per_patient: tuple[int, int] = (1, 3)) -> tuple[int, int, int]:
    """Study index -> (patient index, study number within the patient, the patient's study count)."""
    lo, hi = studies_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(f"studies_per_patient must satisfy 1 <= lo <= hi, got {studies_per_patient}")
    m = 1024
    while True:
        starts = _starts_cached(seed, lo, hi, m)
        if starts[-1] > i:
            break
        m *= 4
    p = int(np.searchsorted(starts, i, side="right") - 1)
    return p, int(i - starts[p]), int(starts[p + 1] - starts[p])


def patient_split(p: int, seed: int = 0) -> str:
    u = _seed_of("split", seed, p) / 2**32
    return "train" if u < 0.8 else "validate" if u < 0.9 else "test"


@functools.lru_cache(maxsize=1)
def _iu_texts() -> tuple[str, ...]:
    from pairaug_ray.io import reports

    texts = []
    for rep in reports.iter_iu_reports():
        parts = []
        if rep.findings.strip():
            parts.append("FINDINGS: " + rep.findings.strip())
        if rep.impression.strip():
            parts.append("IMPRESSION: " + rep.impression.strip())
        if parts:
            texts.append("\n\n".join(parts))
    return tuple(texts)


def _resolve_source(report_source: str) -> str:
    if report_source not in REPORT_SOURCES:
        raise ValueError(f"report_source must be one of {REPORT_SOURCES}, not {report_source!r}")
    if report_source == "auto":
        try:
            from pairaug_ray.io import reports
            return "iu" if reports.iu_corpus_available() else "template"
        except ImportError:
            return "template"
    return report_source


@functools.lru_cache(maxsize=256)
def _patient_course(seed: int, p: int, k: int) -> tuple[dict[str, Finding], ...]:
    r = _rng("course", seed, p)
    course = [sample_findings(r)]
    for _ in range(k - 1):
        course.append(_evolve(course[-1], r))
    return tuple(course)


def _study_findings(i: int, seed: int, p: int, j: int, k: int, source: str) -> tuple[str, dict[str, Finding]]:
    """(report text, findings to render = the labeler's reading, with template details kept)."""
    if source == "iu":
        texts = _iu_texts()
        text = texts[_seed_of("iu", seed, i) % len(texts)]
        return text, F.label_report(text)
    truth = _patient_course(seed, p, k)[j]
    text, said = _template_report(truth, _rng("phrase", seed, i), detail_seed=_seed_of("detail", seed, p))
    read = F.label_report(text)
    merged = {}
    for o, f in read.items():
        t = truth.get(o)
        if t is not None and t.state == f.state:  # the template knows side/severity/details for sure
            merged[o] = Finding(o, f.state, t.laterality or f.laterality, t.severity or f.severity,
                                said.get(o, f.evidence))
        else:
            merged[o] = f
    return text, merged


def study(i: int, seed: int = 0, size: int = 256, report_source: str = "auto",
          studies_per_patient: tuple[int, int] = (1, 3), with_dicom: bool = True) -> PhantomStudy:
    """The i-th study of the (seed) stream, made from (i, seed) alone."""
    source = _resolve_source(report_source)
    p, j, k = locate(i, seed, tuple(studies_per_patient))
    text, found = _study_findings(i, seed, p, j, k, source)
    pseed = _seed_of("patient", seed, p)
    img = render(found, size=size, seed=pseed, anatomy=Anatomy.sample(pseed), noise_seed=_seed_of("study", seed, i))
    r = _rng("study-meta", seed, i)
    devices = found.get("Support Devices")
    ap = r.random() < (0.7 if devices is not None and devices.state == POSITIVE else 0.15)
    pr = _rng("patient-meta", seed, p)
    first = _dt.date(2150, 1, 1) + _dt.timedelta(days=int(pr.integers(0, 3650)))
    gaps = np.cumsum(pr.integers(20, 400, size=k))
    date = first + _dt.timedelta(days=int(gaps[j] - gaps[0]))
    digest = hashlib.sha1(f"phantom:{seed}:{i}".encode()).hexdigest()
    st = PhantomStudy(
        index=i, patient_id=f"p{10_000_000 + p}", study_id=f"s{50_000_000 + i}",
        dicom_id="-".join(digest[n:n + 8] for n in range(0, 40, 8)), split=patient_split(p, seed),
        view_position="AP" if ap else "PA", report=text, findings=found, image=img,
        study_date=date.strftime("%Y%m%d"), modality="CR" if p % 2 == 0 else "DX",
        bits_stored=(12, 14, 15, 16)[int(pr.integers(4))],
        photometric="MONOCHROME1" if pr.random() < 0.4 else "MONOCHROME2",
        report_source=source, study_in_patient=j)
    if with_dicom:
        st.dicom = to_dicom(st)
    return st


def iter_studies(n: int, seed: int = 0, size: int = 256, report_source: str = "auto",
                 studies_per_patient: tuple[int, int] = (1, 3), with_dicom: bool = True) -> Iterator[PhantomStudy]:
    """Studies 0..n-1; a patient's studies are consecutive and their findings change over time."""
    for i in range(n):
        yield study(i, seed, size, report_source, studies_per_patient, with_dicom)


_SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def to_dicom(st: PhantomStudy, modality: str | None = None, bits_stored: int | None = None,
             photometric: str | None = None) -> bytes:
    """DICOM Part 10 bytes (Explicit VR Little Endian) of the study's image.

    Stored values use `bits_stored` bits; MONOCHROME1 stores them inverted (white = low).
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = modality or st.modality
    bits = int(bits_stored or st.bits_stored)
    photometric = photometric or st.photometric
    if modality not in _SOP_CLASS or not 8 <= bits <= 16 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported DICOM options: {modality}, {bits} bits, {photometric}")
    top = 2 ** bits - 1
    stored = np.round(np.clip(st.image, 0, 1) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)

    ent = ["pairaug-phantom", st.patient_id, st.study_id]
    sop_uid = generate_uid(entropy_srcs=ent + [st.dicom_id])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=ent)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=ent + ["series"])
    ds.PatientID = st.patient_id
    ds.PatientName = f"PHANTOM^{st.patient_id.upper()}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = st.study_id
    ds.AccessionNumber = st.study_id[1:]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = st.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyDescription = "CHEST (PORTABLE AP)" if st.view_position == "AP" else "CHEST (PA AND LAT)"
    ds.Modality = modality
    ds.Manufacturer = "PhantomCXR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = st.view_position
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [round(430.0 / stored.shape[0], 4)] * 2   # a 43 cm detector
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = top / 2
    ds.WindowWidth = top + 1
    ds.PixelData = stored.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def mimic_report_text(st: PhantomStudy) -> str:
    """The report as a MIMIC-CXR style free-text file."""
    exam = "CHEST (PORTABLE AP)" if st.view_position == "AP" else "CHEST (PA AND LAT)"
    comparison = "Prior chest radiograph." if st.study_in_patient else "None."
    sections = {}
    for block in st.report.split("\n\n"):
        head, _, body = block.partition(":")
        sections[head.strip().upper()] = body.strip()
    lines = ["                                 FINAL REPORT", f" EXAMINATION:  {exam}", " ",
             " INDICATION:  ___", " ", f" COMPARISON:  {comparison}", " "]
    for head in ("FINDINGS", "IMPRESSION"):
        if sections.get(head):
            lines += [f" {head}:", " ", " " + sections[head], " "]
    return "\n".join(lines) + "\n"


def _label_cell(v: int | None) -> str:
    return "" if v is None else f"{float(v):.1f}"


def write_dataset(out_dir: str, n: int, seed: int = 0, size: int = 256, report_source: str = "auto",
                  studies_per_patient: tuple[int, int] = (1, 3), png: bool = False) -> dict:
    """Write n studies as a MIMIC-CXR-JPG style tree (DICOM instead of JPEG) plus label CSVs.

    files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.dcm (and .png with png=True),
    files/pXX/pNNNNNNNN/sNNNNNNNN.txt, phantom-split.csv, phantom-chexpert.csv, phantom-metadata.csv.
    """
    split_rows, chexpert_rows, meta_rows = [], [], []
    patients, splits, sources = set(), {"train": 0, "validate": 0, "test": 0}, set()
    for st in iter_studies(n, seed, size, report_source, studies_per_patient):
        pdir = os.path.join(out_dir, "files", st.patient_id[:3], st.patient_id)
        sdir = os.path.join(pdir, st.study_id)
        os.makedirs(sdir, exist_ok=True)
        with open(os.path.join(sdir, st.dicom_id + ".dcm"), "wb") as fh:
            fh.write(st.dicom)
        if png:
            from pairaug_ray.io.dicom import encode_png
            with open(os.path.join(sdir, st.dicom_id + ".png"), "wb") as fh:
                fh.write(encode_png(st.image, bits=16))
        with open(os.path.join(pdir, st.study_id + ".txt"), "w") as fh:
            fh.write(mimic_report_text(st))
        subject, study_num = st.subject_id, int(st.study_id[1:])
        split_rows.append([st.dicom_id, study_num, subject, st.split])
        states = st.labels
        chexpert_rows.append([subject, study_num] + [_label_cell(states.get(c)) for c in CHEXPERT_COLUMNS])
        meta_rows.append([st.dicom_id, subject, study_num, st.view_position, st.image.shape[0],
                          st.image.shape[1], st.study_date])
        if st.patient_id not in patients:
            splits[st.split] += 1
        patients.add(st.patient_id)
        sources.add(st.report_source)

    def write_csv(name: str, header: list[str], rows: list) -> None:
        with open(os.path.join(out_dir, name), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    os.makedirs(out_dir, exist_ok=True)
    write_csv("phantom-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    write_csv("phantom-chexpert.csv", ["subject_id", "study_id"] + CHEXPERT_COLUMNS, chexpert_rows)
    write_csv("phantom-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns",
                                       "StudyDate"], meta_rows)
    return {"studies": len(split_rows), "images": len(split_rows), "reports": len(split_rows),
            "patients": len(patients), "patients_per_split": splits, "report_source": sorted(sources),
            "out_dir": out_dir}

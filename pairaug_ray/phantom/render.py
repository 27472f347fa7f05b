"""PhantomCXR rendering: a frontal radiograph that shows a set of findings.

Usage::

    img = render(label_report("Moderate left pleural effusion."), size=256, seed=3)
    img, layout = render_with_layout(findings, size=128, seed=0)
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from pairaug_ray.labeler import POSITIVE, UNCERTAIN
from pairaug_ray.phantom.anatomy import (
    LEFT,
    RIGHT,
    SEVERITY_GAIN,
    UNCERTAIN_GAIN,
    Anatomy,
    _active,
    _bezier,
    _body_mask,
    _device_kinds,
    _diaphragm,
    _draw_segments,
    _grid,
    _inside_lung,
    _lat,
    _lobe,
    _lobe_center,
    _lung_mask,
    _raise,
    _rng,
    _seed_of,
    _sides,
    _smooth_noise,
)

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

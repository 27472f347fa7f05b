"""PhantomCXR image probes: measurements that follow the findings the renderer draws.

Usage::

    cardiothoracic_ratio(img) > 0.5          # cardiomegaly
    basal_opacity(img, "left") - basal_opacity(img, "right")   # a left effusion

Images are float32 HxW in [0, 1], bright = dense, patient's right on the image left.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

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

"""Bragg peaks in area-detector frames: find, cut patches, centre.

1. ``find_peaks``: a robust threshold (median + k·σ, σ from the MAD, or Poisson when the
   frame is mostly zeros as in sparse "frame caches"), connected components
   (scikit-image ``label``/``regionprops``), one candidate per component at its maximum.
   A component with more than one local maximum is flagged ``multi``.
2. ``extract_patches``: 11×11 patches centred on the candidates; peaks near the border get
   edge-padded patches and the flag ``edge``.
3. ``locate_peaks``: centres each patch, intensity-weighted centroid after subtracting the
   patch background; a centroid's standard error from Poisson statistics.

Coordinates are ``(row, col)`` in pixels, integer = pixel centre.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.feature import peak_local_max
from skimage.measure import label, regionprops

PATCH = 11
COLUMNS = ["frame", "row", "col", "row_std", "col_std", "intensity", "method", "flag"]


class FrameError(ValueError):
    """A frame that cannot be analysed (wrong shape, NaN or negative values)."""


def check_frame(frame) -> np.ndarray:
    """The frame as float64 2D array, or a ``FrameError`` that says what is wrong."""
    arr = np.asarray(frame)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and arr.size == np.prod(arr.shape[-2:]) else arr
    if arr.ndim != 2 or min(arr.shape) < PATCH:
        raise FrameError(f"expected a 2D frame of at least {PATCH}×{PATCH} pixels, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise FrameError(f"frame has {int(np.sum(~np.isfinite(arr)))} NaN/inf pixels; mask them first")
    return arr


def threshold(frame: np.ndarray, k: float = 6.0) -> float:
    """Background + k·σ: median and MAD of the frame; Poisson σ where the MAD vanishes."""
    sample = frame[::4, ::4] if frame.size > 1_000_000 else frame
    bg = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - bg)))
    if sigma <= 0:
        sigma = np.sqrt(max(bg, 1.0))
    return bg + k * sigma


def find_peaks(frame: np.ndarray, k: float = 6.0, min_pixels: int = 3, min_distance: int = 2):
    """Candidate peaks: DataFrame with integer ``row``, ``col`` (the component maximum),
    ``n_max`` (local maxima in the component) and ``area``."""
    thr = threshold(frame, k)
    labels = label(frame > thr, connectivity=2)
    rows, cols, nmax, area = [], [], [], []
    for region in regionprops(labels, intensity_image=frame):
        if region.area < min_pixels:
            continue
        r0, c0, r1, c1 = region.bbox
        sub = np.where(region.image, region.image_intensity, 0.0)
        imax = np.unravel_index(np.argmax(sub), sub.shape)
        maxima = peak_local_max(
            sub, min_distance=min_distance, threshold_abs=thr,
            labels=region.image.astype(int), exclude_border=False,
        )
        # a second maximum counts only if it is a real peak: at least 30 % of the main one
        strong = [m for m in maxima if sub[tuple(m)] > 0.3 * sub[imax]]
        rows.append(r0 + imax[0])
        cols.append(c0 + imax[1])
        nmax.append(max(len(strong), 1))
        area.append(int(region.area))
    return pd.DataFrame({"row": rows, "col": cols, "n_max": nmax, "area": area}, dtype=int)


def extract_patches(frame: np.ndarray, rows, cols, size: int = PATCH):
    """``size``×``size`` patches centred on (rows, cols); padded near the border.

    Pixels outside the frame are filled with the frame's median (its background), so a
    peak near the edge stays centred in its patch. Returns ``(patches (N, size, size),
    edge (N,) bool)``; ``edge`` marks patches that needed padding.
    """
    half = size // 2
    padded = np.pad(frame, half, mode="constant", constant_values=float(np.median(frame)))
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    idx = np.arange(size)
    patches = padded[(rows[:, None] + idx)[:, :, None], (cols[:, None] + idx)[:, None, :]]
    nr, nc = frame.shape
    edge = (rows < half) | (cols < half) | (rows >= nr - half) | (cols >= nc - half)
    return patches, edge


def centroid(patches: np.ndarray):
    """Intensity-weighted centroids of background-subtracted patches.

    Background = median of the patch border. Returns ``(centre (N, 2), std (N, 2),
    intensity (N,))`` in patch pixels (centre of ``patch[0, 0]`` is (0, 0)); ``std`` is the
    standard error of the centroid for Poisson counts.
    """
    n, size, _ = patches.shape
    border = np.concatenate(
        [patches[:, 0, :], patches[:, -1, :], patches[:, 1:-1, 0], patches[:, 1:-1, -1]], axis=1
    )
    bg = np.median(border, axis=1)
    signal = np.clip(patches - bg[:, None, None], 0.0, None)
    total = signal.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    idx = np.arange(size, dtype=float)
    r = (signal.sum(axis=2) * idx).sum(axis=1) / safe
    c = (signal.sum(axis=1) * idx).sum(axis=1) / safe
    # var(centroid) = Σ var(I_i) (x_i - x̄)² / (ΣI)², var(I_i) = raw counts (Poisson)
    counts = np.clip(patches, 1.0, None)
    dr2 = (idx[None, :, None] - r[:, None, None]) ** 2
    dc2 = (idx[None, None, :] - c[:, None, None]) ** 2
    r_std = np.sqrt((counts * dr2 * (signal > 0)).sum(axis=(1, 2))) / safe
    c_std = np.sqrt((counts * dc2 * (signal > 0)).sum(axis=(1, 2))) / safe
    return np.stack([r, c], 1), np.stack([r_std, c_std], 1), total


def locate_peaks(frame, method: str = "centroid", frame_index: int = 0, k: float = 6.0):
    """Peaks of one frame as a DataFrame with columns ``COLUMNS`` in frame pixel coordinates.

    ``flag`` is "" for a clean peak, "edge" near the border, "multi" where the component
    holds more than one peak (its centroid is then biased), or both joined by "|".
    """
    if method != "centroid":
        raise ValueError(f"unknown peak method {method!r}; available: 'centroid'")
    frame = check_frame(frame)
    cand = find_peaks(frame, k=k)
    if cand.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            COLUMNS, [int, float, float, float, float, float, str, str])})
    patches, edge = extract_patches(frame, cand["row"], cand["col"])
    centre, std, intensity = centroid(patches)
    half = PATCH // 2
    flags = [
        "|".join(f for f, on in (("edge", e), ("multi", m > 1)) if on)
        for e, m in zip(edge, cand["n_max"])
    ]
    return pd.DataFrame({
        "frame": frame_index,
        "row": cand["row"].to_numpy() - half + centre[:, 0],
        "col": cand["col"].to_numpy() - half + centre[:, 1],
        "row_std": std[:, 0],
        "col_std": std[:, 1],
        "intensity": intensity,
        "method": method,
        "flag": flags,
    })[COLUMNS]

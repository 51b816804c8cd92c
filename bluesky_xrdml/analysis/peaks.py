"""Bragg peaks in area-detector frames: find, cut patches, centre.

1. ``find_peaks``: a robust threshold (median + k·σ, σ from the MAD, or Poisson when the
   frame is mostly zeros as in sparse "frame caches"), connected components
   (scikit-image ``label``/``regionprops``).
   Every local maximum inside a component is a candidate; a patch holding another
   candidate is flagged ``multi``.
2. ``extract_patches``: 11×11 patches centred on the candidates; peaks near the border get
   edge-padded patches and the flag ``edge``.
3. ``locate_peaks``: centres each patch, intensity-weighted centroid after subtracting the
   patch background; a centroid's standard error from Poisson statistics.

Coordinates are ``(row, col)`` in pixels, integer = pixel centre.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.measure import label, regionprops
from skimage.morphology import h_maxima

PATCH = 11
SMOOTH_SIGMA = 0.6  # px; suppresses counting noise, still resolves spots 3 px apart
H_SIGMA = 3.0  # a maximum must stand this many noise σ above its saddle
COLUMNS = ["frame", "row", "col", "row_std", "col_std", "intensity", "method", "flag"]


class FrameError(ValueError):
    """A frame that cannot be analysed (wrong shape, NaN or negative values)."""


def check_frame(frame) -> np.ndarray:
    """The frame as float64 2D array, or a ``FrameError`` that says what is wrong."""
    arr = np.asarray(frame)
    if arr.ndim > 2 and arr.size == np.prod(arr.shape[-2:]):  # (1, rows, cols) and the like
        arr = arr.reshape(arr.shape[-2:])
    if arr.ndim != 2 or min(arr.shape) < PATCH:
        raise FrameError(
            f"expected a 2D frame of at least {PATCH}×{PATCH} pixels, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise FrameError(f"frame has {bad} NaN/inf pixels; mask them first")
    return arr


def threshold(frame: np.ndarray, k: float = 6.0) -> float:
    """Background + k·σ: median and MAD of the frame; Poisson σ where the MAD vanishes."""
    sample = frame[::4, ::4] if frame.size > 1_000_000 else frame
    bg = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - bg)))
    if sigma <= 0:
        sigma = np.sqrt(max(bg, 1.0))
    return bg + k * sigma


def find_peaks(frame: np.ndarray, k: float = 6.0, min_pixels: int = 3, h: float = H_SIGMA):
    """Candidate peaks: DataFrame with integer ``row``, ``col`` and ``n_near``.

    Pixels above ``threshold`` form connected components. Within a component, every
    maximum that stands ``h`` noise σ above the saddle to any brighter neighbour is a
    candidate (h-maxima of the Anscombe-transformed, lightly smoothed frame, where
    Poisson noise has unit σ everywhere); this separates spots joined by their tails
    without taking counting noise on a bright spot for a peak. ``n_near`` counts the
    other candidates inside the candidate's 11×11 patch.
    """
    thr = threshold(frame, k)
    labels = label(frame > thr, connectivity=2)
    rows, cols = [], []
    for region in regionprops(labels):
        if region.area < min_pixels:
            continue
        r0, c0, r1, c1 = region.bbox
        r0, c0 = max(r0 - 2, 0), max(c0 - 2, 0)
        r1, c1 = min(r1 + 2, frame.shape[0]), min(c1 + 2, frame.shape[1])
        sub = frame[r0:r1, c0:c1]
        stable = ndimage.gaussian_filter(2.0 * np.sqrt(np.clip(sub, 0, None) + 0.375),
                                         SMOOTH_SIGMA)
        inside = labels[r0:r1, c0:c1] == region.label
        tops = label(h_maxima(stable, h).astype(bool) & inside)
        found = False
        for top in regionprops(tops):
            pix = top.coords[np.argmax(sub[top.coords[:, 0], top.coords[:, 1]])]
            rows.append(r0 + pix[0])
            cols.append(c0 + pix[1])
            found = True
        if not found:  # a flat (saturated) component: its brightest pixel
            r, c = np.unravel_index(np.argmax(np.where(inside, sub, -np.inf)), sub.shape)
            rows.append(r0 + r)
            cols.append(c0 + c)
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    half = PATCH // 2
    if len(rows):
        cheb = np.maximum(np.abs(rows[:, None] - rows[None]), np.abs(cols[:, None] - cols[None]))
        n_near = (cheb <= half).sum(axis=1) - 1
    else:
        n_near = np.zeros(0, int)
    return pd.DataFrame({"row": rows, "col": cols, "n_near": n_near}, dtype=int)


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

    ``flag`` is "" for a clean peak, "edge" near the border, "multi" where another peak
    lies inside the patch (its centroid is then biased), or both joined by "|".
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
        "|".join(f for f, on in (("edge", e), ("multi", m > 0)) if on)
        for e, m in zip(edge, cand["n_near"])
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

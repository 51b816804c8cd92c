"""Bragg peaks in area-detector frames: find, cut patches, centre.

1. ``find_peaks``: a robust threshold (median + k·σ, σ from the MAD, or Poisson when the
   frame is mostly zeros as in sparse "frame caches"), connected components
   (scikit-image ``label``/``regionprops``).
   Every local maximum inside a component is a candidate; a patch holding another
   candidate is flagged ``multi``.
2. ``extract_patches``: 11×11 patches centred on the candidates; peaks near the border get
   edge-padded patches and the flag ``edge``.
3. ``locate_peaks`` / ``centre_peaks``: centres each patch: intensity-weighted centroid
   after subtracting the patch background (standard error from Poisson statistics), the
   BraggNN ensemble (``models.braggnn``), or a 2D pseudo-Voigt fit (``analysis.fitting``).
   Patches holding several peaks are centred by a multi-peak fit; patches the ensemble
   disagrees on are flagged ``uncertain`` and re-done by the fit.

Coordinates are ``(row, col)`` in pixels, integer = pixel centre.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """The frame as a 2D array, or a ``FrameError`` that says what is wrong.

    Integer counts are kept as they are (no 8-byte copy of a 16-megapixel frame); anything
    else becomes float64 and must be finite.
    """
    arr = np.asarray(frame)
    if arr.ndim > 2 and arr.size == np.prod(arr.shape[-2:]):  # (1, rows, cols) and the like
        arr = arr.reshape(arr.shape[-2:])
    if arr.ndim != 2 or min(arr.shape) < PATCH:
        raise FrameError(
            f"expected a 2D frame of at least {PATCH}×{PATCH} pixels, got shape {arr.shape}")
    if arr.dtype.kind in "ui":
        return arr
    try:
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise FrameError(f"frame of dtype {arr.dtype} is not numeric") from None
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise FrameError(f"frame has {bad} NaN/inf pixels; mask them first")
    return arr


def background(frame: np.ndarray) -> tuple[float, float]:
    """Median and robust σ (MAD; Poisson where the MAD vanishes) of the frame."""
    step = max(1, int(np.sqrt(frame.size / 100_000)))
    sample = frame[::step, ::step] if step > 1 else frame
    bg = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - bg)))
    if sigma <= 0:
        sigma = np.sqrt(max(bg, 1.0))
    return bg, sigma


def threshold(frame: np.ndarray, k: float = 6.0) -> float:
    """Background + k·σ: median and MAD of the frame; Poisson σ where the MAD vanishes."""
    bg, sigma = background(frame)
    return bg + k * sigma


def _components(mask: np.ndarray, block: int = 32):
    """Connected components (8-connectivity) of a mask as ``(rows, cols)`` pixel arrays, in
    the raster order of their first pixel (as ``regionprops`` lists them).

    Detector frames are sparse above threshold, so the components are found from the
    coordinates of the set pixels: blocks holding any are grouped by ``ndimage.label`` on
    the block grid, and each group is labelled in its own small window. This gives the same
    components as labelling the whole frame, at a fraction of the cost for large frames.
    """
    r, c = np.nonzero(mask)
    if len(r) == 0:
        return []
    eight = np.ones((3, 3), bool)
    nb = (-(-mask.shape[0] // block), -(-mask.shape[1] // block))
    blocks = np.zeros(nb, bool)
    br, bc = r // block, c // block
    blocks[br, bc] = True
    group_of_block, _ = ndimage.label(blocks, structure=eight)
    group = group_of_block[br, bc]
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    comps = []
    for idx in np.split(order, bounds):
        rr, cc = r[idx], c[idx]
        r0, c0 = rr.min(), cc.min()
        sub = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), bool)
        sub[rr - r0, cc - c0] = True
        lab, n = ndimage.label(sub, structure=eight)
        which = lab[rr - r0, cc - c0]
        for k in range(1, n + 1):
            on = which == k
            comps.append((rr[on], cc[on]))
    first = [int(np.min(rr * mask.shape[1] + cc)) for rr, cc in comps]
    return [comps[i] for i in np.argsort(first)]


def find_peaks(frame: np.ndarray, k: float = 6.0, min_pixels: int = 3, h: float = H_SIGMA,
               thr: float | None = None):
    """Candidate peaks: DataFrame with integer ``row``, ``col`` and ``n_near``.

    Pixels above ``threshold`` (or ``thr``) form connected components. Within a component,
    every maximum that stands ``h`` noise σ above the saddle to any brighter neighbour is a
    candidate (h-maxima of the Anscombe-transformed, lightly smoothed frame, where
    Poisson noise has unit σ everywhere); this separates spots joined by their tails
    without taking counting noise on a bright spot for a peak. ``n_near`` counts the
    other candidates inside the candidate's 11×11 patch.
    """
    if thr is None:
        thr = threshold(frame, k)
    rows, cols = [], []
    for rr, cc in _components(frame > thr):
        if len(rr) < min_pixels:
            continue
        r0, c0 = max(rr.min() - 2, 0), max(cc.min() - 2, 0)
        r1, c1 = min(rr.max() + 3, frame.shape[0]), min(cc.max() + 3, frame.shape[1])
        sub = frame[r0:r1, c0:c1].astype(np.float64)
        stable = ndimage.gaussian_filter(2.0 * np.sqrt(np.clip(sub, 0, None) + 0.375),
                                         SMOOTH_SIGMA)
        inside = np.zeros(sub.shape, bool)
        inside[rr - r0, cc - c0] = True
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


def extract_patches(frame: np.ndarray, rows, cols, size: int = PATCH, fill: float | None = None):
    """``size``×``size`` patches centred on (rows, cols); padded near the border.

    Pixels outside the frame are filled with ``fill`` (default: the frame's median, its
    background), so a peak near the edge stays centred in its patch. Returns ``(patches
    (N, size, size) float64, edge (N,) bool)``; ``edge`` marks patches that needed padding.
    """
    half = size // 2
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    nr, nc = frame.shape
    idx = np.arange(size) - half
    r = rows[:, None] + idx  # (N, size)
    c = cols[:, None] + idx
    patches = frame[np.clip(r, 0, nr - 1)[:, :, None],
                    np.clip(c, 0, nc - 1)[:, None, :]].astype(np.float64)
    outside = ((r < 0) | (r >= nr))[:, :, None] | ((c < 0) | (c >= nc))[:, None, :]
    edge = outside.any(axis=(1, 2)) if len(rows) else np.zeros(0, bool)
    if edge.any():
        if fill is None:
            fill = background(frame)[0]
        patches[outside] = fill
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


METHODS = ("braggnn", "centroid", "pseudo-voigt")


@dataclass
class FramePeaks:
    """A frame's candidate peaks and their patches, ready to be centred."""

    frame_index: int
    rows: np.ndarray  # integer pixel of each candidate
    cols: np.ndarray
    patches: np.ndarray  # (N, 11, 11) float64
    edge: np.ndarray  # (N,) bool
    n_near: np.ndarray  # (N,) other candidates inside the patch


def prepare(frame, frame_index: int = 0, k: float = 6.0) -> FramePeaks:
    """Check the frame, find its peaks and cut their patches (``FrameError`` if unusable)."""
    frame = check_frame(frame)
    bg, sigma = background(frame)
    cand = find_peaks(frame, thr=bg + k * sigma)
    patches, edge = extract_patches(frame, cand["row"], cand["col"], fill=bg)
    return FramePeaks(frame_index, cand["row"].to_numpy(), cand["col"].to_numpy(), patches,
                      edge, cand["n_near"].to_numpy())


def _near(fp: FramePeaks, i: int) -> np.ndarray:
    """Indices of the other candidates inside candidate ``i``'s patch."""
    half = PATCH // 2
    cheb = np.maximum(np.abs(fp.rows - fp.rows[i]), np.abs(fp.cols - fp.cols[i]))
    return np.flatnonzero((cheb <= half) & (np.arange(len(fp.rows)) != i))


def _fit_multi(fp: FramePeaks, i: int, centre, std, methods, done: set):
    """Fit candidate ``i`` together with the other peaks in its patch. A neighbour whose own
    patch holds no further peak and that sits well inside this patch takes its centre from
    the same fit (one fit per pair instead of two)."""
    from .fitting import fit_peaks

    half = PATCH // 2
    near = _near(fp, i)
    dr, dc = fp.rows[near] - fp.rows[i], fp.cols[near] - fp.cols[i]
    starts = np.concatenate([[[half, half]], np.stack([dr, dc], 1) + half])
    fits = fit_peaks(fp.patches[i], starts)
    members = set(near.tolist()) | {i}
    for k, (j, f) in enumerate(zip([i, *near.tolist()], fits)):
        if not (f.success and np.isfinite(f.row_std) and np.isfinite(f.col_std)):
            continue
        if k > 0 and (j in done or max(abs(dr[k - 1]), abs(dc[k - 1])) > half - 1
                      or not set(_near(fp, j).tolist()) <= members):
            continue
        shift_r, shift_c = fp.rows[i] - fp.rows[j], fp.cols[i] - fp.cols[j]
        centre[j] = f.row + shift_r, f.col + shift_c
        std[j] = f.row_std, f.col_std
        methods[j] = "pseudo-voigt-multi"
        done.add(j)
    done.add(i)


def centre_peaks(frames: list[FramePeaks], method: str = "centroid", model=None) -> list:
    """Centre the peaks of several frames at once (one network call for all their patches).

    Returns one DataFrame (columns ``COLUMNS``, frame pixel coordinates) per frame.
    ``method`` is the estimator for clean peaks; ``multi`` patches are always centred by a
    multi-peak pseudo-Voigt fit (method "pseudo-voigt-multi"), and with BraggNN, patches the
    ensemble disagrees on (std above ``model.uncertain_px``) are flagged ``uncertain`` and
    re-done by the single-peak fit. A fit that fails leaves the centroid (method "centroid").
    """
    if method not in METHODS:
        raise ValueError(f"unknown peak method {method!r}; available: {', '.join(METHODS)}")
    if method == "braggnn" and model is None:
        from ..models import load_model

        model = load_model("braggnn")
    tables = []
    clean_all = []
    for fp in frames:
        clean_all.append(np.flatnonzero(fp.n_near == 0) if method != "centroid"
                         else np.arange(len(fp.rows)))
    nn_centre = nn_std = None
    if method == "braggnn":
        stacked = [fp.patches[idx] for fp, idx in zip(frames, clean_all)]
        if sum(len(p) for p in stacked):
            nn_centre, nn_std = model.predict(np.concatenate(stacked), return_std=True)
    offset = 0
    for fp, clean in zip(frames, clean_all):
        n = len(fp.rows)
        if n == 0:
            tables.append(empty_table())
            continue
        centre, std, intensity = centroid(fp.patches)
        methods = np.full(n, "centroid", dtype=object)
        uncertain = np.zeros(n, bool)
        if method == "braggnn" and len(clean):
            c, s = nn_centre[offset:offset + len(clean)], nn_std[offset:offset + len(clean)]
            offset += len(clean)
            centre[clean], std[clean] = c, s
            methods[clean] = "braggnn"
            unsure = clean[s.max(axis=1) > model.uncertain_px]
            uncertain[unsure] = True
            redo = unsure
        elif method == "pseudo-voigt":
            redo = clean
        else:
            redo = np.zeros(0, int)
        if len(redo):
            from .fitting import fit_patches

            fc, fs, ok = fit_patches(fp.patches[redo], starts=centre[redo])
            centre[redo[ok]], std[redo[ok]] = fc[ok], fs[ok]
            methods[redo[ok]] = "pseudo-voigt"
        if method != "centroid":
            done: set = set()
            for i in np.flatnonzero(fp.n_near > 0):
                if i not in done:
                    _fit_multi(fp, i, centre, std, methods, done)
        half = PATCH // 2
        flags = [
            "|".join(f for f, on in (("edge", e), ("multi", m > 0), ("uncertain", u)) if on)
            for e, m, u in zip(fp.edge, fp.n_near, uncertain)
        ]
        tables.append(pd.DataFrame({
            "frame": fp.frame_index,
            "row": fp.rows - half + centre[:, 0],
            "col": fp.cols - half + centre[:, 1],
            "row_std": std[:, 0],
            "col_std": std[:, 1],
            "intensity": intensity,
            "method": methods.astype(str),
            "flag": flags,
        })[COLUMNS])
    return tables


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
        COLUMNS, [int, float, float, float, float, float, str, str])})


def locate_peaks(frame, method: str = "centroid", frame_index: int = 0, k: float = 6.0,
                 model=None) -> pd.DataFrame:
    """Peaks of one frame as a DataFrame with columns ``COLUMNS`` in frame pixel coordinates.

    ``method``: "centroid" (intensity-weighted, Poisson standard errors), "braggnn" (the
    shipped BraggNN ensemble, or ``model``; ensemble spread as the standard error) or
    "pseudo-voigt" (a 2D pseudo-Voigt fit; standard errors from the fit).
    ``flag`` is "" for a clean peak, else "|"-joined: "edge" (patch padded at the border,
    still centred), "multi" (another peak inside the patch; with "braggnn" and
    "pseudo-voigt" centred by a multi-peak fit), "uncertain" (BraggNN's ensemble disagreed;
    re-done by the fit). ``method`` says which estimator produced each row.
    """
    if method not in METHODS:
        raise ValueError(f"unknown peak method {method!r}; available: {', '.join(METHODS)}")
    return centre_peaks([prepare(frame, frame_index, k)], method, model)[0]

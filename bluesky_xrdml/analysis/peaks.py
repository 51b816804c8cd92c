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

PATCH = 11
SMOOTH_SIGMA = 0.6  # px; suppresses counting noise, still resolves spots 3 px apart
H_SIGMA = 3.0  # a maximum must stand this many noise σ above its saddle
DIP = 0.6  # ... and its saddle at most this fraction of its height above the background
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


def _components(mask: np.ndarray, block: int = 32, min_pixels: int = 1):
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
    comp = np.empty(len(r), int)
    count = 0
    for idx in np.split(order, bounds):
        rr, cc = r[idx], c[idx]
        r0, c0 = rr.min(), cc.min()
        sub = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), bool)
        sub[rr - r0, cc - c0] = True
        lab, n = ndimage.label(sub, structure=eight)
        comp[idx] = lab[rr - r0, cc - c0] - 1 + count
        count += n
    size = np.bincount(comp, minlength=count)
    first = np.full(count, np.iinfo(np.int64).max)
    np.minimum.at(first, comp, r.astype(np.int64) * mask.shape[1] + c)
    rank = np.full(count, -1)
    kept = np.flatnonzero(size >= min_pixels)
    if not len(kept):
        return []
    kept = kept[np.argsort(first[kept])]
    rank[kept] = np.arange(len(kept))
    on = rank[comp] >= 0
    o = np.argsort(rank[comp][on], kind="stable")
    rr, cc = r[on][o], c[on][o]
    cuts = np.cumsum(size[kept])[:-1]
    return list(zip(np.split(rr, cuts), np.split(cc, cuts)))


def _pack(frame: np.ndarray, comps, margin: int = 2, gap: int = 3, width: int = 512):
    """Cut the box (+ ``margin``) of every component into one small canvas (shelf packing,
    boxes ``gap`` px apart, zeros between them), so the per-spot image operations run as
    one vectorised pass over a few 10⁴ pixels instead of one call per spot.

    Returns ``(raw canvas float64, component id per canvas pixel (0 = none), inside mask,
    box offsets (n, 2) = frame position of canvas pixel (0, 0) of each box, minus its
    canvas position)``."""
    nr, nc = frame.shape
    boxes = []
    for rr, cc in comps:
        r0, c0 = max(rr.min() - margin, 0), max(cc.min() - margin, 0)
        r1, c1 = min(rr.max() + margin + 1, nr), min(cc.max() + margin + 1, nc)
        boxes.append((r0, c0, r1, c1))
    width = max(width, max(b[3] - b[1] for b in boxes) + gap)
    place, x, y, shelf = [None] * len(boxes), gap, gap, 0
    for k in np.argsort([b[0] - b[2] for b in boxes], kind="stable"):  # tallest first
        r0, c0, r1, c1 = boxes[k]
        h, w = r1 - r0, c1 - c0
        if x + w + gap > width:
            x, y, shelf = gap, y + shelf + gap, 0
        place[k] = (y, x)
        x += w + gap
        shelf = max(shelf, h)
    canvas = np.zeros((y + shelf + gap, width))
    ids = np.zeros(canvas.shape, np.int32)
    inside = np.zeros(canvas.shape, bool)
    shift = np.zeros((len(boxes), 2), int)
    for k, ((r0, c0, r1, c1), (py, px), (rr, cc)) in enumerate(zip(boxes, place, comps), 1):
        canvas[py:py + r1 - r0, px:px + c1 - c0] = frame[r0:r1, c0:c1]
        ids[py:py + r1 - r0, px:px + c1 - c0] = k
        inside[rr - r0 + py, cc - c0 + px] = True
        shift[k - 1] = r0 - py, c0 - px
    return canvas, ids, inside, shift


def _brightest(flat, group, value, on) -> np.ndarray:
    """The entry of ``flat`` with the largest ``value`` in each ``group``, among ``on``."""
    flat, group, value = flat[on], group[on], value[on]
    if not len(flat):
        return np.zeros(0, int)
    o = np.lexsort((-value, group))
    return flat[o][np.r_[True, np.diff(group[o]) != 0]]


def _significant(stable: np.ndarray, at: np.ndarray, group: np.ndarray, h: float,
                 bg: float = 0.0, dip: float = DIP, samples: int = 16) -> np.ndarray:
    """Which of the local maxima ``at`` (flat indices into ``stable``; ``group``: their spot)
    stand ``h`` above the saddle towards every brighter maximum of their spot, with the
    saddle at most ``dip`` × the maximum's height above the background ``bg`` (counts).

    The h-maxima criterion, with the saddle between two maxima taken as the lowest point
    of the straight line between them (exact for the convex profiles of spots, and no
    image-wide reconstruction): the brightest maximum of a spot always counts. The relative
    dip keeps a narrow streak whose pixels ripple along it (a line crossing the pixel grid
    at an angle: up to ~30 %) in one piece; two spots side by side dip deeper once they
    are ~4 half widths apart, closer pairs count as one spot."""
    r, c = np.unravel_index(at, stable.shape)
    v = stable.ravel()[at]
    m, a = np.nonzero((group[:, None] == group[None]) & (v[None] > v[:, None]))
    keep = np.ones(len(at), bool)
    if len(m):
        t = np.linspace(0.0, 1.0, samples)[None]
        lr = np.rint(r[m, None] + t * (r[a] - r[m])[:, None]).astype(int)
        lc = np.rint(c[m, None] + t * (c[a] - c[m])[:, None]).astype(int)
        saddle = np.full(len(at), -np.inf)
        np.maximum.at(saddle, m, stable[lr, lc].min(axis=1))

        def counts(a):  # inverse of the Anscombe transform, above the background
            return (np.clip(a, 0, None) / 2) ** 2 - 0.375 - bg

        keep = (v - saddle >= h) & (counts(saddle) <= dip * counts(v))
    return keep


def find_peaks(frame: np.ndarray, k: float = 6.0, min_pixels: int = 3, h: float = H_SIGMA,
               thr: float | None = None, bg: float | None = None):
    """Candidate peaks: DataFrame with integer ``row``, ``col`` and ``n_near``, and the
    spot each belongs to: ``spot`` (component id), ``spot_peaks`` (candidates in it),
    ``spot_row``/``spot_col`` (its background-subtracted intensity centroid) and
    ``spot_extent`` (px: the larger side of the box of its pixels above 15 % of its peak).

    Pixels above ``threshold`` (or ``thr``) form connected components. Within a component,
    every maximum that stands ``h`` noise σ above the saddle to any brighter neighbour is a
    candidate (h-maxima of the Anscombe-transformed, lightly smoothed frame, where
    Poisson noise has unit σ everywhere, the saddles taken along straight lines:
    ``_significant``); this separates spots joined by their tails without taking counting
    noise on a bright spot for a peak. ``n_near`` counts the other candidates inside the
    candidate's 11×11 patch. All components are processed in one pass over a canvas
    holding just their boxes (``_pack``).
    """
    if bg is None:
        bg = background(frame)[0]
    if thr is None:
        thr = threshold(frame, k)
    comps = _components(frame > thr, min_pixels=min_pixels)
    cols_out = ["row", "col", "n_near", "spot", "spot_peaks", "spot_row", "spot_col",
                "spot_extent"]
    if not comps:
        return pd.DataFrame({c: np.zeros(0, int) for c in cols_out})
    raw, ids, inside, shift = _pack(frame, comps)
    stable = ndimage.gaussian_filter(2.0 * np.sqrt(np.clip(raw, 0, None) + 0.375), SMOOTH_SIGMA)
    n = len(comps)
    flat = np.flatnonzero(inside)  # the components' pixels on the canvas
    sp = ids.ravel()[flat]
    value = raw.ravel()[flat]
    # local maxima (plateaus) of the smoothed spot, each at its brightest raw pixel
    lmax = inside & (stable >= ndimage.maximum_filter(stable, 3))
    lab = ndimage.label(lmax, np.ones((3, 3)))[0].ravel()
    fl = np.flatnonzero(lmax)
    best = _brightest(fl, lab[fl], raw.ravel()[fl], np.ones(len(fl), bool))
    comp = ids.ravel()[best]
    several = np.bincount(comp, minlength=n + 1) > 1
    several[0] = False
    # a spot with one maximum (or a flat, saturated one): its brightest pixel
    found = [_brightest(flat, sp, value, ~several[sp])]
    multi = several[comp]
    if multi.any():
        found.append(best[multi][_significant(stable, best[multi], comp[multi], h, bg)])
    found = np.concatenate(found)
    pr, pc = np.unravel_index(found, raw.shape)
    spot = ids[pr, pc]
    rows, cols = pr + shift[spot - 1, 0], pc + shift[spot - 1, 1]
    order = np.lexsort((cols, rows, spot))  # by spot, raster order inside
    rows, cols, spot = rows[order], cols[order], spot[order]
    # each spot's intensity centroid and the extent of its core (above 15 % of its peak)
    weight = np.clip(value - bg, 0, None)
    pr_all, pc_all = np.unravel_index(flat, raw.shape)
    total = np.maximum(np.bincount(sp, weight, n + 1)[1:], 1e-12)
    cen_r = np.bincount(sp, weight * pr_all, n + 1)[1:] / total + shift[:, 0]
    cen_c = np.bincount(sp, weight * pc_all, n + 1)[1:] / total + shift[:, 1]
    peak = np.zeros(n + 1)
    np.maximum.at(peak, sp, weight)
    core = weight >= 0.15 * peak[sp]
    ext = []
    for coord in (pr_all, pc_all):
        hi, lo = np.full(n + 1, -1), np.full(n + 1, 1 << 30)
        np.maximum.at(hi, sp[core], coord[core])
        np.minimum.at(lo, sp[core], coord[core])
        ext.append((hi - lo + 1)[1:])
    ext_r, ext_c = ext
    per_spot = np.bincount(spot, minlength=n + 1)[1:]
    half = PATCH // 2
    cheb = np.maximum(np.abs(rows[:, None] - rows[None]), np.abs(cols[:, None] - cols[None]))
    n_near = (cheb <= half).sum(axis=1) - 1
    s = spot - 1
    return pd.DataFrame({"row": rows.astype(int), "col": cols.astype(int),
                         "n_near": n_near.astype(int), "spot": spot.astype(int),
                         "spot_peaks": per_spot[s].astype(int), "spot_row": cen_r[s],
                         "spot_col": cen_c[s],
                         "spot_extent": np.maximum(ext_r, ext_c)[s].astype(int)})


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
    """A frame's candidate peaks and their patches, ready to be centred.

    A patch covers ``scale``×11 frame pixels binned ``scale``×``scale`` (1 for most spots);
    its pixel (i, j) is centred on frame pixel ``origin + scale·(i, j) + (scale - 1)/2``."""

    frame_index: int
    rows: np.ndarray  # integer pixel of each candidate (its brightest pixel)
    cols: np.ndarray
    patches: np.ndarray  # (N, 11, 11) float64
    edge: np.ndarray  # (N,) bool
    n_near: np.ndarray  # (N,) other candidates inside the patch
    origin: np.ndarray | None = None  # (N, 2) frame pixel of patch pixel (0, 0)
    scale: np.ndarray | None = None  # (N,) binning of the patch

    def __post_init__(self):
        if self.origin is None:
            self.origin = np.stack([self.rows, self.cols], 1).astype(int) - PATCH // 2
        if self.scale is None:
            self.scale = np.ones(len(self.rows), int)

    def to_frame(self, centre: np.ndarray, std: np.ndarray):
        """Patch coordinates → frame coordinates (and standard errors)."""
        s = self.scale[:, None]
        return self.origin + s * centre + (s - 1) / 2, std * s


WINDOWS = ("auto", "peak")


def choose_windows(cand: pd.DataFrame, window: str = "auto"):
    """Window centre (row, col) and binning of each candidate.

    ``"auto"``: a candidate alone in its spot, with no other candidate within its patch,
    gets a window centred on the spot's intensity centroid, 11 px when the spot's core
    (above 15 % of its peak) spans ≤ 9 px, 22 px binned 2×2 when ≤ 19 px, else 33 px
    binned 3×3: the whole spot is seen, at 11×11 for the network. Other candidates
    (several peaks near each other) get 11×11 on their brightest pixel. ``"peak"``:
    11×11 on the brightest pixel for every candidate (the reference workflow)."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; available: {', '.join(WINDOWS)}")
    rows, cols = cand["row"].to_numpy(), cand["col"].to_numpy()
    scale = np.ones(len(rows), int)
    if window == "auto" and len(rows):
        alone = (cand["n_near"].to_numpy() == 0) & (cand["spot_peaks"].to_numpy() == 1)
        rows = np.where(alone, np.rint(cand["spot_row"].to_numpy()), rows).astype(int)
        cols = np.where(alone, np.rint(cand["spot_col"].to_numpy()), cols).astype(int)
        extent = cand["spot_extent"].to_numpy()
        scale = np.where(alone, np.select([extent <= 9, extent <= 19], [1, 2], 3), 1)
    return rows, cols, scale


def extract_windows(frame: np.ndarray, rows, cols, scale, fill: float | None = None):
    """11×11 patches of windows of 11·``scale`` px around (rows, cols), binned
    ``scale``×``scale``. Returns ``(patches (N, 11, 11), origin (N, 2), edge (N,))``."""
    rows, cols, scale = (np.asarray(a, int) for a in (rows, cols, scale))
    patches = np.zeros((len(rows), PATCH, PATCH))
    edge = np.zeros(len(rows), bool)
    origin = np.zeros((len(rows), 2), int)
    for s in np.unique(scale):
        on = np.flatnonzero(scale == s)
        size = PATCH * s
        p, e = extract_patches(frame, rows[on], cols[on], size=size, fill=fill)
        if s > 1:
            p = p.reshape(len(on), PATCH, s, PATCH, s).sum(axis=(2, 4))
        patches[on], edge[on] = p, e
        origin[on] = np.stack([rows[on], cols[on]], 1) - size // 2
    return patches, origin, edge


def prepare(frame, frame_index: int = 0, k: float = 6.0, window: str = "auto") -> FramePeaks:
    """Check the frame, find its peaks and cut their patches (``FrameError`` if unusable).
    ``window``: how each patch is placed (``choose_windows``)."""
    frame = check_frame(frame)
    bg, sigma = background(frame)
    cand = find_peaks(frame, thr=bg + k * sigma, bg=bg)
    r, c, scale = choose_windows(cand, window)
    patches, origin, edge = extract_windows(frame, r, c, scale, fill=bg)
    return FramePeaks(frame_index, cand["row"].to_numpy(), cand["col"].to_numpy(), patches,
                      edge, cand["n_near"].to_numpy(), origin, scale)


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


def centre_peaks(frames: list[FramePeaks], method: str = "centroid", model=None,
                 fit_multi: bool | None = None, refit_uncertain: bool = False) -> list:
    """Centre the peaks of several frames at once (one network call for all their patches).

    Returns one DataFrame (columns ``COLUMNS``, frame pixel coordinates) per frame.
    ``method`` is the estimator. ``multi`` patches (another candidate inside the patch) are
    centred by a multi-peak pseudo-Voigt fit (method "pseudo-voigt-multi") when
    ``fit_multi`` (default: with "pseudo-voigt" only; BraggNN was trained on neighbours and
    doublets and centres them itself, ~100× faster). With BraggNN, peaks whose predicted σ
    exceeds ``model.uncertain_px`` are flagged ``uncertain``; ``refit_uncertain=True``
    re-does them by the single-peak fit. A fit that fails keeps the previous estimate.
    """
    if method not in METHODS:
        raise ValueError(f"unknown peak method {method!r}; available: {', '.join(METHODS)}")
    if method == "braggnn" and model is None:
        from ..models import load_model

        model = load_model("braggnn")
    if fit_multi is None:
        fit_multi = method == "pseudo-voigt"
    counts = [len(fp.rows) for fp in frames]
    if not sum(counts):
        return [empty_table() for _ in frames]
    # every frame's peaks in one set of arrays: one pass, one network call, one table
    patches = np.concatenate([fp.patches for fp in frames])
    edge = np.concatenate([fp.edge for fp in frames])
    n_near = np.concatenate([fp.n_near for fp in frames])
    scale = np.concatenate([fp.scale for fp in frames])[:, None]
    origin = np.concatenate([fp.origin for fp in frames])
    n = len(patches)
    centre, std, intensity = centroid(patches)
    methods = np.full(n, "centroid", dtype=object)
    uncertain = np.zeros(n, bool)
    clean = (np.flatnonzero(n_near == 0) if fit_multi and method != "centroid"
             else np.arange(n))
    redo = np.zeros(0, int)
    if method == "braggnn" and len(clean):
        centre[clean], std[clean] = model.predict(patches[clean], return_std=True)
        methods[clean] = "braggnn"
        unsure = clean[(std[clean] * scale[clean]).max(axis=1) > model.uncertain_px]
        uncertain[unsure] = True
        if refit_uncertain:
            redo = unsure
    elif method == "pseudo-voigt":
        redo = clean
    if len(redo):
        from .fitting import fit_patches

        fc, fs, ok = fit_patches(patches[redo], starts=centre[redo])
        centre[redo[ok]], std[redo[ok]] = fc[ok], fs[ok]
        methods[redo[ok]] = "pseudo-voigt"
    bounds = np.cumsum([0, *counts])
    if fit_multi and method != "centroid":
        for fp, a, b in zip(frames, bounds[:-1], bounds[1:]):
            done: set = set()
            for i in np.flatnonzero(fp.n_near > 0):  # views: the fits write into the arrays
                if i not in done:
                    _fit_multi(fp, i, centre[a:b], std[a:b], methods[a:b], done)
    pos = origin + scale * centre + (scale - 1) / 2
    std = std * scale
    code = edge.astype(int) + 2 * (n_near > 0) + 4 * uncertain
    table = pd.DataFrame({
        "frame": np.repeat([fp.frame_index for fp in frames], counts),
        "row": pos[:, 0],
        "col": pos[:, 1],
        "row_std": std[:, 0],
        "col_std": std[:, 1],
        "intensity": intensity,
        "method": methods.astype(str),
        "flag": np.array(FLAGS)[code],
    })
    return [_part(table, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _part(table: pd.DataFrame, a: int, b: int) -> pd.DataFrame:
    """Rows ``a:b`` as a table of their own (index 0..), cheaply: a shallow copy of the
    slice (the frames' rows do not overlap, and the combined table is dropped)."""
    part = table.iloc[a:b].copy(deep=False)
    part.index = pd.RangeIndex(b - a)
    return part


# the flag of a peak from (edge, multi, uncertain) as bits 1, 2, 4
FLAGS = ["", "edge", "multi", "edge|multi", "uncertain", "edge|uncertain", "multi|uncertain",
         "edge|multi|uncertain"]


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
        COLUMNS, [int, float, float, float, float, float, str, str])})


def locate_peaks(frame, method: str = "centroid", frame_index: int = 0, k: float = 6.0,
                 model=None, window: str = "auto", fit_multi: bool | None = None,
                 refit_uncertain: bool = False) -> pd.DataFrame:
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
    return centre_peaks([prepare(frame, frame_index, k, window)], method, model,
                        fit_multi=fit_multi, refit_uncertain=refit_uncertain)[0]

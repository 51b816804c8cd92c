"""Simulated 11×11 Bragg-peak patches with their TRUE centres, for training and benchmarks.

The recipe (``RECIPE``, recorded in the model card):

- a 2D pseudo-Voigt (``simulation.spots.pseudo_voigt_2d``) with random half widths,
  ellipticity, rotation and Lorentzian fraction η; its centre within ±1 px of the patch
  centre (the frame pipeline centres patches on the brightest pixel);
- peak heights log-uniform from 4 σ of the background noise (below the peak finder's
  6 σ) to beyond the 16-bit range: counts saturate at 65535;
- a sloped background, Poisson counting noise and Gaussian read noise;
- kinds, each a known weakness of BraggNN or a frame feature:
  ``isolated``; ``neighbour`` (one or two other peaks 3.5–9 px away, partly inside the
  patch); ``irregular`` (a non-pseudo-Voigt peak: two close sub-peaks; the truth is their
  height-weighted mean centre); ``edge`` (rows/columns beyond a detector edge filled with
  the background, as ``extract_patches`` pads them); ``sparse`` (a thresholded
  "frame cache": everything below a level is 0).
"""

from __future__ import annotations

import numpy as np

from ..simulation.spots import pseudo_voigt_2d

PATCH = 11
KINDS = ("isolated", "neighbour", "irregular", "edge", "sparse")

RECIPE = {
    "patch": PATCH,
    "centre_offset_px": [-1.0, 1.0],
    "half_width_px": [0.6, 2.5],
    "eta": [0.0, 0.8],
    "angle_rad": [0.0, float(np.pi)],
    "height_counts_loguniform": ["max(15, 4·σ_background)", 150000.0],
    "saturation_counts": 65535,
    "background_loguniform": [1.0, 400.0],
    "background_slope_per_px": "N(0, 0.03·b0 + 0.3)",
    "read_noise_sigma": [0.0, 5.0],
    "kinds": {"isolated": 0.5, "neighbour": 0.22, "irregular": 0.1, "edge": 0.1,
              "sparse": 0.08},
    "neighbour": {"count": [1, 2], "distance_px": [3.5, 9.0], "height_ratio": [0.05, 2.0]},
    "irregular": {"sub_peak_distance_px": [0.5, 1.6], "height_ratio": [0.2, 1.0],
                  "truth": "height-weighted mean of the sub-peak centres"},
    "edge": {"padded_rows_or_cols": [1, 5], "fill": "background level"},
    "sparse": {"zero_below_counts": [3.0, 40.0]},
    "noise": "Poisson(expected) + N(0, read_noise), rounded, clipped to [0, 65535]",
}


def _loguniform(rng, lo, hi, n):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def simulate_patches(n: int, seed: int | np.random.Generator = 0, kinds=None,
                     patch: int = PATCH) -> dict:
    """``n`` patches: dict with ``patches`` (n, 11, 11) float32 counts, ``centre`` (n, 2)
    true (row, col) in patch pixels, ``kind`` (n,) str, ``snr`` (n,) peak height over the
    counting noise at the top, ``height`` (n,)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    probs = RECIPE["kinds"]
    names = list(kinds) if kinds is not None else list(probs)
    p = np.array([probs[k] for k in names], float)
    kind = rng.choice(np.array(names), size=n, p=p / p.sum())
    rows, cols = np.mgrid[0:patch, 0:patch].astype(float)
    rows, cols = rows[None], cols[None]
    mid = (patch - 1) / 2

    def col3(a):
        a = np.asarray(a)
        return (a if a.dtype == bool else a.astype(float))[:, None, None]

    r0 = mid + rng.uniform(-1, 1, n)
    c0 = mid + rng.uniform(-1, 1, n)
    hw_r = rng.uniform(0.6, 2.5, n)
    hw_c = rng.uniform(0.6, 2.5, n)
    angle = rng.uniform(0, np.pi, n)
    eta = rng.uniform(0, 0.8, n)
    b0 = _loguniform(rng, 1.0, 400.0, n)
    slope = rng.normal(0, 1, (n, 2)) * (0.03 * b0 + 0.3)[:, None]
    read = rng.uniform(0, 5, n)
    # from about the detection limit (the peak finder wants 6 σ of the background) upward
    height = _loguniform(rng, np.maximum(15.0, 4 * np.sqrt(b0 + read**2)), 150000.0, n)

    expected = (col3(b0) + col3(slope[:, 0]) * (rows - mid) + col3(slope[:, 1]) * (cols - mid))
    expected = np.clip(expected, 0.0, None)

    # irregular: split the peak into two sub-peaks around the true centre
    irr = kind == "irregular"
    d = rng.uniform(0.5, 1.6, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    w2 = rng.uniform(0.2, 1.0, n)  # second sub-peak height relative to the first
    # sub-peak centres at -d·w2/(1+w2) and +d/(1+w2) along phi: weighted mean = true centre
    a1 = np.where(irr, -d * w2 / (1 + w2), 0.0)
    a2 = np.where(irr, d / (1 + w2), 0.0)
    h1 = np.where(irr, height / (1 + w2), height)
    expected = expected + pseudo_voigt_2d(
        rows, cols, col3(r0 + a1 * np.sin(phi)), col3(c0 + a1 * np.cos(phi)),
        col3(hw_r), col3(hw_c), col3(angle), col3(eta), col3(h1))
    expected = expected + np.where(col3(irr), pseudo_voigt_2d(
        rows, cols, col3(r0 + a2 * np.sin(phi)), col3(c0 + a2 * np.cos(phi)),
        col3(hw_r * rng.uniform(0.7, 1.3, n)), col3(hw_c * rng.uniform(0.7, 1.3, n)),
        col3(angle), col3(eta), col3(h1 * w2)), 0.0)

    # neighbours: one or two further peaks whose centres lie 3.5-9 px away
    nb = kind == "neighbour"
    for j in range(2):
        on = nb & ((j == 0) | (rng.random(n) < 0.35))
        dist = rng.uniform(3.5, 9.0, n)
        ang = rng.uniform(0, 2 * np.pi, n)
        amp = height * _loguniform(rng, 0.05, 2.0, n)
        term = pseudo_voigt_2d(
            rows, cols, col3(r0 + dist * np.sin(ang)), col3(c0 + dist * np.cos(ang)),
            col3(rng.uniform(0.6, 2.5, n)), col3(rng.uniform(0.6, 2.5, n)),
            col3(rng.uniform(0, np.pi, n)), col3(rng.uniform(0, 0.8, n)), col3(amp))
        expected = expected + np.where(col3(on), term, 0.0)

    counts = rng.poisson(expected) + rng.normal(0, 1, expected.shape) * col3(read)
    counts = np.clip(np.rint(counts), 0, 65535)

    # sparse frame caches: everything below a level is 0
    sp = kind == "sparse"
    level = rng.uniform(3, 40, n) + np.where(sp, b0, 0.0)
    counts = np.where(col3(sp) & (counts < col3(level)), 0.0, counts)

    # edge: 1-5 rows/columns beyond the frame filled with the background level; the true
    # centre stays inside the frame (≥ -0.5 px beyond the last real pixel row/column)
    edge = kind == "edge"
    side = rng.integers(0, 4, n)
    centre = np.stack([r0, c0], 1)
    for i in np.flatnonzero(edge):
        pos = centre[i, side[i] // 2]
        lo_side = side[i] % 2 == 0
        # rows before the edge: padded pixels < first_real
        limit = int(np.floor(pos + 0.5)) if lo_side else int(np.ceil(pos - 0.5))
        k = int(rng.integers(1, 6))
        fill = float(np.rint(b0[i]))  # the frame median: its background
        if lo_side:
            first_real = min(k, limit)
            sl = slice(0, first_real)
        else:
            first_pad = max(patch - k, limit + 1)
            sl = slice(first_pad, patch)
        if side[i] // 2 == 0:
            counts[i, sl, :] = fill
        else:
            counts[i, :, sl] = fill

    top = np.minimum(height + b0, 65535.0)
    snr = height / np.sqrt(top + read**2)
    return {"patches": counts.astype(np.float32), "centre": centre, "kind": kind,
            "snr": snr, "height": height}

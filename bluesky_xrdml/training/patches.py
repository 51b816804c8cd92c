"""Simulated 11×11 Bragg-spot patches with their TRUE centres, for training and benchmarks.

The label is the centre of the WHOLE spot, its intensity centroid (the quantity grain
fitting consumes), even where the spot is cut by the window, a detector gap or the edge.
The recipe (``RECIPE``, recorded in the model card):

- each spot is a sum of 2D pseudo-Voigts (``simulation.spots.pseudo_voigt_2d``) of one shape
  (random half widths, ellipticity, rotation, Lorentzian fraction η); its centroid within
  ±1.2 px of the patch centre (the frame pipeline centres windows on the spot);
- peak heights log-uniform from 4 σ of the background noise (below the peak finder's
  6 σ) to beyond the 16-bit range; counts saturate at 65535 or at a lower level;
- a sloped background, Poisson counting noise and Gaussian read noise;
- kinds, each a known weakness of BraggNN or a feature of real detector frames:
  ``isolated``; ``neighbour`` (one or two other spots 2.5–9 px away, partly inside the
  patch: doublets and neighbours); ``irregular`` (split: two close sub-spots);
  ``streak`` (ω integration smears a spot along a line in any direction, 1.5–9 px long,
  with an asymmetric intensity profile along it); ``saturated`` (a detector that saturates
  at 2 000–65 535 counts, the top 1.2–10× above it: a flat top); ``gap`` (1–3 dead rows or
  columns of 0 through the spot, as between detector modules); ``edge`` (rows/columns
  beyond a detector edge filled with the background, as ``extract_patches`` pads them);
  ``sparse`` (a thresholded "frame cache": everything below a level is 0; also applied to
  a fifth of the streaked, saturated and gap patches).
"""

from __future__ import annotations

import numpy as np

from ..simulation.spots import pseudo_voigt_2d

PATCH = 11
KINDS = ("isolated", "neighbour", "irregular", "streak", "saturated", "gap", "edge", "sparse")
STREAK_POINTS = 9

RECIPE = {
    "patch": PATCH,
    "label": "intensity centroid of the whole spot",
    "centre_offset_px": [-1.2, 1.2],
    "half_width_px": [0.5, 3.0],
    "eta": [0.0, 0.8],
    "angle_rad": [0.0, float(np.pi)],
    "height_counts_loguniform": ["max(15, 4·σ_background)", 150000.0],
    "saturation_counts": 65535,
    "background_loguniform": [1.0, 400.0],
    "background_slope_per_px": "N(0, 0.03·b0 + 0.3)",
    "read_noise_sigma": [0.0, 5.0],
    "kinds": {"isolated": 0.3, "neighbour": 0.16, "irregular": 0.07, "streak": 0.17,
              "saturated": 0.1, "gap": 0.05, "edge": 0.07, "sparse": 0.08},
    "neighbour": {"count": [1, 2], "distance_px": [2.5, 9.0], "height_ratio": [0.05, 2.0]},
    "irregular": {"sub_peak_distance_px": [0.5, 1.6], "height_ratio": [0.2, 1.0]},
    "streak": {"length_px": [1.5, 9.0], "direction_rad": [0.0, float(np.pi)],
               "points": STREAK_POINTS, "profile": "Gaussian along the line, its peak "
               "anywhere within ±30 % of the length, σ 0.2–1× the length"},
    "saturated": {"level": "(height + background) / U(1.2, 10), at least 2000"},
    "gap": {"width_px": [1, 3], "offset_from_centre_px": [-3, 3], "value": 0},
    "edge": {"padded_rows_or_cols": [1, 5], "fill": "background level"},
    "sparse": {"zero_below_counts": "background + U(0, 8)·σ + U(3, 40)",
               "also_for": {"streak": 0.2, "saturated": 0.2, "gap": 0.2}},
    "noise": "Poisson(expected) + N(0, read_noise), rounded, clipped to [0, saturation]",
}


def _loguniform(rng, lo, hi, n):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def simulate_patches(n: int, seed: int | np.random.Generator = 0, kinds=None,
                     patch: int = PATCH, max_height_sigmas: float | None = None) -> dict:
    """``n`` patches: dict with ``patches`` (n, 11, 11) float32 counts, ``centre`` (n, 2)
    true (row, col) of the whole spot's intensity centroid in patch pixels, ``kind`` (n,)
    str, ``snr`` (n,) peak height over the counting noise at the top, ``height`` (n,),
    ``noise`` (n,) σ of the background counts (Poisson + read noise): the peak finder needs
    ``height`` above ``k``·``noise`` (k = 6 by default) to see a spot at all.
    ``max_height_sigmas``: faint spots only, their heights at most this many σ of the
    background (a training mix's extra faint spots; the recipe's upper limit otherwise)."""
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

    r0 = mid + rng.uniform(-1.2, 1.2, n)
    c0 = mid + rng.uniform(-1.2, 1.2, n)
    hw_r = rng.uniform(0.5, 3.0, n)
    hw_c = rng.uniform(0.5, 3.0, n)
    angle = rng.uniform(0, np.pi, n)
    eta = rng.uniform(0, 0.8, n)
    b0 = _loguniform(rng, 1.0, 400.0, n)
    slope = rng.normal(0, 1, (n, 2)) * (0.03 * b0 + 0.3)[:, None]
    read = rng.uniform(0, 5, n)
    # from about the detection limit (the peak finder wants 6 σ of the background) upward
    low = np.maximum(15.0, 4 * np.sqrt(b0 + read**2))
    high = 150000.0 if max_height_sigmas is None else np.maximum(
        low * 1.01, np.minimum(150000.0, max_height_sigmas * np.sqrt(b0 + read**2)))
    height = _loguniform(rng, low, high, n)

    expected = (col3(b0) + col3(slope[:, 0]) * (rows - mid) + col3(slope[:, 1]) * (cols - mid))
    expected = np.clip(expected, 0.0, None)

    # sub-spots of one shape at offsets t along a direction, weights w (Σw = 1, Σw·t = 0):
    # their weighted mean, the intensity centroid, is the true centre (r0, c0)
    m = STREAK_POINTS
    t = np.zeros((n, m))
    w = np.zeros((n, m))
    w[:, 0] = 1.0
    phi = rng.uniform(0, np.pi, n)
    # irregular (split): two sub-spots 0.5-1.6 px apart, the second 0.2-1× as high
    irr = kind == "irregular"
    d = rng.uniform(0.5, 1.6, n)
    w2 = rng.uniform(0.2, 1.0, n)
    t[irr, 1] = d[irr]
    w[irr, 0], w[irr, 1] = 1 / (1 + w2[irr]), w2[irr] / (1 + w2[irr])
    # streak: ω integration smears the spot along a line, with an asymmetric profile
    st = kind == "streak"
    length = rng.uniform(1.5, 9.0, n)
    grid = np.linspace(-0.5, 0.5, m)[None] * length[:, None]
    peak_at = rng.uniform(-0.3, 0.3, n)[:, None] * length[:, None]
    width = rng.uniform(0.2, 1.0, n)[:, None] * length[:, None]
    prof = np.exp(-0.5 * ((grid - peak_at) / width) ** 2)
    t[st], w[st] = grid[st], prof[st] / prof[st].sum(axis=1, keepdims=True)
    # peak height of the summed spot ≈ height: scale the sub-spots by the overlap
    t -= (w * t).sum(axis=1, keepdims=True)
    top = np.ones(n)
    many = irr | st
    if many.any():
        sub_r = r0[many, None] + t[many] * np.sin(phi[many, None])
        sub_c = c0[many, None] + t[many] * np.cos(phi[many, None])
        prof = pseudo_voigt_2d(sub_r[:, :, None], sub_c[:, :, None], sub_r[:, None, :],
                               sub_c[:, None, :], hw_r[many, None, None],
                               hw_c[many, None, None], angle[many, None, None],
                               eta[many, None, None], 1.0)
        top[many] = (prof * w[many, None, :]).sum(axis=2).max(axis=1)
    amp = height / top
    for k in range(m):
        on = w[:, k] > 0
        if not on.any():
            continue
        idx = np.flatnonzero(on)
        expected[idx] += pseudo_voigt_2d(
            rows, cols, col3(r0[idx] + t[idx, k] * np.sin(phi[idx])),
            col3(c0[idx] + t[idx, k] * np.cos(phi[idx])), col3(hw_r[idx]), col3(hw_c[idx]),
            col3(angle[idx]), col3(eta[idx]), col3(amp[idx] * w[idx, k]))

    # neighbours: one or two further spots whose centres lie 2.5-9 px away
    nb = kind == "neighbour"
    for j in range(2):
        on = nb & ((j == 0) | (rng.random(n) < 0.35))
        dist = rng.uniform(2.5, 9.0, n)
        ang = rng.uniform(0, 2 * np.pi, n)
        amp_nb = height * _loguniform(rng, 0.05, 2.0, n)
        idx = np.flatnonzero(on)
        expected[idx] += pseudo_voigt_2d(
            rows, cols, col3((r0 + dist * np.sin(ang))[idx]), col3((c0 + dist * np.cos(ang))[idx]),
            col3(rng.uniform(0.5, 2.5, n)[idx]), col3(rng.uniform(0.5, 2.5, n)[idx]),
            col3(rng.uniform(0, np.pi, n)[idx]), col3(rng.uniform(0, 0.8, n)[idx]),
            col3(amp_nb[idx]))

    counts = rng.poisson(expected) + rng.normal(0, 1, expected.shape) * col3(read)
    sat = np.full(n, 65535.0)
    satk = kind == "saturated"
    sat[satk] = np.clip((height[satk] + b0[satk]) / rng.uniform(1.2, 10.0, satk.sum()),
                        2000.0, 65535.0)
    counts = np.clip(np.rint(counts), 0, col3(sat))

    # detector gaps: 1-3 dead rows or columns (0) through the spot
    gap = kind == "gap"
    for i in np.flatnonzero(gap):
        wgap = int(rng.integers(1, 4))
        at = int(np.rint(mid + rng.uniform(-3, 3)))
        if rng.random() < 0.5:
            counts[i, at:at + wgap, :] = 0.0
        else:
            counts[i, :, at:at + wgap] = 0.0

    # sparse frame caches: everything below a level is 0
    sp = (kind == "sparse") | ((st | satk | gap) & (rng.random(n) < 0.2))
    level = (b0 + rng.uniform(0, 8, n) * np.sqrt(b0 + read**2) + rng.uniform(3, 40, n))
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

    top = np.minimum(height + b0, sat)
    snr = height / np.sqrt(top + read**2)
    # the parameters of each (main) spot, for ``centre_bound``
    params = {"r0": r0, "c0": c0, "hw_r": hw_r, "hw_c": hw_c, "angle": angle, "eta": eta,
              "amplitude": amp, "b0": b0, "slope_r": slope[:, 0], "slope_c": slope[:, 1],
              "read": read, "saturation": sat}
    return {"patches": counts.astype(np.float32), "centre": centre, "kind": kind,
            "snr": snr, "height": height, "noise": np.sqrt(b0 + read**2), "params": params}


BOUND_PARAMETERS = ("r0", "c0", "hw_r", "hw_c", "angle", "eta", "amplitude", "b0", "slope_r",
                    "slope_c")


def centre_bound(params: dict, patch: int = PATCH, nuisance: bool = True) -> np.ndarray:
    """Cramér–Rao bound ``(n, 2, 2)``: the smallest covariance of the (row, col) centre
    (px²) that any UNBIASED estimator can reach on ``isolated`` spots of these parameters
    (``simulate_patches(...)["params"]``), from the Fisher information of Poisson counts
    plus Gaussian read noise (variance = expected counts + read²).

    ``nuisance=True``: height, widths, rotation, η, background and its slopes are unknown
    too (10 parameters; the block of the inverse information for the centre), as for a real
    estimator; ``False``: only the centre is unknown (a looser bound). Saturated pixels
    carry no information. An estimator that uses the prior (the centre lies within ±1.2 px
    of the window's middle) can beat this on spots too faint to locate."""
    n = len(params["r0"])
    rows, cols = np.mgrid[0:patch, 0:patch].astype(float)
    mid = (patch - 1) / 2
    p0 = [np.asarray(params[k], float) for k in BOUND_PARAMETERS]

    def expected(p):
        r, c, a, b, ang, eta, amp, b0, sr, sc = (x[:, None, None] for x in p)
        return (pseudo_voigt_2d(rows, cols, r, c, a, b, ang, eta, amp) + b0
                + sr * (rows - mid) + sc * (cols - mid))

    mu = expected(p0)
    var = np.clip(mu, 0, None) + (np.asarray(params["read"], float) ** 2)[:, None, None]
    live = mu < np.asarray(params["saturation"], float)[:, None, None]
    k_all = len(BOUND_PARAMETERS) if nuisance else 2
    jac = []
    for k in range(k_all):  # central differences, relative steps for the scales
        scale = BOUND_PARAMETERS[k] in ("amplitude", "b0")
        step = 1e-4 * (np.maximum(np.abs(p0[k]), 1.0) if scale else 1.0)
        up, down = list(p0), list(p0)
        up[k], down[k] = p0[k] + step, p0[k] - step
        diff = (expected(up) - expected(down)) / (2 * np.broadcast_to(step, (n,)))[:, None, None]
        jac.append(np.where(live, diff, 0.0))
    jac = np.stack(jac, 1).reshape(n, k_all, -1)
    fisher = np.einsum("nki,nli,ni->nkl", jac, jac, 1.0 / var.reshape(n, -1))
    return np.linalg.pinv(fisher, hermitian=True)[:, :2, :2]


def bound_errors(cov: np.ndarray, seed: int = 0) -> np.ndarray:
    """Distances (px) drawn from N(0, ``cov``) per spot: the errors of an efficient unbiased
    estimator, whose percentiles compare with a method's."""
    w, v = np.linalg.eigh(cov)
    z = np.random.default_rng(seed).normal(size=(len(cov), 2)) * np.sqrt(np.clip(w, 0, None))
    return np.hypot(*np.einsum("nij,nj->ni", v, z).T)

"""Classical 2D pseudo-Voigt fits of peak patches (scipy ``least_squares``).

The baseline BraggNN is measured against, the labeller for fine-tuning on a user's own
frames (the authors' original workflow), and the fallback for peaks the network should not
be trusted with: patches holding several peaks (``fit_multi``) and patches the ensemble
disagrees on.

Solver: Levenberg-Marquardt, and the bounded trust-region solver where LM leaves the
plausible range. Model: a rotated 2D pseudo-Voigt (as ``simulation.spots.pseudo_voigt_2d``; analytic
Jacobian) on a sloped background, ``b0 + br·(row-5) + bc·(col-5)``. Residuals are weighted
by the Poisson σ of the counts (plus read noise); saturated pixels are left out. The
centre's standard error comes from the Jacobian at the solution, scaled by the reduced χ².

Coordinates are patch pixels, the centre of ``patch[0, 0]`` being ``(0, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

SATURATION = 65535.0
READ_NOISE = 2.0
LN2 = np.log(2.0)


@dataclass
class Fit:
    """One fitted peak: centre and its standard error (patch pixels), amplitude, success."""

    row: float
    col: float
    row_std: float
    col_std: float
    amplitude: float
    success: bool
    params: np.ndarray


def _grid(shape):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return rows.astype(float), cols.astype(float)


def _background_guess(patch):
    border = np.concatenate([patch[0], patch[-1], patch[1:-1, 0], patch[1:-1, -1]])
    return float(np.median(border))


def _model_and_jacobian(p, rows, cols, n_peaks, cr, cc, jac: bool):
    """The model at the pixels and, when ``jac``, its analytic derivatives (pixels × params)."""
    b0, br, bc, eta = p[:4]
    dr_bg, dc_bg = rows - cr, cols - cc
    out = b0 + br * dr_bg + bc * dc_bg
    J = np.empty((rows.size, len(p))) if jac else None
    if jac:
        J[:, 0], J[:, 1], J[:, 2], J[:, 3] = 1.0, dr_bg, dc_bg, 0.0
    for k in range(n_peaks):
        i = 4 + 6 * k
        amp, r0, c0, hw_r, hw_c, angle = p[i:i + 6]
        ca, sa = np.cos(angle), np.sin(angle)
        dr, dc = rows - r0, cols - c0
        u = (ca * dr + sa * dc) / hw_r
        v = (-sa * dr + ca * dc) / hw_c
        rho2 = u * u + v * v
        lor = 1.0 / (1.0 + rho2)
        gau = np.exp(-LN2 * rho2)
        shape = eta * lor + (1.0 - eta) * gau
        out = out + amp * shape
        if jac:
            d = -amp * (eta * lor * lor + (1.0 - eta) * LN2 * gau)  # ∂f/∂ρ²
            J[:, 3] += amp * (lor - gau)
            J[:, i] = shape
            J[:, i + 1] = d * (-2 * u * ca / hw_r + 2 * v * sa / hw_c)
            J[:, i + 2] = d * (-2 * u * sa / hw_r - 2 * v * ca / hw_c)
            J[:, i + 3] = d * (-2 * u * u / hw_r)
            J[:, i + 4] = d * (-2 * v * v / hw_c)
            J[:, i + 5] = d * 2 * u * v * (hw_c / hw_r - hw_r / hw_c)
    return out, J


def fit_peaks(patch, centres, saturation: float = SATURATION, read_noise: float = READ_NOISE,
              max_nfev: int = 200) -> list[Fit]:
    """Fit ``len(centres)`` pseudo-Voigt peaks (shared η and background) to one patch.

    ``centres``: starting ``(row, col)`` of each peak in patch pixels. Returns one ``Fit``
    per peak, in the order given.
    """
    patch = np.asarray(patch, dtype=float)
    centres = np.atleast_2d(np.asarray(centres, dtype=float))
    rows, cols = _grid(patch.shape)
    cr, cc = (patch.shape[0] - 1) / 2, (patch.shape[1] - 1) / 2
    keep = (patch < saturation).ravel()
    data = patch.ravel()[keep]
    sigma = np.sqrt(np.clip(data, 1.0, None) + read_noise**2)
    r_k, c_k = rows.ravel()[keep], cols.ravel()[keep]
    bg = _background_guess(patch)
    n = len(centres)
    p0 = [bg, 0.0, 0.0, 0.3]
    lo = [-np.inf, -np.inf, -np.inf, 0.0]
    hi = [np.inf, np.inf, np.inf, 1.0]
    for r, c in centres:
        ir = int(np.clip(round(r), 0, patch.shape[0] - 1))
        ic = int(np.clip(round(c), 0, patch.shape[1] - 1))
        amp = max(patch[ir, ic] - bg, 1.0)
        p0 += [amp, r, c, 1.2, 1.2, 0.0]
        lo += [0.0, r - 2.5, c - 2.5, 0.3, 0.3, -np.pi]
        hi += [np.inf, r + 2.5, c + 2.5, 6.0, 6.0, np.pi]
    p0 = np.clip(p0, np.asarray(lo) + 1e-9, np.asarray(hi) - 1e-9)

    def residual(p):
        return (_model_and_jacobian(p, r_k, c_k, n, cr, cc, False)[0] - data) / sigma

    def jacobian(p):
        return _model_and_jacobian(p, r_k, c_k, n, cr, cc, True)[1] / sigma[:, None]

    lo, hi = np.asarray(lo), np.asarray(hi)

    def sane(p):
        q = p.copy()
        q[7::6], q[8::6] = np.abs(q[7::6]), np.abs(q[8::6])  # half widths enter squared
        return bool(np.all(q >= lo - 0.05) and np.all(q <= hi + 0.05)), q

    try:
        # Levenberg-Marquardt (MINPACK) first: ~2x faster than the bounded solver; the
        # bounded trust-region fit only where LM wandered off or did not converge
        res = least_squares(residual, p0, jac=jacobian, method="lm", x_scale="jac",
                            max_nfev=max_nfev)
        ok, p = sane(res.x)
        if not (ok and res.success):
            res = least_squares(residual, p0, jac=jacobian, bounds=(lo, hi), x_scale="jac",
                                max_nfev=max_nfev)
            p = res.x
        ok = bool(res.success)
        dof = max(len(data) - len(p), 1)
        chi2 = 2 * res.cost / dof
        cov = np.linalg.pinv(res.jac.T @ res.jac) * max(chi2, 1.0)
        var = np.diag(cov)
    except (ValueError, np.linalg.LinAlgError):
        p, ok, var = p0, False, np.full(len(p0), np.nan)
    fits = []
    for k in range(n):
        i = 4 + 6 * k
        fits.append(Fit(float(p[i + 1]), float(p[i + 2]), float(np.sqrt(abs(var[i + 1]))),
                        float(np.sqrt(abs(var[i + 2]))), float(p[i]), ok, p))
    return fits


def fit_pseudo_voigt(patch, start=None, **kwargs) -> Fit:
    """Fit one pseudo-Voigt peak to a patch; ``start`` defaults to the brightest pixel."""
    patch = np.asarray(patch, dtype=float)
    if start is None:
        start = np.unravel_index(np.argmax(np.where(patch < SATURATION, patch, -np.inf)
                                           if (patch < SATURATION).any() else patch),
                                 patch.shape)
        # saturated tops: start from the middle of the flat region instead
        sat = patch >= SATURATION
        if sat.any():
            start = np.argwhere(sat).mean(axis=0)
    return fit_peaks(patch, [start], **kwargs)[0]


def fit_patches(patches, starts=None, **kwargs):
    """Single-peak fits of ``(N, h, w)`` patches → ``(centre (N, 2), std (N, 2), ok (N,))``.

    ``starts`` (N, 2) are the starting centres (default: the patch centre).
    """
    patches = np.asarray(patches, dtype=float)
    n = len(patches)
    if starts is None:
        starts = np.tile([(patches.shape[1] - 1) / 2, (patches.shape[2] - 1) / 2], (n, 1))
    centre, std = np.zeros((n, 2)), np.zeros((n, 2))
    ok = np.zeros(n, bool)
    for i in range(n):
        f = fit_peaks(patches[i], [starts[i]], **kwargs)[0]
        centre[i] = f.row, f.col
        std[i] = f.row_std, f.col_std
        ok[i] = f.success and np.all(np.isfinite(std[i]))
    return centre, std, ok


def fit_multi(patch, centres, **kwargs) -> Fit:
    """Centre of the first of several peaks in a patch, fitted together with the others."""
    return fit_peaks(patch, centres, **kwargs)[0]


@dataclass
class SpotFit:
    """A whole-spot fit: the centre (frame pixels) of the fitted profile, which is the
    intensity centroid of the whole spot for this symmetric model, its standard error, the
    reduced χ² over the measured pixels and the number of pixels fitted."""

    row: float
    col: float
    row_std: float
    col_std: float
    chi2: float
    n_pixels: int
    success: bool


def fit_spot(window, origin=(0, 0), level: float | None = None,
             saturation: float | None = None, read_noise: float = READ_NOISE,
             max_nfev: int = 300) -> SpotFit:
    """Fit one rotated 2D pseudo-Voigt + constant background to a window holding a WHOLE
    spot (the labeller for real frames).

    Unlike ``fit_peaks`` on an 11×11 patch, it treats the pixels a detector or a frame
    cache did not measure as censored, not as data: pixels at 0 in a thresholded frame
    cache (``level``: the cache threshold, default the smallest non-zero count in the
    window when the window holds zeros) only count when the model rises above ``level``;
    saturated pixels (``saturation``, default: the window's maximum when at least 3 pixels
    sit within 0.5 % of it) only count when the model falls below it. ``origin`` is the
    frame position of ``window[0, 0]``.
    """
    w = np.asarray(window, dtype=float)
    rows, cols = _grid(w.shape)
    top = w.max()
    if saturation is None:
        saturation = top if np.sum(w >= 0.995 * top) >= 3 else np.inf
    zero = w <= 0
    if level is None:
        level = float(w[~zero].min()) if zero.any() and (~zero).any() else 0.0
    sat = w >= saturation
    meas = ~zero & ~sat
    if meas.sum() < 8:
        return SpotFit(np.nan, np.nan, np.nan, np.nan, np.nan, int(meas.sum()), False)
    r_m, c_m, d_m = rows[meas], cols[meas], w[meas]
    sig_m = np.sqrt(np.clip(d_m, 1.0, None) + read_noise**2)
    r_z, c_z = rows[zero], cols[zero]
    r_s, c_s = rows[sat], cols[sat]
    sig_z = np.sqrt(max(level, 1.0) + read_noise**2)
    sig_s = np.sqrt(max(saturation, 1.0) if np.isfinite(saturation) else 1.0)
    cr, cc = (w.shape[0] - 1) / 2, (w.shape[1] - 1) / 2
    weight = np.clip(w - (level if zero.any() else np.median(w)), 0, None)
    start = ((weight * rows).sum() / weight.sum(), (weight * cols).sum() / weight.sum())
    bg0 = 0.0 if zero.any() else float(np.median(w))
    p0 = np.array([bg0, 0.0, 0.0, 0.3, max(top - bg0, 1.0), *start, 1.5, 1.5, 0.0])
    lo = np.array([0.0, -1e-9, -1e-9, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3, -np.pi])
    hi = np.array([max(level, 1.0) * 2 + bg0 * 2 + 1, 1e-9, 1e-9, 1.0, np.inf,
                   w.shape[0] - 1.0, w.shape[1] - 1.0, 20.0, 20.0, np.pi])
    p0 = np.clip(p0, lo + 1e-12, hi - 1e-12)

    def model(p, r, c):
        return _model_and_jacobian(p, r, c, 1, cr, cc, False)[0]

    def residual(p):
        out = [(model(p, r_m, c_m) - d_m) / sig_m]
        if len(r_z):
            out.append(np.clip(model(p, r_z, c_z) - level, 0, None) / sig_z)
        if len(r_s):
            out.append(np.clip(saturation - model(p, r_s, c_s), 0, None) / sig_s)
        return np.concatenate(out)

    try:
        res = least_squares(residual, p0, bounds=(lo, hi), x_scale="jac", max_nfev=max_nfev)
        p = res.x
        J = res.jac[:len(d_m)]
        dof = max(len(d_m) - 8, 1)
        chi2 = float(np.sum(res.fun[:len(d_m)] ** 2) / dof)
        cov = np.linalg.pinv(J.T @ J) * max(chi2, 1.0)
        var = np.abs(np.diag(cov))
        ok = bool(res.success)
    except (ValueError, np.linalg.LinAlgError):
        return SpotFit(np.nan, np.nan, np.nan, np.nan, np.nan, int(meas.sum()), False)
    return SpotFit(float(p[5] + origin[0]), float(p[6] + origin[1]), float(np.sqrt(var[5])),
                   float(np.sqrt(var[6])), chi2, int(meas.sum()), ok)

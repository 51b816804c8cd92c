"""Region-of-interest intensities of powder patterns: what beamline staff look at first.

A ROI is a 2θ window around one reflection. Its net intensity is the counts in the window
minus a straight-line background through the window's two ends, with a Poisson standard
deviation. ROIs come from the user (``Roi("Ni_111", 4.95, 5.05)``) or from structures:
the strongest reflection of each phase that no other phase overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EDGE_POINTS = 3  # points at each end of a window that define its background line


class PatternError(ValueError):
    """Patterns that cannot be analysed (not numbers, wrong length, NaN, negative counts,
    constant)."""


@dataclass(frozen=True)
class Roi:
    name: str
    lo: float  # 2θ, degrees
    hi: float
    phase: str | None = None


def check_patterns(patterns, n_points: int, reject_constant: bool = False) -> np.ndarray:
    """Patterns as float64 (N, n_points), or a ``PatternError`` saying what is wrong.
    ``reject_constant``: a constant pattern (all zero: shutter closed) is an error too
    (measured patterns; a reconstructed voxel outside the sample may well be all zero)."""
    try:
        arr = np.asarray(patterns, dtype=np.float64)
    except (TypeError, ValueError):
        raise PatternError(f"pattern of type {type(patterns).__name__} "
                           f"(dtype {getattr(patterns, 'dtype', '?')}) is not numbers; the "
                           "detector should send counts") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != n_points:
        raise PatternError(f"expected patterns of {n_points} points (the 2θ grid), got shape "
                           f"{arr.shape}; resample onto that grid first")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise PatternError(f"{int(bad.sum())} NaN/inf values in pattern(s) {rows[:10].tolist()}")
    if (arr < 0).any():
        rows = np.unique(np.nonzero(arr < 0)[0])
        raise PatternError(f"{int((arr < 0).sum())} negative counts in pattern(s) "
                           f"{rows[:10].tolist()}; pass raw counts (background not subtracted)")
    flat = np.ptp(arr, axis=1) == 0 if reject_constant else np.zeros(len(arr), bool)
    if flat.any():
        rows = np.nonzero(flat)[0]
        raise PatternError(f"constant pattern(s) {rows[:10].tolist()} (every point = "
                           f"{arr[rows[0], 0]:g}): shutter closed or detector not read out? "
                           "Nothing to analyse")
    return arr


def integrate_rois(patterns, two_theta, rois: list[Roi]):
    """Net ROI intensities: ``(values (N, R), std (N, R))`` in counts."""
    tt = np.asarray(two_theta, float)
    y = check_patterns(patterns, tt.size)
    values = np.zeros((y.shape[0], len(rois)))
    std = np.zeros_like(values)
    for j, roi in enumerate(rois):
        i0, i1 = np.searchsorted(tt, [roi.lo, roi.hi])
        i1 = max(i1, i0 + 2 * EDGE_POINTS + 1)
        win = y[:, i0:i1]
        left = win[:, :EDGE_POINTS].mean(axis=1)
        right = win[:, -EDGE_POINTS:].mean(axis=1)
        line = left[:, None] + (right - left)[:, None] * np.linspace(0, 1, win.shape[1])
        values[:, j] = (win - line).sum(axis=1)
        # Poisson: var(sum) = sum counts; the background line adds ~ n² var(edge mean)
        nwin = win.shape[1]
        var_bg = (nwin / 2) ** 2 * (left + right) / EDGE_POINTS
        std[:, j] = np.sqrt(win.sum(axis=1) + var_bg)
    return values, std


def rois_from_phases(peak_lists, two_theta, half_width: float = 0.06, min_separation=None):
    """One ROI per phase: its strongest reflection inside the 2θ range that no reflection of
    another phase comes within ``min_separation`` (default 2·half_width) of.

    ``peak_lists``: dict name -> (2θ positions, intensities, hkl list), e.g. from
    ``simulation.powder.peak_list(...).two_theta(wavelength)``.
    """
    tt = np.asarray(two_theta, float)
    sep = 2 * half_width if min_separation is None else min_separation
    lo, hi = tt[0] + half_width, tt[-1] - half_width
    rois = []
    for name, (pos, inten, hkl) in peak_lists.items():
        others = np.concatenate([p for n, (p, _, _) in peak_lists.items() if n != name] or [[]])
        order = np.argsort(inten)[::-1]
        for k in order:
            p = pos[k]
            if not (lo < p < hi):
                continue
            if others.size and np.min(np.abs(others - p)) < sep:
                continue
            label = "".join(str(abs(i)) for i in hkl[k])
            rois.append(Roi(f"{name}_{label}", p - half_width, p + half_width, phase=name))
            break
    return rois

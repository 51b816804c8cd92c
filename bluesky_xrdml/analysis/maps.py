"""Maps from flat scans: a grid scan's primary stream is flat, point i = seq_num - 1.

A grid's points are visited in row-major order (outer motor first), except that a
snaked axis (``start["snaking"]``, bluesky's ``snake_axes=True``) runs backwards on every
other pass of the axes outside it. ``grid_index`` puts each point where it was measured;
when a plan did not record its snaking (``list_grid_scan``), the measured positions say
which passes ran backwards.
"""

from __future__ import annotations

import numpy as np


def grid_index(points, shape, snaking=None, positions=None) -> np.ndarray:
    """``(N, ndim)`` grid indices of scan points ``points`` (seq_num, 1-based).

    ``snaking``: one bool (or None: unknown) per axis, as in ``start["snaking"]``.
    ``positions``: optional ``{axis: measured positions of the points}``, used to find
    the snaking of axes whose snaking is unknown. Points outside the grid get -1.
    """
    shape = tuple(int(s) for s in shape)
    flat = np.asarray(points, int) - 1
    ok = (flat >= 0) & (flat < int(np.prod(shape)))
    idx = np.full((flat.size, len(shape)), -1, int)
    if not ok.any():
        return idx
    idx[ok] = np.array(np.unravel_index(flat[ok], shape)).T
    snaking = list(snaking) if snaking is not None else [None] * len(shape)
    snaking += [None] * (len(shape) - len(snaking))
    for k in range(1, len(shape)):
        passes = flat[ok] // int(np.prod(shape[k:]))  # how many passes of axis k before
        snake = snaking[k]
        if snake is None and positions is not None and k in positions:
            snake = _looks_snaked(np.asarray(positions[k], float)[ok], passes, idx[ok, k])
        if snake:
            col = idx[ok, k]
            idx[ok, k] = np.where(passes % 2 == 1, shape[k] - 1 - col, col)
    return idx


def _looks_snaked(pos, passes, index) -> bool:
    """True when the positions of axis ``k`` run one way on even passes and the other
    way on odd ones."""
    def slope(mask):
        if mask.sum() < 2 or np.ptp(index[mask]) == 0:
            return 0.0
        ok = mask & np.isfinite(pos)
        if ok.sum() < 2:
            return 0.0
        return float(np.polyfit(index[ok], pos[ok], 1)[0])

    even, odd = slope(passes % 2 == 0), slope(passes % 2 == 1)
    return even * odd < 0


def assemble(points, values, shape, snaking=None, positions=None) -> np.ndarray:
    """Place ``values`` of scan points ``points`` (seq_num, 1-based) on a grid of ``shape``
    where they were measured (see ``grid_index``). Points never measured (an aborted
    scan) are NaN."""
    out = np.full(tuple(int(s) for s in shape), np.nan)
    idx = grid_index(points, shape, snaking, positions)
    ok = (idx >= 0).all(axis=1)
    out[tuple(idx[ok].T)] = np.asarray(values, float)[ok]
    return out


def axis_coordinate(points, positions, shape, axis: int, snaking=None,
                    all_positions=None) -> np.ndarray:
    """The coordinate of grid ``axis`` from measured motor positions (mean over the other
    axes; NaN-safe). Where no position was recorded, falls back to the index.
    ``all_positions``: ``{axis: positions}`` for finding unrecorded snaking."""
    grid = assemble(points, positions, shape, snaking, all_positions)
    other = tuple(i for i in range(len(shape)) if i != axis)
    with np.errstate(all="ignore"), np.testing.suppress_warnings() as sup:
        sup.filter(RuntimeWarning)
        coord = np.nanmean(grid, axis=other)
    return np.where(np.isfinite(coord), coord, np.arange(shape[axis], dtype=float))

"""Maps from flat scans: a grid scan's primary stream is flat, point i = seq_num - 1."""

from __future__ import annotations

import numpy as np


def assemble(points, values, shape) -> np.ndarray:
    """Place ``values`` of scan points ``points`` (seq_num, 1-based) on a grid of ``shape``.
    Points never measured (an aborted scan) are NaN."""
    out = np.full(int(np.prod(shape)), np.nan)
    idx = np.asarray(points, int) - 1
    ok = (idx >= 0) & (idx < out.size)
    out[idx[ok]] = np.asarray(values, float)[ok]
    return out.reshape(shape)


def axis_coordinate(points, positions, shape, axis: int) -> np.ndarray:
    """The coordinate of grid ``axis`` from measured motor positions (mean over the other
    axes; NaN-safe). Where no position was recorded, falls back to the index."""
    grid = assemble(points, positions, shape)
    other = tuple(i for i in range(len(shape)) if i != axis)
    with np.errstate(all="ignore"), np.testing.suppress_warnings() as sup:
        sup.filter(RuntimeWarning)
        coord = np.nanmean(grid, axis=other)
    return np.where(np.isfinite(coord), coord, np.arange(shape[axis], dtype=float))

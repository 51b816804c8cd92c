"""The map events an analysis files at the stop of a run: per-point values placed on the
scan grid (snaking followed), scattered points with their measured positions, or XRD-CT
voxel images with coordinates in mm."""

from __future__ import annotations

import numpy as np

from .. import layout
from ..analysis import maps as gridmaps
from .routes import Geometry


def assemble_rows(rows: list, names, geometry: Geometry, std: bool = True):
    """``(points, grids)``: each value ``name`` (and its ``name_std``) of the per-item rows
    placed on the scan grid where it was measured (snaking followed), or, for a
    'scatter' geometry, one value per point in point order."""
    points = [r["point"] for r in rows]
    keys = [n for name in names for n in ((name, f"{name}_std") if std else (name,))]
    if geometry.kind == "scatter":
        order = np.argsort(points, kind="stable")
        return ([points[i] for i in order],
                {n: np.asarray([rows[i][n] for i in order], float) for n in keys})
    positions = {k: [r.get(m, np.nan) for r in rows] for k, m in enumerate(geometry.motors)}
    grids = {n: gridmaps.assemble(points, [r[n] for r in rows], geometry.shape,
                                  geometry.snaking, positions) for n in keys}
    return points, grids


def voxel_event(images: dict, step: float):
    """(data keys, data) of one XRD-CT map event: (row, col) images plus voxel coordinates
    in mm, centred on the rotation axis, ``step`` apart (the translation step)."""
    n = next(iter(images.values())).shape[0]
    coord = (np.arange(n) - n // 2) * step
    keys = {k: layout.array(v.shape, ("row", "col")) for k, v in images.items()}
    keys["row"] = layout.array((n,), ("row",), units="mm")
    keys["col"] = layout.array((n,), ("col",), units="mm")
    return keys, {**images, "row": coord, "col": coord}


def grid_event(values: dict, rows: list, points: list, geometry: Geometry):
    """(data keys, data) of one map event: 2D arrays with motor dims plus motor coordinates
    (the mean measured position along each grid axis). For a 'scatter' geometry: 1D arrays
    along ``point`` (the raw seq_num), with every motor's measured position per point."""
    if geometry.kind == "scatter":
        by_point = {r["point"]: r for r in rows}
        n = len(points)
        keys = {k: layout.array((n,), ("point",)) for k in values}
        data = dict(values)
        keys["point"] = layout.array((n,), ("point",))
        data["point"] = np.asarray(points, float)
        for motor in geometry.motors:  # coordinates along "point", not values
            keys[motor] = {**layout.array((n,), ("point",)), "coordinate": True}
            data[motor] = np.asarray([by_point[p].get(motor, np.nan) for p in points], float)
        return keys, data
    dims = tuple(geometry.motors)
    keys = {n: layout.array(v.shape, dims) for n, v in values.items()}
    data = dict(values)
    all_pos = {k: [r.get(m, np.nan) for r in rows] for k, m in enumerate(dims)}
    for axis, motor in enumerate(dims):
        data[motor] = gridmaps.axis_coordinate(points, all_pos[axis], geometry.shape, axis,
                                               geometry.snaking, all_pos)
        keys[motor] = layout.array((geometry.shape[axis],), (motor,))
    return keys, data

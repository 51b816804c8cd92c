"""Scan plans for diffraction maps and XRD-CT, thin wrappers of bluesky's grid_scan.

Both record ``shape`` and ``motors`` (outer motor first) in the start document, as
``grid_scan`` does, plus ``xrdml_scan`` so the analysis knows how to assemble maps.
"""

from __future__ import annotations

import bluesky.plans as bp


def xrd_map(detectors, x, x_start, x_stop, x_num, y, y_start, y_stop, y_num, *, md=None):
    """Raster map: ``y`` is the outer (slow) axis, ``x`` the inner one, no snaking.

    The primary stream is flat; the map shape ``(y_num, x_num)`` and the motor order
    ``(y, x)`` are in the start document.
    """
    _md = {"plan_name": "xrd_map", "xrdml_scan": "map"}
    _md.update(md or {})
    return (yield from bp.grid_scan(
        list(detectors), y, y_start, y_stop, y_num, x, x_start, x_stop, x_num,
        snake_axes=False, md=_md,
    ))


def xrdct(detectors, translation, t_start, t_stop, t_num, rotation, n_angles, *, md=None):
    """XRD-CT: ``n_angles`` rotations over [0, 180) degrees (outer), each a translation line.

    Powder detectors should be in tomography mode (``powder.mode.put("tomo")``) so that
    each point is a line integral through the sample; the primary stream is then a sinogram
    of shape ``(n_angles, t_num)``.
    """
    step = 180.0 / n_angles
    _md = {
        "plan_name": "xrdct",
        "xrdml_scan": "xrdct",
        "xrdct": {"rotation": rotation.name, "translation": translation.name},
    }
    _md.update(md or {})
    return (yield from bp.grid_scan(
        list(detectors), rotation, 0.0, 180.0 - step, n_angles,
        translation, t_start, t_stop, t_num, snake_axes=False, md=_md,
    ))

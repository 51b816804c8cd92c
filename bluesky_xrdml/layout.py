"""The analysis run: one definition of its layout, used by the callback that writes it,
the catalog helpers that read it, and the docs.

An analysis run is an ordinary Bluesky run. Its start document carries::

    plan_name: "xrdml_analysis"
    xrdml: {raw_uid, replay_uid, raw_scan_id, raw_plan_name, analyses, routes, models,
            config, version}

``routes`` maps each raw data key to the analyses that used it (a list of names).

``raw_uid`` is the archived run's uid also when the analysis ran on a replay of it
(``replay_uid`` is then the replayed run's uid, else None).

Streams (a stream is only present when its analysis ran):

==========  ======================================================================
``peaks``   one event per Bragg peak: frame (raw seq_num), row, col, row_std,
            col_std, intensity, method, flag, detector
``frames``  one event per analysed frame: frame, n_peaks, detector, motor positions
``patterns``one event per analysed 1D pattern: point (raw seq_num), one value and
            ``<name>_std`` per ROI, detector, motor positions
``maps``    one event at the end of a map / XRD-CT: 2D arrays whose data keys carry
            ``dims``; coordinate arrays are data keys named after their dimension
``sinograms`` XRD-CT only: the per-ROI sinograms (rotation × translation) before FBP
``phases``  one event per 1D pattern quantified by PQ-Net: point, ``<phase>_<parameter>``
            (scale, fraction, size_nm, lattice_a, ..., presence) and ``_std``, detector,
            motors; ``rwp`` and ``unexplained`` when the model can explain its prediction
``residuals`` per PQ-Net pattern: point, detector, residual (measured − implied), rwp,
            unexplained
``flags``   one event per pattern PQ-Net explains poorly: point, detector, flag, rwp,
            unexplained (a flag, not an error: the run does not fail)
``errors``  one event per item that failed: point, detector, error (message)
==========  ======================================================================

A second detector of the same kind gets its own streams, suffixed ``_<data key>``.
The stop document's ``exit_status`` is "fail" when any item failed, with the reason.
"""

from __future__ import annotations

import numpy as np

PLAN_NAME = "xrdml_analysis"
PEAKS, FRAMES, PATTERNS, MAPS, SINOGRAMS, ERRORS = (
    "peaks", "frames", "patterns", "maps", "sinograms", "errors",
)
SOURCE = "xrdml"


def number(units: str | None = None, dtype_numpy: str = "<f8") -> dict:
    key = {"source": SOURCE, "dtype": "number", "shape": [], "dtype_numpy": dtype_numpy}
    if units:
        key["units"] = units
    return key


def integer() -> dict:
    return {"source": SOURCE, "dtype": "integer", "shape": [], "dtype_numpy": "<i8"}


def string() -> dict:
    # no dtype_numpy: event-model's schema rejects "|O" and the length is not fixed
    return {"source": SOURCE, "dtype": "string", "shape": []}


def array(shape, dims, units: str | None = None) -> dict:
    key = {"source": SOURCE, "dtype": "array", "shape": [int(s) for s in shape],
           "dims": list(dims), "dtype_numpy": np.dtype("<f8").str}
    if units:
        key["units"] = units
    return key


def stream_name(base: str, detector: str, first: bool) -> str:
    """``base`` for the first detector of a kind, ``base_<detector>`` for any further one."""
    return base if first else f"{base}_{detector}"


def peak_keys() -> dict:
    return {
        "frame": integer(), "row": number("pixel"), "col": number("pixel"),
        "row_std": number("pixel"), "col_std": number("pixel"), "intensity": number("counts"),
        "method": string(), "flag": string(), "detector": string(),
    }


def position_keys(motors) -> dict:
    return {m: number() for m in motors}


def frame_keys(motors) -> dict:
    return {"frame": integer(), "n_peaks": integer(), "detector": string(),
            **position_keys(motors)}


def pattern_keys(value_names, motors, units: str = "counts") -> dict:
    keys = {"point": integer(), "detector": string(), **position_keys(motors)}
    for name in value_names:
        keys[name] = number(units)
        keys[f"{name}_std"] = number(units)
    return keys


def error_keys() -> dict:
    return {"point": integer(), "detector": string(), "error": string()}


def start_metadata(raw_start: dict, analyses, routes, models, config, version) -> dict:
    # a replayed run links to the run it replays: that is the raw data in the catalog
    replay_of = raw_start.get("replay_of")
    return {
        "plan_name": PLAN_NAME,
        "xrdml": {
            "raw_uid": replay_of or raw_start["uid"],
            "replay_uid": raw_start["uid"] if replay_of else None,
            "raw_scan_id": raw_start.get("scan_id"),
            "raw_plan_name": raw_start.get("replay_of_plan", raw_start.get("plan_name")),
            "analyses": list(analyses),
            "routes": dict(routes),
            "models": list(models),
            "config": dict(config),
            "version": version,
        },
    }


def phase_keys(value_names, motors) -> dict:
    """Keys of the ``phases`` stream: ``<phase>_<parameter>`` and its ``_std`` per value."""
    units = {"scale": "counts·deg", "size_nm": "nm", "fraction": None}
    keys = {"point": integer(), "detector": string(), **position_keys(motors)}
    for name in value_names:
        unit = next((u for p, u in units.items() if name.endswith(p)), "Å")
        keys[name] = number(unit)
        keys[f"{name}_std"] = number(unit)
    return keys

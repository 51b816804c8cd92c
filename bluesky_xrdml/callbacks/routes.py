"""What every analysis is handed: the run's geometry, the routes (a raw data key bound to
an analysis) and the items (one datum each), plus readers of what a descriptor declares
about a data key (its shape, a detector's configuration, a pattern's 2θ axis)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import layout


@dataclass
class Item:
    """One datum of a raw run: scan point (seq_num), the array, motor positions."""

    point: int
    value: object
    positions: dict


@dataclass
class Geometry:
    """How scan points map onto an image: 'map' (a grid, outer motor first), 'xrdct'
    (sinogram), 'scatter' (two or more motors, not a grid: ``list_scan``, ``rel_spiral``,
    fly scans; maps are per point with the measured positions) or 'points'."""

    kind: str
    shape: tuple = ()
    motors: tuple = ()
    snaking: tuple = ()  # per grid axis: True when it runs backwards on odd passes

    @classmethod
    def from_start(cls, start: dict, positions=None) -> Geometry:
        """From the plan's ``motors``, ``shape`` and ``snaking``. A plan that names no
        motors (a fly scan, a hand-written plan) takes ``positions`` (data keys of the
        positions its events carry, ``XRDMLCallback(positions=...)``), else the fields of
        its ``hints["dimensions"]`` in the primary stream (bluesky's convention for the
        independent axes; ``time`` is not a position)."""
        shape, motors = tuple(start.get("shape") or ()), tuple(start.get("motors") or ())
        if not motors:
            motors = tuple(positions or ()) or _dimension_fields(start)
            shape = shape if len(shape) == len(motors) else ()
        snaking = tuple(start.get("snaking") or ())
        if len(shape) == 2 and len(motors) == 2:
            kind = "xrdct" if start.get("xrdml_scan") == "xrdct" else "map"
            return cls(kind, shape, motors, snaking if kind == "map" else ())
        if len(motors) >= 2:
            return cls("scatter", shape, motors)
        return cls("points", shape, motors)


def _dimension_fields(start: dict) -> tuple:
    fields = []
    for dim in (start.get("hints") or {}).get("dimensions") or []:
        try:
            names, stream = dim
        except (TypeError, ValueError):
            continue
        if stream == "primary":
            fields += [f for f in names if f != "time"]
    return tuple(fields)


@dataclass(eq=False)
class Route:
    """A raw data key bound to an analysis, with what the analysis learned from the
    descriptor (``context``) and what it accumulates over the run (``acc``). A context
    with ``"auxiliary": True`` marks readings that only support another key's analysis
    (a cell's voltage, a sample's composition): not counted as analysed items."""

    key: str
    analysis: object
    first: bool  # the first key routed to this analysis in the run gets the plain stream names
    external: bool = False  # data arrive through stream_datum, not inside events
    context: dict = field(default_factory=dict)
    acc: dict = field(default_factory=dict)
    # "" inline; "FILESTORE" (events hold datum ids) or "STREAM" (stream_datum documents)
    reference: str = ""
    shape: tuple = ()  # the data key's declared shape (leading 1s dropped)
    upstream: object = None  # the integration route whose patterns feed this one
    geometry: Geometry | None = None  # of the run, known from its start document
    budget: object = None  # TimeBudget of the batch in hand (callbacks/budget.py)
    start: dict | None = None  # the raw run's start document (its metadata: sample, ...)

    def stream(self, base: str) -> str:
        return layout.stream_name(base, self.key, self.first)

    def keep(self, name: str, rows: list) -> None:
        """Keep per-item rows in ``acc[name]`` for the maps made at the stop, only when
        the run makes maps: a ``count`` that runs for days keeps nothing."""
        if self.geometry is None or self.geometry.kind != "points":
            self.acc.setdefault(name, []).extend(rows)


def array_shape(data_key: dict) -> tuple:
    shape = [int(s) for s in data_key.get("shape") or [] if s is not None]
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


def pattern_axis(data_key: dict, descriptor: dict, two_theta=None, wavelength=None):
    """``(two_theta, wavelength)`` of a 1D pattern key: the arguments where given, else the
    detector's configuration (``*two_theta``, ``*wavelength``; the wavelength may be None).
    None when the key is not a 1D pattern; a string saying why when its 2θ axis is unknown."""
    shape = array_shape(data_key)
    if len(shape) != 1 or shape[0] < 32:
        return None
    obj = data_key.get("object_name")
    tt = two_theta if two_theta is not None else config_value(descriptor, obj, "two_theta")
    if tt is None:
        return "1D array without a 2θ axis (no '*two_theta' configuration; pass two_theta=)"
    tt = np.asarray(tt, float)
    if tt.size != shape[0]:
        return f"2θ axis has {tt.size} points but the pattern has {shape[0]}"
    return tt, wavelength or config_value(descriptor, obj, "wavelength")


def config_value(descriptor: dict, object_name: str | None, suffix: str):
    """A configuration value of the detector whose name ends with ``suffix``."""
    config = descriptor.get("configuration") or {}
    objects = [object_name] if object_name in config else list(config)
    for obj in objects:
        for k, v in (config.get(obj) or {}).get("data", {}).items():
            if k.endswith(suffix):
                return v
    return None

"""Analyses the callback can route data keys to. They know numpy and the analysis run's
layout, nothing about queues, threads or documents.

An analysis says which data keys it can use (``match``), which streams it writes
(``streams``), turns a batch of items into result rows (``analyze``) and, at the end of
a run, assembles maps from what it saw (``finish``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .. import layout
from ..analysis import maps as gridmaps
from ..analysis.peaks import METHODS, PATCH, FrameError, centre_peaks, prepare
from ..analysis.roi import PatternError, Roi, check_patterns, integrate_rois, rois_from_phases
from ..analysis.tomography import reconstruct

logger = logging.getLogger(__name__)


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
    def from_start(cls, start: dict) -> Geometry:
        shape, motors = tuple(start.get("shape") or ()), tuple(start.get("motors") or ())
        snaking = tuple(start.get("snaking") or ())
        if len(shape) == 2 and len(motors) == 2:
            kind = "xrdct" if start.get("xrdml_scan") == "xrdct" else "map"
            return cls(kind, shape, motors, snaking if kind == "map" else ())
        if len(motors) >= 2:
            return cls("scatter", shape, motors)
        return cls("points", shape, motors)


@dataclass(eq=False)
class Route:
    """A raw data key bound to an analysis, with what the analysis learned from the
    descriptor (``context``) and what it accumulates over the run (``acc``)."""

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

    def stream(self, base: str) -> str:
        return layout.stream_name(base, self.key, self.first)

    def keep(self, name: str, rows: list) -> None:
        """Keep per-item rows in ``acc[name]`` for the maps made at the stop, only when
        the run makes maps: a ``count`` that runs for days keeps nothing."""
        if self.geometry is None or self.geometry.kind != "points":
            self.acc.setdefault(name, []).extend(rows)


def _array_shape(data_key: dict) -> tuple:
    shape = [int(s) for s in data_key.get("shape") or [] if s is not None]
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


def pattern_axis(data_key: dict, descriptor: dict, two_theta=None, wavelength=None):
    """``(two_theta, wavelength)`` of a 1D pattern key: the arguments where given, else the
    detector's configuration (``*two_theta``, ``*wavelength``; the wavelength may be None).
    None when the key is not a 1D pattern; a string saying why when its 2θ axis is unknown."""
    shape = _array_shape(data_key)
    if len(shape) != 1 or shape[0] < 32:
        return None
    obj = data_key.get("object_name")
    tt = two_theta if two_theta is not None else _config_value(descriptor, obj, "two_theta")
    if tt is None:
        return "1D array without a 2θ axis (no '*two_theta' configuration; pass two_theta=)"
    tt = np.asarray(tt, float)
    if tt.size != shape[0]:
        return f"2θ axis has {tt.size} points but the pattern has {shape[0]}"
    return tt, wavelength or _config_value(descriptor, obj, "wavelength")


def _config_value(descriptor: dict, object_name: str | None, suffix: str):
    """A configuration value of the detector whose name ends with ``suffix``."""
    config = descriptor.get("configuration") or {}
    objects = [object_name] if object_name in config else list(config)
    for obj in objects:
        for k, v in (config.get(obj) or {}).get("data", {}).items():
            if k.endswith(suffix):
                return v
    return None


class BraggPeaks:
    """2D frames -> a peak table: threshold, components, 11×11 patches, then centres.

    ``method="braggnn"`` (default): the BraggNN ensemble (shipped weights, or ``weights=``
    a path to your own), batched over all the frames the worker hands over at once; peaks
    sharing a patch are centred by a multi-peak fit and peaks the ensemble disagrees on by
    a single-peak fit. If the weights cannot be loaded, the classical centroid is used and
    the reason is logged and recorded in the config. ``method="centroid"`` or
    ``"pseudo-voigt"`` selects a classical estimator.

    A frame with more than ``max_peaks`` candidates (powder rings: a calibrant frame gives
    thousands) is recorded as an error instead of being centred for minutes: give such a
    detector a pyFAI calibration so that it is integrated instead.
    """

    name = "bragg-peaks"
    base_streams = (layout.PEAKS, layout.FRAMES)

    def __init__(self, method: str = "braggnn", k: float = 6.0, weights=None,
                 device: str = "auto", model=None, max_peaks: int = 2000):
        self.max_peaks = max_peaks
        if method not in METHODS:
            raise ValueError(f"unknown peak method {method!r}; available: {', '.join(METHODS)}")
        self.k, self.model, self.fallback = k, model, ""
        if method == "braggnn" and model is None:
            try:
                from ..models import load_model

                self.model = load_model("braggnn", path=weights, device=device)
            except Exception as err:  # missing torch / weights: peaks still get centred
                self.fallback = (f"BraggNN could not be loaded ({type(err).__name__}: {err}); "
                                 "using intensity-weighted centroids")
                logger.warning("xrdml: %s", self.fallback)
                method = "centroid"
        self.method = method

    @property
    def models(self) -> list:
        """Provenance (name, version, sha256) of the model in use, for the start document."""
        if self.method == "braggnn" and self.model is not None:
            return [self.model.provenance()]
        return []

    @property
    def config(self) -> dict:
        config = {"method": self.method, "threshold_sigma": self.k}
        if self.method == "braggnn":
            config["uncertain_std_px"] = self.model.uncertain_px
        if self.fallback:
            config["fallback"] = self.fallback
        return config

    def match(self, key: str, data_key: dict, descriptor: dict):
        shape = _array_shape(data_key)
        if len(shape) == 2 and min(shape) >= 1:
            # frames too small for a patch are routed too: each is recorded as an error
            # saying so, rather than the key being silently passed over
            return {"shape": shape, "dtype": data_key.get("dtype_numpy")}
        return None

    def streams(self, route: Route, motors) -> dict:
        return {route.stream(layout.PEAKS): layout.peak_keys(),
                route.stream(layout.FRAMES): layout.frame_keys(motors)}

    def analyze(self, route: Route, items: list[Item]):
        prepared, used, errors = [], [], []
        budget = route.budget  # checked between frames: a ring frame is cut, not centred
        for n, item in enumerate(items):
            if budget is not None and n and budget.exceeded():
                errors.extend((it.point, budget.batch_message(n)) for it in items[n:])
                break
            t0 = time.monotonic()
            try:
                frame = check_frame_input(item.value, route.context.get("shape"),
                                          route.context.get("dtype"))
                fp = prepare(frame, frame_index=item.point, k=self.k)
                if len(fp.rows) > self.max_peaks:
                    raise FrameError(
                        f"{len(fp.rows)} candidate peaks (more than max_peaks={self.max_peaks})"
                        ": powder rings rather than spots? Give the detector a pyFAI "
                        "calibration (XRDMLCallback(calibrations={key: 'file.poni'})) to "
                        "integrate it, or raise BraggPeaks(max_peaks=...)")
                took = time.monotonic() - t0
                if budget is not None and took > budget.per_frame:
                    raise FrameError(budget.frame_message(
                        "peak finding", took, "rings on an area detector? Give the key a pyFAI "
                        "calibration (XRDMLCallback(calibrations={key: 'file.poni'}))"))
                prepared.append(fp)
                used.append(item)
            except FrameError as err:
                errors.append((item.point, str(err)))
        # one network call for the patches of every frame in the batch
        tables = centre_peaks(prepared, method=self.method, model=self.model)
        peaks, frames = [], []
        for item, table in zip(used, tables):
            table["detector"] = route.key
            peaks.extend(table.to_dict("records"))
            frames.append({"frame": item.point, "n_peaks": len(table), "detector": route.key,
                           **item.positions})
        route.keep("frames", frames)
        return {route.stream(layout.PEAKS): peaks, route.stream(layout.FRAMES): frames}, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        frames = route.acc.get("frames", [])
        if geometry.kind not in ("map", "scatter") or not frames:
            return {}
        rows = [{**f, "point": f["frame"]} for f in frames]
        points, values = _assemble(rows, ["n_peaks"], geometry, std=False)
        return {route.stream(layout.MAPS): _grid_event(values, rows, points, geometry)}


def check_frame_input(value, shape=None, dtype=None) -> np.ndarray:
    """A frame as the descriptor declared it, or a ``FrameError`` that says what is wrong
    and what to do: not numbers, not 2D, another shape than declared, smaller than a
    patch, NaN, float where integer counts were declared, constant (all zero: shutter
    closed?), mostly negative (background-subtracted?). A few negative pixels are the
    detector's mask (Pilatus module gaps are -1 or -2) and count as 0."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "uif":
        raise FrameError(f"frame of dtype {arr.dtype} is not numbers; the detector should "
                         f"send counts ({dtype or 'integers'})")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise FrameError(f"expected a 2D frame, got shape {arr.shape}")
    if shape and len(shape) == 2 and arr.shape != tuple(shape):
        raise FrameError(f"frame of shape {arr.shape} where the descriptor declares "
                         f"{tuple(shape)}: did the detector's ROI or binning change mid-scan? "
                         "Start a new run after changing it")
    if min(arr.shape) < PATCH:
        raise FrameError(f"frame of shape {arr.shape} is smaller than the {PATCH}×{PATCH} patch "
                         "a peak is centred in; bin less or read a larger detector region")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise FrameError(f"frame has {bad} NaN/inf pixels; mask them first")
    if arr.dtype.kind == "f" and dtype and np.dtype(dtype).kind in "ui":
        raise FrameError(f"frame of dtype {arr.dtype} where the descriptor declares integer "
                         f"counts ({dtype}): pass the detector's raw counts")
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise FrameError(f"frame is constant (every pixel = {lo:g}): shutter closed, detector "
                         "not triggered or saturated? Nothing to analyse")
    negative = arr < 0
    if negative.any():
        share = float(negative.mean())
        if share > 0.5:
            raise FrameError(f"{100 * share:.0f} % of the pixels are negative (min {lo:g}): "
                             "pass raw counts, not background-subtracted frames")
        arr = np.where(negative, 0, arr)
    return arr


class RoiIntensities:
    """1D powder patterns -> net intensity in one 2θ window per phase reflection.

    ROIs are given (``rois=[Roi(...)]``) or derived from ``phases`` (name -> pymatgen
    Structure; the demo phases by default) at the wavelength the detector reports.
    """

    name = "roi"
    base_streams = (layout.PATTERNS,)

    def __init__(self, rois: list[Roi] | None = None, phases: dict | None = None,
                 two_theta=None, wavelength: float | None = None):
        self.rois, self.phases = rois, phases
        self.two_theta, self.wavelength = two_theta, wavelength
        self._derived: dict[float, list[Roi]] = {}

    @property
    def config(self) -> dict:
        if self.rois:
            return {"rois": [[r.name, r.lo, r.hi] for r in self.rois]}
        return {"phases": sorted(self.phases) if self.phases else "demo"}

    def _rois_for(self, two_theta: np.ndarray, wavelength: float) -> list[Roi]:
        if self.rois:
            return self.rois
        cache_key = (round(float(wavelength), 6), float(two_theta[0]), float(two_theta[-1]))
        if cache_key not in self._derived:
            from ..simulation.powder import peak_list
            from ..simulation.structures import demo_structures

            phases = self.phases or demo_structures()
            lists = {}
            for name, s in phases.items():
                pk = peak_list(s, wavelength, min(180.0, float(two_theta[-1]) + 2), name=name)
                lists[name] = (pk.two_theta(wavelength), pk.intensity, pk.hkl)
            self._derived[cache_key] = rois_from_phases(lists, two_theta)
        return self._derived[cache_key]

    def match(self, key: str, data_key: dict, descriptor: dict):
        axis = pattern_axis(data_key, descriptor, self.two_theta, self.wavelength)
        if not isinstance(axis, tuple):
            return axis
        tt, wl = axis
        if not self.rois and wl is None:
            return "no wavelength in the configuration; pass wavelength= or rois="
        rois = self._rois_for(tt, float(wl) if wl is not None else 0.0)
        if not rois:
            return "no ROI falls inside the 2θ range"
        return {"two_theta": tt, "rois": rois, "wavelength": wl}

    def streams(self, route: Route, motors) -> dict:
        names = [r.name for r in route.context["rois"]]
        return {route.stream(layout.PATTERNS): layout.pattern_keys(names, motors)}

    def analyze(self, route: Route, items: list[Item]):
        tt, rois = route.context["two_theta"], route.context["rois"]
        good, errors = [], []
        for item in items:  # check each so one bad pattern does not sink the batch
            try:
                good.append((item, check_patterns(item.value, tt.size, reject_constant=True)[0]))
            except PatternError as err:
                errors.append((item.point, str(err)))
        rows = []
        if good:
            values, std = integrate_rois(np.stack([g[1] for g in good]), tt, rois)
            for (item, _), v, s in zip(good, values, std):
                row = {"point": item.point, "detector": route.key, **item.positions}
                for roi, vi, si in zip(rois, v, s):
                    row[roi.name], row[f"{roi.name}_std"] = float(vi), float(si)
                rows.append(row)
        route.keep("rows", rows)
        return {route.stream(layout.PATTERNS): rows}, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        rows = route.acc.get("rows", [])
        if geometry.kind == "points" or not rows:
            return {}
        names = [r.name for r in route.context["rois"]]
        points, grids = _assemble(rows, names, geometry)
        if geometry.kind in ("map", "scatter"):
            return {route.stream(layout.MAPS): _grid_event(grids, rows, points, geometry)}
        # XRD-CT: (rotation, translation) sinograms -> FBP per ROI
        rot, trans = geometry.motors
        sino = _grid_event({n: grids[n] for n in names}, rows, points, geometry)
        angles, t = sino[1][rot], sino[1][trans]
        images = {}
        for name in names:
            s = np.nan_to_num(grids[name], nan=0.0)
            images[name] = reconstruct(s, angles) / max(abs(t[1] - t[0]), 1e-12)
        step = t[1] - t[0] if len(t) > 1 else 0.0
        return {route.stream(layout.MAPS): _voxel_event(images, step),
                route.stream(layout.SINOGRAMS): sino}


def _assemble(rows: list, names, geometry: Geometry, std: bool = True):
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


def _voxel_event(images: dict, step: float):
    """(data keys, data) of one XRD-CT map event: (row, col) images plus voxel coordinates
    in mm, centred on the rotation axis, ``step`` apart (the translation step)."""
    n = next(iter(images.values())).shape[0]
    coord = (np.arange(n) - n // 2) * step
    keys = {k: layout.array(v.shape, ("row", "col")) for k, v in images.items()}
    keys["row"] = layout.array((n,), ("row",), units="mm")
    keys["col"] = layout.array((n,), ("col",), units="mm")
    return keys, {**images, "row": coord, "col": coord}


def _grid_event(values: dict, rows: list, points: list, geometry: Geometry):
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


def default_analyses(rois=None, phases=None, models: dict | None = None) -> list:
    """Every analysis available: Bragg peaks on frames; ROI intensities and PQ-Net phase
    quantification on patterns (PQ-Net where the pattern's 2θ grid and wavelength are the
    model's).

    ``models`` maps a model name to your own weights file, e.g.
    ``{"braggnn": "my-braggnn.safetensors"}``; shipped weights otherwise.
    """
    from .phases import PhaseQuantification

    models = dict(models or {})
    if "pqnet" in models:  # a model trained with `xrdml train pqnet` says "pqnet"
        models["pqnet-demo"] = models.pop("pqnet")
    unknown = set(models) - {"braggnn", "pqnet-demo"}
    if unknown:
        raise ValueError(f"no analysis uses model(s) {sorted(unknown)}; "
                         "known: braggnn, pqnet (or pqnet-demo)")
    return [BraggPeaks(weights=models.get("braggnn")),
            RoiIntensities(rois=rois, phases=phases),
            PhaseQuantification(weights=models.get("pqnet-demo"))]


def _pqnet(**kwargs):
    from .phases import PhaseQuantification

    return PhaseQuantification(**kwargs)


# analysis name -> factory: what ``XRDMLCallback(analyses=["roi", ...])`` can name
ANALYSES: dict = {"bragg-peaks": BraggPeaks, "roi": RoiIntensities, "pqnet": _pqnet}


def register_analysis(name: str, factory) -> None:
    """Let ``XRDMLCallback(analyses=[name])`` build an analysis with ``factory()``."""
    ANALYSES[name] = factory


def resolve_analyses(analyses) -> list:
    """Analysis objects from objects or names (``["bragg-peaks", "roi"]``); a name nobody
    registered, or an object that is not an analysis, is refused with the valid names."""
    if isinstance(analyses, str | bytes):
        analyses = [analyses]
    out = []
    for a in analyses:
        if isinstance(a, str):
            if a not in ANALYSES:
                raise ValueError(f"unknown analysis {a!r}; available: {', '.join(ANALYSES)} "
                                 "(or pass analysis objects, e.g. RoiIntensities(rois=...))")
            a = ANALYSES[a]()
        missing = [m for m in ("match", "streams", "analyze", "finish") if not hasattr(a, m)]
        if missing or not hasattr(a, "name"):
            raise TypeError(f"{a!r} is not an analysis (it lacks {missing or ['name']}); "
                            f"pass analysis objects or names: {', '.join(ANALYSES)}")
        out.append(a)
    return out

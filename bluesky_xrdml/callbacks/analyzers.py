"""Analyses the callback can route data keys to. They know numpy and the analysis run's
layout, nothing about queues, threads or documents.

An analysis says which data keys it can use (``match``), which streams it writes
(``streams``), turns a batch of items into result rows (``analyze``) and, at the end of
a run, assembles maps from what it saw (``finish``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .. import layout
from ..analysis import maps as gridmaps
from ..analysis.peaks import METHODS, FrameError, centre_peaks, prepare
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
    """How scan points map onto an image: 'map' (grid), 'xrdct' (sinogram) or 'points'."""

    kind: str
    shape: tuple = ()
    motors: tuple = ()

    @classmethod
    def from_start(cls, start: dict) -> Geometry:
        shape, motors = tuple(start.get("shape") or ()), tuple(start.get("motors") or ())
        if len(shape) == 2 and len(motors) == 2:
            kind = "xrdct" if start.get("xrdml_scan") == "xrdct" else "map"
            return cls(kind, shape, motors)
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

    def stream(self, base: str) -> str:
        return layout.stream_name(base, self.key, self.first)


def _array_shape(data_key: dict) -> tuple:
    shape = [int(s) for s in data_key.get("shape") or [] if s is not None]
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


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
    """

    name = "bragg-peaks"
    base_streams = (layout.PEAKS, layout.FRAMES)

    def __init__(self, method: str = "braggnn", k: float = 6.0, weights=None,
                 device: str = "auto", model=None):
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
        if len(shape) == 2 and min(shape) >= 11:
            return {"shape": shape}
        return None

    def streams(self, route: Route, motors) -> dict:
        return {route.stream(layout.PEAKS): layout.peak_keys(),
                route.stream(layout.FRAMES): layout.frame_keys(motors)}

    def analyze(self, route: Route, items: list[Item]):
        prepared, used, errors = [], [], []
        for item in items:
            try:
                prepared.append(prepare(item.value, frame_index=item.point, k=self.k))
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
        route.acc.setdefault("frames", []).extend(frames)
        return {route.stream(layout.PEAKS): peaks, route.stream(layout.FRAMES): frames}, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        frames = route.acc.get("frames", [])
        if geometry.kind != "map" or not frames:
            return {}
        points = [f["frame"] for f in frames]
        values = {"n_peaks": gridmaps.assemble(points, [f["n_peaks"] for f in frames],
                                               geometry.shape)}
        return {route.stream(layout.MAPS): _grid_event(values, frames, points, geometry)}


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
        shape = _array_shape(data_key)
        if len(shape) != 1 or shape[0] < 32:
            return None
        obj = data_key.get("object_name")
        tt = self.two_theta
        if tt is None:
            tt = _config_value(descriptor, obj, "two_theta")
        if tt is None:
            return "1D array without a 2θ axis (no '*two_theta' configuration; pass two_theta=)"
        tt = np.asarray(tt, float)
        if tt.size != shape[0]:
            return f"2θ axis has {tt.size} points but the pattern has {shape[0]}"
        wl = self.wavelength or _config_value(descriptor, obj, "wavelength")
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
                good.append((item, check_patterns(item.value, tt.size)[0]))
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
        route.acc.setdefault("rows", []).extend(rows)
        return {route.stream(layout.PATTERNS): rows}, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        rows = route.acc.get("rows", [])
        if geometry.kind == "points" or not rows:
            return {}
        names = [r.name for r in route.context["rois"]]
        points, grids = _assemble(rows, names, geometry)
        if geometry.kind == "map":
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


def _assemble(rows: list, names, geometry: Geometry):
    """``(points, grids)``: each value ``name`` and its ``name_std`` of the per-item rows
    placed on the scan grid."""
    points = [r["point"] for r in rows]
    grids = {n: gridmaps.assemble(points, [r[n] for r in rows], geometry.shape)
             for name in names for n in (name, f"{name}_std")}
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
    """(data keys, data) of one map event: 2D arrays with motor dims plus motor coordinates."""
    dims = tuple(geometry.motors)
    keys = {n: layout.array(v.shape, dims) for n, v in values.items()}
    data = dict(values)
    for axis, motor in enumerate(dims):
        pos = [r.get(motor, np.nan) for r in rows]
        data[motor] = gridmaps.axis_coordinate(points, pos, geometry.shape, axis)
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
    unknown = set(models) - {"braggnn", "pqnet-demo"}
    if unknown:
        raise ValueError(f"no analysis uses model(s) {sorted(unknown)}; "
                         "known: braggnn, pqnet-demo")
    return [BraggPeaks(weights=models.get("braggnn")),
            RoiIntensities(rois=rois, phases=phases),
            PhaseQuantification(weights=models.get("pqnet-demo"))]

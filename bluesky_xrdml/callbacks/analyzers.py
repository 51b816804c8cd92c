"""Analyses the callback can route data keys to. They know numpy and the analysis run's
layout, nothing about queues, threads or documents.

An analysis says which data keys it can use (``match``), which streams it writes
(``streams``), turns a batch of items into result rows (``analyze``) and, at the end of
a run, assembles maps from what it saw (``finish``).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .. import layout
from ..analysis.peaks import METHODS, PATCH, FrameError, centre_peaks, prepare
from ..analysis.roi import PatternError, Roi, check_patterns, integrate_rois, rois_from_phases
from ..analysis.tomography import reconstruct_images
from .map_events import assemble_rows, grid_event, voxel_event
from .routes import Geometry, Item, Route, array_shape, pattern_axis

logger = logging.getLogger(__name__)


class BraggPeaks:
    """2D frames -> a peak table: threshold, components, 11×11 patches, then centres.

    ``method="braggnn"`` (default): BraggNN (the shipped one network, or ``weights=``
    a path to your own), batched over all the frames the worker hands over at once. It
    centres neighbours and doublets itself (it was trained on them); peaks whose predicted
    σ exceeds the model's ``uncertain_px`` are flagged ``uncertain`` in the peak table
    (``analysis.peaks.centre_peaks`` re-fits them, and multi-peak patches, only when asked).
    If the weights cannot be loaded, the classical centroid is used and the reason is
    logged and recorded in the config. ``method="centroid"`` or ``"pseudo-voigt"`` selects
    a classical estimator (``"pseudo-voigt"`` fits multi-peak patches jointly).

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
        shape = array_shape(data_key)
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
        points, values = assemble_rows(rows, ["n_peaks"], geometry, std=False)
        return {route.stream(layout.MAPS): grid_event(values, rows, points, geometry)}


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
        points, grids = assemble_rows(rows, names, geometry)
        if geometry.kind in ("map", "scatter"):
            return {route.stream(layout.MAPS): grid_event(grids, rows, points, geometry)}
        # XRD-CT: (rotation, translation) sinograms -> FBP per ROI
        rot, trans = geometry.motors
        sino = grid_event({n: grids[n] for n in names}, rows, points, geometry)
        angles, t = sino[1][rot], sino[1][trans]
        images = reconstruct_images({n: grids[n] for n in names}, angles, t)
        step = t[1] - t[0] if len(t) > 1 else 0.0
        return {route.stream(layout.MAPS): voxel_event(images, step),
                route.stream(layout.SINOGRAMS): sino}

"""Phase quantification of 1D powder patterns with PQ-Net (or a full-profile fit).

Plugs into ``XRDMLCallback`` like ``RoiIntensities``: ``match`` / ``streams`` /
``analyze`` / ``finish``. Per pattern, for every phase of the model: scale, fraction,
crystallite size, free lattice parameter(s), each with its ensemble standard deviation.

- every pattern is quantified as it arrives (stream ``phases``); a map run gets maps per
  phase × parameter (+ ``_std``) in ``maps`` at the stop.
- ``xrdct`` runs: the patterns are line integrals (the ``phases`` rows are then a live
  preview of the sinogram), so they are also kept until the stop document; then every 2θ
  channel of the sinogram is reconstructed by filtered back-projection
  (``analysis.tomography.reconstruct``) and every voxel inside the sample is quantified.
  Maps per phase × parameter (+ ``_std``) on the voxel grid (``row``, ``col`` in mm) go
  to ``maps``.

FBP is linear, so the channels are reconstructed on a rank-``rank`` basis of the sinogram
stack (a randomised SVD): ``rank`` back-projections instead of one per channel, and the
noise outside the leading components is dropped. ``rank=None`` back-projects every
channel on its own (exact; ~8 ms per channel for a 100 × 100 image).
"""

from __future__ import annotations

import logging

import numpy as np

from .. import layout
from ..analysis import maps as gridmaps
from ..analysis.roi import PatternError, check_patterns
from ..analysis.tomography import quantify_voxels
from .map_events import assemble_rows, grid_event, voxel_event
from .routes import Geometry, Item, Route, array_shape, config_value

logger = logging.getLogger(__name__)

PHASES = "phases"  # the per-pattern stream
FLAGS = "flags"  # one row per pattern the model explains poorly
RESIDUALS = "residuals"  # per pattern: measured − implied pattern on the model's grid


class PhaseQuantification:
    """1D powder patterns → per-phase scale, fraction, size, lattice parameter(s) ± std.

    ``model``: an object with ``.phases``, ``.two_theta``, ``.wavelength``,
    ``.predict(counts) -> xarray.Dataset`` (``PQNetPredictor``, ``ProfileFit``); by default
    ``models.pqnet.load(weights)`` — the shipped ``pqnet-demo`` ensemble, or ``weights=`` a
    path to your own. Patterns whose 2θ axis or wavelength differ from the model's are not
    routed here (the reason is listed in the run summary). ``rank``: see the module doc;
    ``min_intensity``: XRD-CT voxels whose diffracted signal (Σ scale) is below this share
    of the brightest voxels' hold no phase (background, air): NaN in the maps.

    A pattern on another 2θ grid that covers the model's (e.g. integrated by pyFAI) is
    resampled onto the model's grid, when the model can (``model.resample``).
    ``explain``: for a model with ``explain`` (PQ-Net), every ``phases`` row also gets
    ``rwp`` and ``unexplained`` (share of the intensity above background the phases do not
    explain), the ``residuals`` stream the residual (measured − the pattern the prediction
    implies, on the model's grid) per pattern, and a pattern with ``unexplained`` above
    ``poor_fit`` (default the model's ``POOR_FIT``) a row in the ``flags`` stream, which
    does not fail the run.

    ``refine=True``: every pattern's network estimate is refined by a full-profile fit of
    the phases judged present (``model.refine``, PQ-Net's ``analysis.refine``): lattice
    parameters to ~0.001 Å and sizes to ~10 % instead of the network's ~0.007 Å and
    ~25 %, at ~0.1-0.5 s a pattern on one core instead of ~1 ms. Maps and rows carry the
    refined values; XRD-CT voxels keep the network's (thousands of voxels).
    """

    name = "pqnet"
    base_streams = (PHASES, RESIDUALS, FLAGS)

    def __init__(self, weights=None, device: str = "auto", model=None, rank: int | None = 64,
                 min_intensity: float = 0.05, tolerance_deg: float = 1e-4, explain: bool = True,
                 poor_fit: float | None = None, refine: bool = False):
        self.model, self.error = model, ""
        self.refine = bool(refine)
        self.rank, self.min_intensity, self.tolerance = rank, min_intensity, tolerance_deg
        self.explain, self.poor_fit = explain, poor_fit
        if model is None:
            try:
                from ..models import pqnet, select_device

                self.model = pqnet.load(weights, device=select_device(device))
            except Exception as err:  # missing torch / weights: nothing routed here
                self.error = (f"PQ-Net could not be loaded ({type(err).__name__}: {err})")
                logger.warning("xrdml: %s", self.error)

    @property
    def models(self) -> list:
        """Provenance (name, version, sha256) of the model in use, for the start document."""
        from ..models.weights import provenance_of

        return provenance_of(self.model)

    @property
    def config(self) -> dict:
        if self.model is None:
            return {"error": self.error}
        return {"phases": list(self.model.phases), "parameters": self.parameters,
                "rank": self.rank, "min_intensity": self.min_intensity,
                "explain": self._explains, "poor_fit": self._threshold,
                "refine": self._refines}

    @property
    def _refines(self) -> bool:
        return bool(self.refine and self.model is not None and hasattr(self.model, "refine"))

    @property
    def _explains(self) -> bool:
        return bool(self.explain and self.model is not None and hasattr(self.model, "explain"))

    @property
    def _threshold(self) -> float | None:
        if not self._explains:
            return None
        return float(self.poor_fit if self.poor_fit is not None
                     else getattr(self.model, "POOR_FIT", 0.2))

    @property
    def parameters(self) -> list[str]:
        params = getattr(self.model, "parameters", None)
        return list(params) if params else ["scale", "fraction", "size_nm", "lattice_a"]

    def value_names(self) -> list[str]:
        """``<phase>_<parameter>`` for every phase and the parameters it has."""
        free = getattr(self.model, "free", {}) or {}
        names = []
        for phase in self.model.phases:
            for p in self.parameters:
                if p.startswith("lattice_") and phase in free and p[8:] not in free[phase]:
                    continue
                names.append(f"{phase}_{p}")
        return names

    def match(self, key: str, data_key: dict, descriptor: dict):
        shape = array_shape(data_key)
        if len(shape) != 1 or shape[0] < 32:
            return None
        if self.model is None:
            return self.error
        obj = data_key.get("object_name")
        tt = config_value(descriptor, obj, "two_theta")
        if tt is None:
            return "1D array without a 2θ axis (no '*two_theta' configuration)"
        tt = np.asarray(tt, float)
        model_tt = np.asarray(self.model.two_theta, float)
        same = (tt.size == model_tt.size and shape[0] == model_tt.size
                and np.allclose(tt, model_tt, atol=self.tolerance, rtol=0))
        resample = False
        if not same:
            step = model_tt[1] - model_tt[0]
            ratio = getattr(self.model, "MAX_STEP_RATIO", 1.0)
            covers = (tt.size == shape[0] and tt[0] <= model_tt[0] + step / 2
                      and tt[-1] >= model_tt[-1] - step / 2
                      and np.median(np.diff(tt)) <= ratio * step)
            if not (covers and hasattr(self.model, "resample")):
                return (f"2θ axis {tt[0]:.4g}-{tt[-1]:.4g}° in {shape[0]} points does not cover "
                        f"the model's {model_tt[0]:.4g}-{model_tt[-1]:.4g}° ({model_tt.size} "
                        "points) at least as finely; train a model for this detector "
                        "(xrdml train pqnet)")
            resample = True
        wl = config_value(descriptor, obj, "wavelength")
        if wl is None:
            return "no wavelength in the configuration"
        if abs(float(wl) - float(self.model.wavelength)) > 1e-4:
            return f"wavelength {float(wl)} Å differs from the model's {self.model.wavelength} Å"
        return {"two_theta": tt, "wavelength": float(wl), "resample": resample}

    def streams(self, route: Route, motors) -> dict:
        keys = layout.phase_keys(self.value_names(), motors)
        for name in self.value_names():
            if name.endswith("_presence"):  # a probability, not Å
                for k in (name, f"{name}_std"):
                    keys[k].pop("units", None)
        out = {route.stream(PHASES): keys}
        if self._explains:
            keys["rwp"] = layout.number()
            keys["unexplained"] = layout.number()
            out[route.stream(RESIDUALS)] = {
                "point": layout.integer(), "detector": layout.string(),
                "residual": layout.array((self.model.two_theta.size,), ["two_theta"], "counts"),
                "rwp": layout.number(), "unexplained": layout.number()}
            out[route.stream(FLAGS)] = {"point": layout.integer(), "detector": layout.string(),
                                        "flag": layout.string(), "unexplained": layout.number(),
                                        "rwp": layout.number()}
        return out

    def _rows(self, ds, items, route) -> list[dict]:
        names = set(self.value_names())
        rows = []
        for i, item in enumerate(items):
            row = {"point": item.point, "detector": route.key, **item.positions}
            for p in self.parameters:
                for j, phase in enumerate(self.model.phases):
                    key = f"{phase}_{p}"
                    if key in names:
                        row[key] = float(ds[p].values[i, j])
                        row[f"{key}_std"] = float(ds[f"{p}_std"].values[i, j])
            rows.append(row)
        return rows

    def analyze(self, route: Route, items: list[Item]):
        tt = route.context.get("two_theta", self.model.two_theta)
        n = np.size(tt)
        good, errors = [], []
        for item in items:  # check each so one bad pattern does not sink the batch
            try:
                y = check_patterns(item.value, n, reject_constant=True)
                if route.context.get("resample"):
                    y = self.model.resample(y, tt)
                good.append((item, y[0]))
            except PatternError as err:
                errors.append((item.point, str(err)))
        # kept for XRD-CT only, where they are reconstructed at the stop; freed after
        # ``finish`` (a route made without a run, as in tests, keeps them to be safe)
        if route.geometry is None or route.geometry.kind == "xrdct":
            store = route.acc.setdefault("patterns", {})
            for item, y in good:
                store[item.point] = (y.astype(np.float32), item.positions)
        rows, residuals, flags = [], [], []
        if good:
            y = np.stack([g[1] for g in good])
            ds = self.model.predict(y)
            if self._refines:
                ds = self.model.refine(y, ds)
            rows = self._rows(ds, [g[0] for g in good], route)
            if self._explains:
                residuals, flags = self._explain(y, ds, rows, route)
        route.keep("rows", rows)
        out = {route.stream(PHASES): rows}
        if residuals:
            out[route.stream(RESIDUALS)] = residuals
        if flags:
            out[route.stream(FLAGS)] = flags
        return out, errors

    def _explain(self, y, ds, rows, route):
        """Rwp and unexplained share into ``rows``; residual rows; flag rows for poor fits."""
        try:
            ex = self.model.explain(y, ds)
        except Exception as err:  # explaining is a bonus: never lose the quantification
            logger.warning("xrdml: PQ-Net could not explain the patterns: %s", err)
            for row in rows:
                row.update(rwp=np.nan, unexplained=np.nan)
            return [], []
        flags, residuals = [], []
        for i, row in enumerate(rows):
            row.update(rwp=float(ex["rwp"][i]), unexplained=float(ex["unexplained"][i]))
            residuals.append({"point": row["point"], "detector": route.key,
                              "residual": ex["residual"][i].astype(float),
                              "rwp": row["rwp"], "unexplained": row["unexplained"]})
            if ex["unexplained"][i] > self._threshold:
                flags.append({"point": row["point"], "detector": route.key,
                              "flag": (f"poorly explained: {ex['unexplained'][i]:.0%} of the "
                                       "intensity above the background is not explained by "
                                       f"the model's phases (Rwp {ex['rwp'][i]:.3f}): a phase "
                                       "outside the model, or another instrument?"),
                              "unexplained": float(ex["unexplained"][i]),
                              "rwp": float(ex["rwp"][i])})
        if flags:
            logger.info("xrdml: %d of %d patterns poorly explained by %s", len(flags),
                        len(rows), getattr(self.model, "name", "the model"))
        return residuals, flags

    def finish(self, route: Route, geometry: Geometry) -> dict:
        if geometry.kind == "xrdct":
            try:
                return self._finish_xrdct(route, geometry)
            finally:
                route.acc.pop("patterns", None)
        route.acc.pop("patterns", None)
        rows = route.acc.get("rows", [])
        if geometry.kind == "points" or not rows:
            return {}
        points, grids = assemble_rows(rows, self.value_names(), geometry)
        return {route.stream(layout.MAPS): grid_event(grids, rows, points, geometry)}

    def quantify_sinogram(self, sinograms: np.ndarray, angles, step: float):
        """(n_angles, n_translations, C) counts → (images dict name -> (n, n), n): the
        voxels quantified by ``analysis.tomography.quantify_voxels``, NaN outside the
        sample."""
        ds, inside, n = quantify_voxels(self.model.predict, sinograms, angles, step,
                                        self.rank, self.min_intensity)
        images = {}
        for name in self.value_names():
            for suffix in ("", "_std"):
                images[name + suffix] = np.full(n * n, np.nan)
        for p in self.parameters:
            for j, phase in enumerate(self.model.phases):
                key = f"{phase}_{p}"
                if key in images:
                    images[key][inside] = ds[p].values[:, j]
                    images[key + "_std"][inside] = ds[f"{p}_std"].values[:, j]
        return {k: v.reshape(n, n) for k, v in images.items()}, n

    def _finish_xrdct(self, route: Route, geometry: Geometry) -> dict:
        store = route.acc.get("patterns", {})
        if not store:
            return {}
        rot, trans = geometry.motors
        n_a, n_t = geometry.shape
        c = self.model.two_theta.size
        sino = np.zeros((n_a * n_t, c), np.float32)
        pos = {rot: np.full(n_a * n_t, np.nan), trans: np.full(n_a * n_t, np.nan)}
        for point, (y, positions) in store.items():
            i = point - 1
            if 0 <= i < n_a * n_t:
                sino[i] = y
                for m in (rot, trans):
                    pos[m][i] = positions.get(m, np.nan)
        points = np.arange(1, n_a * n_t + 1)
        angles = gridmaps.axis_coordinate(points, pos[rot], geometry.shape, 0)
        t = gridmaps.axis_coordinate(points, pos[trans], geometry.shape, 1)
        step = t[1] - t[0] if len(t) > 1 else 1.0
        images, _ = self.quantify_sinogram(sino.reshape(n_a, n_t, c), angles, step)
        return {route.stream(layout.MAPS): voxel_event(images, step if len(t) > 1 else 0.0)}


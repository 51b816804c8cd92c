"""2D powder frames -> 1D patterns (pyFAI), which then feed ROI, PQ-Net and every other
analysis of 1D patterns exactly as a 1D detector's would.

Which path a 2D data key takes is explicit: a key with a calibration —
``XRDMLCallback(calibrations={"<data key>": "<file.poni>" or a pyFAI integrator})``, or a
``*poni`` entry in its detector's configuration (a PONI path, or the PONI as a dict /
JSON string) — is integrated; any other 2D key goes to the Bragg-peak analysis.

The patterns are kept in the analysis run as the stream ``integrated`` (``intensity``
and ``sigma`` per point; the 2θ axis and the wavelength are the stream descriptor's
configuration, object ``integration``).
"""

from __future__ import annotations

import json

import numpy as np

from .. import layout
from ..analysis.integrate import METHOD, PowderIntegrator
from ..analysis.peaks import FrameError
from .routes import Item, Route, array_shape, config_value

INTEGRATED = "integrated"

# integrators with their look-up tables, shared by every callback of the process: building
# one costs seconds (a 2048² frame), using it tens of milliseconds
_CACHE: dict = {}
_CACHE_SIZE = 8


class PowderIntegration:
    """Azimuthal integration of calibrated 2D frames (see the module doc).

    ``npt`` and ``radial_range`` (degrees) set the 2θ grid: give the grid a model was
    trained on (``pqnet-demo``: 2048 points, 1-11°) for PQ-Net to take the patterns.
    ``masks``: data key -> boolean mask (True = leave out), added to the detector's.
    ``method``: pyFAI's (splitting, algorithm, implementation); the default splits pixels
    over the bins they cover ("bbox", ~20 ms of one core for a 2048² frame),
    ``("no", "csr", "cython")`` is about twice as fast (CeO2 peaks within 0.003° of
    Dioptas' instead of 0.0001°); a CSR method on the CPU applies pyFAI's table in
    ``analysis.integrate``, any other (``"opencl"``) is pyFAI's own ``integrate1d``.
    """

    name = "integrate"
    base_streams = (INTEGRATED,)

    def __init__(self, calibrations: dict | None = None, npt: int = 2048, radial_range=None,
                 masks: dict | None = None, polarization: float | None = None,
                 method=METHOD):
        self.calibrations = dict(calibrations or {})
        self.npt, self.radial_range = npt, radial_range
        self.masks, self.polarization = dict(masks or {}), polarization
        self.method = tuple(method)

    @property
    def config(self) -> dict:
        return {"npt": self.npt, "radial_range": self.radial_range, "method": list(self.method),
                "calibrations": {k: (v if isinstance(v, str | dict) else type(v).__name__)
                                 for k, v in self.calibrations.items()}}

    def calibration_for(self, key: str, data_key: dict, descriptor: dict):
        if key in self.calibrations:
            return self.calibrations[key]
        poni = config_value(descriptor, data_key.get("object_name"), "poni")
        if isinstance(poni, str) and poni.strip().startswith("{"):
            poni = json.loads(poni)
        return poni or None

    def integrator(self, key: str, calibration, shape) -> PowderIntegrator:
        if isinstance(calibration, str):
            cal_id = calibration
        elif isinstance(calibration, dict):
            cal_id = json.dumps(calibration, sort_keys=True, default=str)
        else:
            cal_id = id(calibration)
        mask = self.masks.get(key)
        ident = (cal_id, tuple(shape), self.npt, tuple(self.radial_range or ()),
                 None if mask is None else id(mask), self.polarization, self.method)
        if ident not in _CACHE:
            integ = PowderIntegrator(calibration, npt=self.npt, radial_range=self.radial_range,
                                     mask=mask, polarization=self.polarization,
                                     method=self.method)
            # the 2θ grid and the CSR table, built once from a blank frame of the key's shape
            integ.grid = integ.integrate(np.ones(shape, np.float32)).two_theta
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[ident] = integ
        return _CACHE[ident]

    def match(self, key: str, data_key: dict, descriptor: dict):
        shape = array_shape(data_key)
        if len(shape) != 2:
            return None
        calibration = self.calibration_for(key, data_key, descriptor)
        if calibration is None:
            return None
        try:
            integ = self.integrator(key, calibration, shape)
        except Exception as err:  # a bad PONI: said once, in the run summary
            return f"calibration unusable ({type(err).__name__}: {err})"
        return {"integrator": integ, "two_theta": integ.grid, "wavelength": integ.wavelength,
                "shape": shape}

    def pattern_descriptor(self, route: Route, descriptor: dict) -> tuple[dict, dict]:
        """The data key and descriptor a 1D detector giving these patterns would have:
        what the analyses of 1D patterns match against."""
        obj = f"{route.key}_integrated"
        tt = route.context["two_theta"]
        data_key = {"source": "xrdml:integration", "dtype": "array", "shape": [tt.size],
                    "dtype_numpy": "<f8", "object_name": obj}
        config = {obj: {"data": {f"{obj}_two_theta": tt,
                                 f"{obj}_wavelength": route.context["wavelength"]}}}
        return data_key, {**descriptor, "data_keys": {route.key: data_key},
                          "configuration": config}

    def streams(self, route: Route, motors) -> dict:
        n = route.context["two_theta"].size
        keys = {"point": layout.integer(), "detector": layout.string(),
                **layout.position_keys(motors),
                "intensity": layout.array((n,), ("two_theta",), units="counts"),
                "sigma": layout.array((n,), ("two_theta",), units="counts")}
        return {route.stream(INTEGRATED): keys}

    def configuration(self, route: Route) -> dict:
        """The 2θ axis and wavelength, for the ``integrated`` stream's descriptor."""
        tt = route.context["two_theta"]
        return {"integration": {
            "data": {"two_theta": tt.tolist(), "wavelength": route.context["wavelength"]},
            "timestamps": {"two_theta": 0.0, "wavelength": 0.0},
            "data_keys": {"two_theta": layout.array((tt.size,), ("two_theta",), units="deg"),
                          "wavelength": layout.number("Å")}}}

    def analyze(self, route: Route, items: list[Item]):
        integ = route.context["integrator"]
        good, errors = [], []
        for item in items:
            try:
                good.append((item, _check_ring_frame(item.value, route.context["shape"])))
            except FrameError as err:
                errors.append((item.point, str(err)))
        rows = []
        if good:
            res = integ.integrate([g[1] for g in good])
            for (item, _), y, s in zip(good, res.intensity, res.sigma):
                rows.append({"point": item.point, "detector": route.key, **item.positions,
                             "intensity": y, "sigma": s})
        return {route.stream(INTEGRATED): rows}, errors

    def finish(self, route: Route, geometry) -> dict:
        return {}


def _check_ring_frame(value, shape) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "uif":
        raise FrameError(f"frame of dtype {arr.dtype} is not numbers")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != tuple(shape):
        raise FrameError(f"frame of shape {arr.shape} where the descriptor (and the "
                         f"calibration) expect {tuple(shape)}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise FrameError(f"frame has {int(np.sum(~np.isfinite(arr)))} NaN/inf pixels; "
                         "mask them first")
    if arr.min() == arr.max():
        raise FrameError(f"frame is constant (every pixel = {arr.min():g}): shutter closed "
                         "or detector not triggered? Nothing to integrate")
    return arr

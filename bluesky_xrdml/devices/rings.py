"""A simulated 2D powder detector: the phantom's diffraction rings on a flat panel."""

from __future__ import annotations

import numpy as np
from ophyd import Component as Cpt
from ophyd import Signal
from ophyd.sim import NullStatus

from .powder import TWO_THETA, WAVELENGTH, PowderDetector
from .signals import ArraySignal

# a panel 1 m from the sample, beam at its corner: 2θ from 0 to beyond 11° (pqnet-demo)
PONI = {"dist": 1.0, "poni1": 0.0, "poni2": 0.0, "rot1": 0.0, "rot2": 0.0, "rot3": 0.0,
        "wavelength": WAVELENGTH * 1e-10, "detector": "Detector",
        "detector_config": {"pixel1": 2e-4, "pixel2": 2e-4, "max_shape": [980, 980]}}


class RingDetector(PowderDetector):
    """``PowderDetector`` whose pattern is also seen as rings on a 2D panel (``image``),
    each pixel reading the pattern at its 2θ. The panel's calibration is ``PONI`` (also
    in the configuration as ``<name>_poni``, JSON), so the callback integrates ``image``
    with pyFAI and can be checked against ``pattern``, the 1D truth of the same point."""

    image = Cpt(ArraySignal, kind="normal", shape=PONI["detector_config"]["max_shape"],
                dtype="<f8")
    poni = Cpt(Signal, value="", kind="config", doc="pyFAI calibration (JSON)")

    def __init__(self, *args, **kwargs):
        import json

        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        super().__init__(*args, **kwargs)
        self.poni.put(json.dumps(PONI))
        ai = AzimuthalIntegrator()
        ai.set_config(PONI)
        self._tth = ai.center_array(tuple(PONI["detector_config"]["max_shape"]),
                                    unit="2th_deg")

    def trigger(self):
        super().trigger()
        pattern = np.asarray(self.pattern.get(), float)
        self.image.put(np.interp(self._tth, TWO_THETA, pattern, left=0.0, right=0.0))
        return NullStatus()

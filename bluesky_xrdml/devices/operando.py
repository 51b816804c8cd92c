"""A simulated powder detector looking through a cycling battery cell."""

from __future__ import annotations

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import NullStatus

from ..simulation.operando import OperandoPatterns, PatternSettings
from .signals import ArraySignal


class OperandoDetector(Device):
    """1D patterns (counts vs 2θ) of ``cell`` (a ``BatteryCell``) in its present state.

    Trigger it after the cell (``trigger_and_read([cell, detector])`` does): the pattern is
    that of the cell's state after the cell's own trigger. The 2θ axis and the wavelength
    are configuration, so they land in every descriptor. ``settings`` chooses wavelength,
    2θ grid, peak widths, phase weights, counts and background.
    """

    pattern = Cpt(ArraySignal, kind="normal", shape=(1,), dtype="<f4")
    two_theta = Cpt(ArraySignal, kind="config", shape=(1,), dtype="<f8")
    wavelength = Cpt(Signal, value=1.5406, kind="config", doc="X-ray wavelength in Å")
    instrument_fwhm = Cpt(Signal, value=0.08, kind="config",
                          doc="instrumental peak FWHM in degrees 2θ")

    def __init__(self, *args, cell, settings: PatternSettings | None = None, seed: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.simulator = OperandoPatterns(settings, cell.model.p)
        m = self.simulator.two_theta.size
        self.pattern._shape = (m,)
        self.two_theta._shape = (m,)
        self.pattern.put(np.zeros(m, np.float32))
        self.two_theta.put(self.simulator.two_theta.copy())
        self.wavelength.put(float(self.simulator.wavelength))
        self.instrument_fwhm.put(float(self.simulator.settings.instrument_fwhm))
        self._cell = cell
        self._rng = np.random.default_rng(seed)

    def trigger(self):
        st = self._cell.model.state()
        sign = {"charge": 1.0, "discharge": -1.0}.get(st.mode, 0.0)
        y = self.simulator.measure([st.soc], [st.soc_graphite], [sign], [st.rate], self._rng)
        self.pattern.put(y[0])
        return NullStatus()

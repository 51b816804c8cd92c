"""A simulated 1D powder detector that sees the phantom under the beam."""

from __future__ import annotations

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import NullStatus

from ..simulation.phantom import Phantom, demo_phantom
from ..simulation.powder import PowderSimulator
from ..simulation.structures import demo_structures
from .signals import ArraySignal

WAVELENGTH = 0.1771  # Å, as the pqnet-demo model
TWO_THETA = np.linspace(1.0, 11.0, 2048)  # degrees, as the pqnet-demo model


class PowderDetector(Device):
    """Integrated 1D patterns (counts vs 2θ) of the phantom voxel(s) under the beam.

    In ``mode="map"`` the pencil beam hits the point (x, y) of the sample stage. In
    ``mode="tomo"`` the beam crosses the whole sample along the direction set by the
    rotation stage and sees the line integral at the translation position ``x``: a
    rotation × translation scan records a sinogram. The 2θ axis and the wavelength are
    configuration, so they land in every descriptor.
    """

    pattern = Cpt(ArraySignal, kind="normal", shape=(TWO_THETA.size,), dtype="<f4")
    two_theta = Cpt(ArraySignal, kind="config", shape=(TWO_THETA.size,), dtype="<f8")
    wavelength = Cpt(Signal, value=WAVELENGTH, kind="config", doc="X-ray wavelength in Å")
    mode = Cpt(Signal, value="map", kind="config", doc="'map' (pencil beam) or 'tomo'")

    def __init__(
        self, *args, x, y, rotation, phantom: Phantom | None = None,
        counts: float = 2e5, background: float = 40.0, seed: int = 0, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.two_theta.put(TWO_THETA.copy())
        self.phantom = phantom or demo_phantom()
        self.simulator = PowderSimulator(
            {k: v for k, v in demo_structures().items() if k in self.phantom.names},
            WAVELENGTH, TWO_THETA,
        )
        names = self.simulator.names
        self._phase_patterns = np.vstack([
            self.simulator.phase_pattern(n, self.phantom.lattice[n], self.phantom.size_nm[n])
            for n in names
        ])  # (n_phases, M), unit area
        self._x, self._y, self._rot = x, y, rotation
        self.counts = counts
        self.background = background
        self._rng = np.random.default_rng(seed)
        self.truth: list[np.ndarray] = []  # phase weights seen at each trigger

    def trigger(self):
        if self.mode.get() == "tomo":
            weights = self.phantom.line_integral(float(self._x.position), float(self._rot.position))
        else:
            weights = self.phantom.at(float(self._x.position), float(self._y.position))
        expected = self.counts * weights @ self._phase_patterns * self.simulator.step
        expected = expected + self.background
        self.truth.append(weights)
        self.pattern.put(self._rng.poisson(expected).astype(np.float32))
        return NullStatus()

"""A simulated area detector that records Bragg-spot frames at the stage's rotation angle."""

from __future__ import annotations

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import NullStatus

from ..simulation.spots import SpotSimulator
from .signals import ArraySignal


class BraggSpotDetector(Device):
    """Frames of ``SpotSimulator`` at the angle of ``rotation`` (an ophyd positioner).

    The true spot centres of every triggered frame are kept in ``truth`` (a list of
    DataFrames, one per trigger) for tests; they never enter the event data.
    """

    image = Cpt(ArraySignal, kind="normal", shape=(1, 1), dtype="<u2")
    pixel_size = Cpt(Signal, value=0.075, kind="config", doc="pixel pitch in mm")

    def __init__(self, *args, rotation, simulator: SpotSimulator | None = None, seed=0, **kwargs):
        self.simulator = simulator or SpotSimulator(seed=seed)
        super().__init__(*args, **kwargs)
        self.image._shape = self.simulator.shape
        self.image.put(np.zeros(self.simulator.shape, np.uint16))
        self._rotation = rotation
        self._rng = np.random.default_rng(seed)
        self.truth: list = []
        self.inject: list = []  # optional frames to emit instead of the simulation (tests)

    def trigger(self):
        omega = float(self._rotation.position)
        if self.inject:
            frame = self.inject.pop(0)
            self.truth.append(None)
        else:
            frame = self.simulator.frame(omega, self._rng)
            self.truth.append(self.simulator.truth(omega))
        self.image.put(frame)
        return NullStatus()

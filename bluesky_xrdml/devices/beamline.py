"""The simulated beamline: a sample stage and two detectors, like ``ophyd.sim.hw()``."""

from __future__ import annotations

from types import SimpleNamespace

from ophyd.sim import SynAxis

from .area import BraggSpotDetector
from .powder import PowderDetector


def sim_beamline(seed: int = 0) -> SimpleNamespace:
    """Motors ``x``, ``y`` (mm), ``rot`` (degrees) and detectors ``area`` and ``powder``."""
    x = SynAxis(name="x", labels={"motors"})
    y = SynAxis(name="y", labels={"motors"})
    rot = SynAxis(name="rot", labels={"motors"})
    area = BraggSpotDetector(name="area", rotation=rot, seed=seed, labels={"detectors"})
    powder = PowderDetector(name="powder", x=x, y=y, rotation=rot, seed=seed, labels={"detectors"})
    return SimpleNamespace(x=x, y=y, rot=rot, area=area, powder=powder)

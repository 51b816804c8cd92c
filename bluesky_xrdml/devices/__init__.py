"""Simulated ophyd hardware for demos and tests: a sample stage and two detectors."""

from .area import BraggSpotDetector
from .beamline import sim_beamline
from .powder import PowderDetector
from .signals import ArraySignal

__all__ = ["ArraySignal", "BraggSpotDetector", "PowderDetector", "sim_beamline"]

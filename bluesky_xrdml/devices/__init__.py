"""Simulated ophyd hardware for demos and tests: a sample stage and detectors."""

from .area import BraggSpotDetector
from .beamline import sim_beamline
from .files import HDF5AreaDetector
from .powder import PowderDetector
from .rings import RingDetector
from .signals import ArraySignal

__all__ = ["ArraySignal", "BraggSpotDetector", "HDF5AreaDetector", "PowderDetector",
           "RingDetector", "sim_beamline"]

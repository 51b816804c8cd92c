"""Simulated ophyd hardware for demos and tests: a sample stage and detectors; a cycling
battery cell and the powder detector that looks through it."""

from .area import BraggSpotDetector
from .beamline import sim_beamline
from .cell import BatteryCell
from .files import HDF5AreaDetector
from .operando import OperandoDetector
from .powder import PowderDetector
from .rings import RingDetector
from .signals import ArraySignal

__all__ = ["ArraySignal", "BatteryCell", "BraggSpotDetector", "HDF5AreaDetector",
           "OperandoDetector", "PowderDetector", "RingDetector", "sim_beamline"]

"""Simulated data: powder patterns from structures, Bragg-spot frames, sample phantoms.

Plain numpy/scipy/pymatgen code; nothing here knows about Bluesky.
"""

from .phantom import Phantom, demo_phantom
from .powder import PeakList, PowderSimulator, Ranges, Sample, peak_list, pseudo_voigt
from .spots import SpotSimulator
from .structures import DEMO_PHASES, demo_structures

__all__ = [
    "DEMO_PHASES",
    "PeakList",
    "Phantom",
    "PowderSimulator",
    "Ranges",
    "Sample",
    "SpotSimulator",
    "demo_phantom",
    "demo_structures",
    "peak_list",
    "pseudo_voigt",
]

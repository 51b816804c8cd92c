"""Classical science, usable without a RunEngine: peaks, ROIs, tomography."""

from .peaks import COLUMNS as PEAK_COLUMNS
from .peaks import FrameError, extract_patches, find_peaks, locate_peaks
from .roi import PatternError, Roi, integrate_rois, rois_from_phases
from .tomography import reconstruct

__all__ = [
    "PEAK_COLUMNS",
    "FrameError",
    "PatternError",
    "Roi",
    "extract_patches",
    "find_peaks",
    "integrate_rois",
    "locate_peaks",
    "reconstruct",
    "rois_from_phases",
]

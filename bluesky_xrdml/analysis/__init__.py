"""Classical science, usable without a RunEngine: peaks (and BraggNN centring through
``locate_peaks(method="braggnn")``), pseudo-Voigt fits, ROIs, tomography."""

from .fitting import fit_multi, fit_patches, fit_pseudo_voigt
from .peaks import COLUMNS as PEAK_COLUMNS
from .peaks import METHODS as PEAK_METHODS
from .peaks import (
    FrameError,
    centre_peaks,
    extract_patches,
    find_peaks,
    locate_peaks,
    prepare,
)
from .roi import PatternError, Roi, integrate_rois, rois_from_phases
from .tomography import reconstruct

__all__ = [
    "PEAK_COLUMNS",
    "PEAK_METHODS",
    "FrameError",
    "PatternError",
    "Roi",
    "centre_peaks",
    "extract_patches",
    "fit_multi",
    "fit_patches",
    "fit_pseudo_voigt",
    "find_peaks",
    "integrate_rois",
    "locate_peaks",
    "prepare",
    "reconstruct",
    "rois_from_phases",
]

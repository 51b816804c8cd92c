"""Azimuthal integration of 2D powder frames into 1D patterns, with pyFAI.

A detector calibrated with pyFAI (a PONI file: distance, beam centre, tilts, pixel size,
wavelength) turns each ring frame into intensity vs 2θ. ``PowderIntegrator`` keeps one
pyFAI integrator and its sparse (CSR) look-up table, so every frame after the first costs
a sparse matrix-vector product. Masked: the detector's own mask (module gaps of a
Pilatus) and a user mask, both built into the look-up table once, and per frame every
pixel reading -1 or -2 (how detectors mark dead and gap pixels; pyFAI's ``dummy``, at no
extra cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHOD = ("bbox", "csr", "cython")  # pixel splitting, sparse look-up table, CPU


class CalibrationError(ValueError):
    """A calibration that cannot be used (missing PONI file, no wavelength, ...)."""


def load_integrator(calibration):
    """A pyFAI ``AzimuthalIntegrator`` from a PONI file path, a dict of PONI values, or an
    integrator (returned as is)."""
    import pyFAI

    if hasattr(calibration, "integrate1d"):
        return calibration
    if isinstance(calibration, dict):
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        ai = AzimuthalIntegrator()
        ai.set_config(dict(calibration))
        return ai
    path = Path(calibration)
    if not path.exists():
        raise CalibrationError(f"no PONI file at {path}; make one with pyFAI-calib2")
    return pyFAI.load(str(path))


@dataclass
class Integrated:
    two_theta: np.ndarray  # degrees, bin centres
    intensity: np.ndarray  # (N, npt) counts per pixel (mean over each ring)
    sigma: np.ndarray  # (N, npt) Poisson standard deviation


class PowderIntegrator:
    """Frames -> patterns on one fixed 2θ grid.

    Parameters
    ----------
    calibration : PONI path, dict or pyFAI integrator
    npt : int
        Points of the 2θ grid.
    radial_range : (lo, hi) in degrees, optional
        The grid's range (bin edges); pyFAI's full range otherwise. Give it (with
        ``npt``) to integrate onto the grid a model was trained on.
    mask : array, optional
        Pixels to leave out (True = masked), added to the detector's own mask.
    polarization : float, optional
        Polarisation factor for pyFAI's correction (None: no correction).
    """

    def __init__(self, calibration, npt: int = 2048, radial_range=None, mask=None,
                 polarization: float | None = None, method=METHOD):
        self.ai = load_integrator(calibration)
        if not self.ai.wavelength:
            raise CalibrationError("the calibration has no wavelength; add it to the PONI")
        self.npt, self.radial_range = int(npt), radial_range
        self.user_mask = None if mask is None else np.asarray(mask, bool)
        self.polarization, self.method = polarization, method

    @property
    def wavelength(self) -> float:
        """X-ray wavelength in Å."""
        return float(self.ai.wavelength) * 1e10

    @property
    def shape(self) -> tuple | None:
        shape = getattr(self.ai.detector, "shape", None) or getattr(
            self.ai.detector, "max_shape", None)
        return tuple(shape) if shape else None

    @property
    def two_theta(self) -> np.ndarray:
        """The 2θ grid (bin centres, degrees); known once a frame's shape is."""
        if self.radial_range is not None:
            lo, hi = self.radial_range
            step = (hi - lo) / self.npt
            return lo + step * (np.arange(self.npt) + 0.5)
        if self.shape is None:
            raise CalibrationError("the 2θ grid of a detector of unknown shape is known only "
                                   "after its first frame; pass radial_range=")
        return self.integrate(np.ones(self.shape, np.float32)).two_theta

    def _static_mask(self, shape) -> None:
        """The user's mask joins the detector's, once (a per-call mask doubles the cost of
        every frame)."""
        if self.user_mask is None or getattr(self, "_masked", None) == shape:
            return
        if self.user_mask.shape != shape:
            raise CalibrationError(f"mask of shape {self.user_mask.shape} for frames of "
                                   f"shape {shape}")
        detector_mask = self.ai.detector.mask
        mask = self.user_mask.copy()
        if detector_mask is not None and detector_mask.shape == shape:
            mask |= detector_mask.astype(bool)
        self.ai.detector.mask = mask.astype(np.int8)
        self.ai.reset()
        self._masked = shape

    def integrate(self, frames) -> Integrated:
        """One frame (2D), a stack (N, rows, cols) or a list of frames -> ``Integrated``
        (a list is not copied into one array: 2048² frames are 16 MB each)."""
        if isinstance(frames, list | tuple):
            stack = [np.asarray(f) for f in frames]
        else:
            stack = np.asarray(frames)
            stack = stack[None] if stack.ndim == 2 else stack
        shapes = {f.shape for f in stack}
        if len(shapes) != 1:
            raise CalibrationError(f"frames of several shapes {sorted(shapes)}")
        (shape,) = shapes
        if self.shape is not None and shape != self.shape:
            raise CalibrationError(f"frames of shape {shape} for a calibration of a "
                                   f"{self.shape} detector: is this the right PONI?")
        self._static_mask(shape)
        out_i, out_s, tt = [], [], None
        for frame in stack:
            res = self.ai.integrate1d(
                frame, self.npt, unit="2th_deg", radial_range=self.radial_range,
                method=self.method, error_model="poisson", dummy=-1.5, delta_dummy=0.6,
                polarization_factor=self.polarization, correctSolidAngle=False)
            tt = res.radial
            out_i.append(res.intensity)
            out_s.append(res.sigma if res.sigma is not None else np.sqrt(
                np.clip(res.intensity, 0, None)))
        return Integrated(np.asarray(tt, float), np.asarray(out_i, float),
                          np.asarray(out_s, float))


def ring_frame(ai, two_theta, pattern, shape) -> np.ndarray:
    """The expected 2D frame of a powder ``pattern`` (counts vs ``two_theta`` in degrees)
    on a detector of ``shape`` calibrated by ``ai``: each pixel sees the pattern at its
    2θ (for simulations and tests)."""
    tth = ai.center_array(tuple(shape), unit="2th_deg")
    return np.interp(tth, two_theta, pattern, left=0.0, right=0.0)

"""Powder diffraction patterns from crystal structures.

Peak positions and intensities come from pymatgen's ``XRDCalculator`` once per phase
(it is slow: ~0.1-1 s per call). Strained cells reuse the cached list: the d-spacings of
a cubic cell scale with the lattice parameter, and positions follow from Bragg's law.

Profiles are pseudo-Voigt with Thompson-Cox-Hastings mixing of a Gaussian instrumental
width and a Lorentzian Scherrer size width, FWHM_L = 0.9 λ / (L cos θ).
Each phase pattern is normalised to unit integrated intensity on the 2θ grid
(``sum * step == 1``), so a pattern's ``scale`` is its integrated counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Structure

SCHERRER_K = 0.9


@dataclass(frozen=True)
class PeakList:
    """Reflections of one phase: d-spacings (Å), relative intensities, Miller indices."""

    name: str
    d: np.ndarray
    intensity: np.ndarray
    hkl: list[tuple[int, ...]]
    a: float  # lattice parameter the list was computed for (Å)

    def two_theta(self, wavelength: float, a: float | np.ndarray | None = None) -> np.ndarray:
        """Peak positions in degrees for lattice parameter(s) ``a`` (Bragg's law).

        A scalar ``a`` gives shape (n_peaks,); an array of shape (N,) gives (N, n_peaks).
        Reflections beyond 2θ = 180° come back as NaN.
        """
        scale = 1.0 if a is None else np.asarray(a, dtype=float)[..., None] / self.a
        s = wavelength / (2.0 * self.d * scale)
        with np.errstate(invalid="ignore"):
            return np.degrees(2.0 * np.arcsin(np.where(s <= 1.0, s, np.nan)))


def peak_list(
    structure: Structure, wavelength: float, two_theta_max: float = 180.0, name: str | None = None
) -> PeakList:
    """Reflections of ``structure`` at ``wavelength`` (Å) up to ``two_theta_max`` degrees."""
    calc = XRDCalculator(wavelength=float(wavelength))
    pattern = calc.get_pattern(structure, scaled=False, two_theta_range=(0.0, two_theta_max))
    hkl = [tuple(family[0]["hkl"]) for family in pattern.hkls]
    return PeakList(
        name=name or structure.composition.reduced_formula,
        d=np.asarray(pattern.d_hkls, dtype=float),
        intensity=np.asarray(pattern.y, dtype=float),
        hkl=hkl,
        a=float(structure.lattice.a),
    )


def scherrer_fwhm(two_theta: np.ndarray, size_nm: np.ndarray, wavelength: float) -> np.ndarray:
    """Lorentzian size broadening (FWHM in degrees 2θ) for crystallite size in nm."""
    theta = np.radians(two_theta) / 2.0
    return np.degrees(SCHERRER_K * wavelength / (np.asarray(size_nm) * 10.0 * np.cos(theta)))


def pseudo_voigt(
    x: np.ndarray, center: np.ndarray, fwhm_g: np.ndarray, fwhm_l: np.ndarray
) -> np.ndarray:
    """Unit-area Thompson-Cox-Hastings pseudo-Voigt, broadcast over ``center``/widths.

    ``x`` is the grid (M,); the parameters broadcast against each other and the
    result gets a trailing axis of length M.
    """
    g, lo = np.asarray(fwhm_g, float), np.asarray(fwhm_l, float)
    fwhm = (
        g**5 + 2.69269 * g**4 * lo + 2.42843 * g**3 * lo**2
        + 4.47163 * g**2 * lo**3 + 0.07842 * g * lo**4 + lo**5
    ) ** 0.2
    q = lo / fwhm
    eta = 1.36603 * q - 0.47719 * q**2 + 0.11116 * q**3
    dx = x - np.asarray(center, float)[..., None]
    hw = (fwhm / 2.0)[..., None]
    lorentz = hw / np.pi / (dx**2 + hw**2)
    sigma = (fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))))[..., None]
    gauss = np.exp(-0.5 * (dx / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))
    return eta[..., None] * lorentz + (1.0 - eta[..., None]) * gauss


class PowderSimulator:
    """Simulate powder patterns of a set of phases on a fixed 2θ grid.

    Parameters
    ----------
    phases : dict name -> pymatgen Structure
    wavelength : Å
    two_theta : the detector's 2θ grid in degrees (uniformly spaced)
    instrument_fwhm : Gaussian instrumental FWHM in degrees, constant over 2θ
    """

    def __init__(
        self,
        phases: dict[str, Structure],
        wavelength: float,
        two_theta: np.ndarray,
        instrument_fwhm: float = 0.03,
    ):
        self.wavelength = float(wavelength)
        self.two_theta = np.asarray(two_theta, dtype=float)
        self.step = float(self.two_theta[1] - self.two_theta[0])
        self.instrument_fwhm = float(instrument_fwhm)
        tmax = min(180.0, float(self.two_theta[-1]) + 5.0)
        self.peaks = {
            name: peak_list(s, self.wavelength, tmax, name=name) for name, s in phases.items()
        }
        self.names = list(self.peaks)
        self.nominal_a = np.array([self.peaks[n].a for n in self.names])

    def phase_pattern(self, name: str, a: np.ndarray | float, size_nm: np.ndarray | float):
        """Unit-area pattern(s) of one phase: shape (N, M) for N lattice/size values."""
        pk = self.peaks[name]
        a = np.atleast_1d(np.asarray(a, float))
        size = np.broadcast_to(np.asarray(size_nm, float), a.shape)
        centers = pk.two_theta(self.wavelength, a)  # (N, K)
        lo, hi = self.two_theta[0] - 1.0, self.two_theta[-1] + 1.0
        keep = np.any((centers > lo) & (centers < hi), axis=0)
        centers, weights = centers[:, keep], pk.intensity[keep]
        fwhm_l = scherrer_fwhm(centers, size[:, None], self.wavelength)
        profiles = pseudo_voigt(self.two_theta, centers, self.instrument_fwhm, fwhm_l)
        pattern = np.einsum("nkm,k->nm", profiles, weights)
        norm = pattern.sum(axis=1, keepdims=True) * self.step
        return pattern / np.where(norm > 0, norm, 1.0)

    def patterns(self, scale: np.ndarray, a: np.ndarray, size_nm: np.ndarray) -> np.ndarray:
        """Noise-free patterns: ``scale``, ``a``, ``size_nm`` of shape (N, n_phases) -> (N, M)."""
        scale, a, size = (np.atleast_2d(np.asarray(v, float)) for v in (scale, a, size_nm))
        out = np.zeros((scale.shape[0], self.two_theta.size))
        for j, name in enumerate(self.names):
            present = scale[:, j] > 0
            if present.any():
                out[present] += scale[present, j, None] * self.phase_pattern(
                    name, a[present, j], size[present, j]
                )
        return out

    def background(self, n: int, level: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Smooth random backgrounds (low-order Chebyshev + air-scatter decay), mean ``level``."""
        x = np.linspace(-1.0, 1.0, self.two_theta.size)
        coef = rng.uniform(-0.3, 0.3, size=(n, 3))
        shape = 1.0 + np.polynomial.chebyshev.chebval(x, coef.T) + 0.5 * np.exp(-3 * (x + 1))
        shape = np.clip(shape, 0.05, None)
        shape /= shape.mean(axis=1, keepdims=True)
        return np.asarray(level, float).reshape(-1, 1) * shape

    def noisy(self, expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson counting noise on expected counts."""
        return rng.poisson(np.clip(expected, 0, None)).astype(np.float64)

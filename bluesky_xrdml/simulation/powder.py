"""Powder diffraction patterns from crystal structures.

Peak positions and intensities come from pymatgen's ``XRDCalculator`` once per phase
(it is slow: ~0.1-1 s per call). Strained cells reuse the cached list: the d-spacings
follow from the Miller indices and the strained cell (for a cubic cell they simply scale
with the lattice parameter), and positions follow from Bragg's law.

Profiles are pseudo-Voigt with Thompson-Cox-Hastings mixing of a Gaussian instrumental
width and a Lorentzian Scherrer size width, FWHM_L = 0.9 λ / (L cos θ).
Each phase pattern is normalised to unit integrated intensity on the 2θ grid
(``sum * step == 1``), so a pattern's ``scale`` is its integrated counts.

Two ways to compute patterns, the same physics:

- ``phase_pattern`` / ``patterns``: every peak evaluated on the grid (exact; ~5 ms a
  pattern of the four demo phases);
- ``fast_patterns`` / ``sample``: per phase, the peaks are placed as sticks on a 4×
  oversampled grid and convolved, in Fourier space, with one analytic pseudo-Voigt whose
  Lorentzian width is taken at the phase's intensity-weighted mean cos θ (over 1-11° 2θ
  the width varies by < 0.5 %); batched in torch: thousands of patterns per second, within
  ~1 % of the peak height of the exact patterns. This is what training uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Structure

SCHERRER_K = 0.9

# free lattice parameters of each crystal system (angles are held at their nominal values)
FREE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "cubic": ("a",),
    "tetragonal": ("a", "c"),
    "hexagonal": ("a", "c"),
    "trigonal": ("a", "c"),  # hexagonal axes
    "orthorhombic": ("a", "b", "c"),
    "monoclinic": ("a", "b", "c"),
    "triclinic": ("a", "b", "c"),
}
_AXIS = {"a": 0, "b": 1, "c": 2}


@dataclass(frozen=True)
class PeakList:
    """Reflections of one phase: d-spacings (Å), relative intensities, Miller indices.

    ``lengths``/``angles`` are the cell the list was computed for; ``system`` its crystal
    system, whose free lattice parameters (``free``) a strained cell may change.
    """

    name: str
    d: np.ndarray
    intensity: np.ndarray
    hkl: list[tuple[int, ...]]
    a: float  # lattice parameter the list was computed for (Å)
    system: str = "cubic"
    lengths: tuple[float, float, float] | None = None
    angles: tuple[float, float, float] = (90.0, 90.0, 90.0)

    @property
    def free(self) -> tuple[str, ...]:
        """Free lattice parameters of the crystal system, e.g. ``("a",)`` or ``("a", "c")``."""
        return FREE_PARAMETERS.get(self.system, ("a",))

    @property
    def nominal(self) -> np.ndarray:
        """Nominal values of the free lattice parameters (Å)."""
        lengths = self.lengths or (self.a, self.a, self.a)
        return np.array([lengths[_AXIS[p]] for p in self.free])

    def two_theta(self, wavelength: float, a: float | np.ndarray | None = None) -> np.ndarray:
        """Peak positions in degrees for lattice parameter(s) ``a`` (Bragg's law).

        A scalar ``a`` gives shape (n_peaks,); an array of shape (N,) gives (N, n_peaks).
        Every cell length scales with ``a`` / the nominal a (exact for cubic cells).
        Reflections beyond 2θ = 180° come back as NaN.
        """
        scale = 1.0 if a is None else np.asarray(a, dtype=float)[..., None] / self.a
        return _bragg(wavelength, self.d * scale)

    def d_spacings(self, params: np.ndarray) -> np.ndarray:
        """d-spacings (N, n_peaks) for free lattice parameters ``params`` (N, len(free))."""
        params = np.asarray(params, float).reshape(-1, len(self.free))
        if self.free == ("a",):
            return self.d[None, :] * (params[:, :1] / self.a)
        lengths = np.tile(np.asarray(self.lengths or (self.a,) * 3, float), (len(params), 1))
        if self.system in ("tetragonal", "hexagonal", "trigonal"):
            lengths[:, 0] = lengths[:, 1] = params[:, 0]
            lengths[:, 2] = params[:, 1]
        else:
            lengths[:] = params
        # 1/d² = Σ_ij (h_i/L_i) (C⁻¹)_ij (h_j/L_j), C the matrix of cell-angle cosines
        cos = np.cos(np.radians(self.angles))
        cmat = np.array([[1, cos[2], cos[1]], [cos[2], 1, cos[0]], [cos[1], cos[0], 1]])
        hkl = np.array([_three_index(h) for h in self.hkl], float)  # (K, 3)
        q = hkl[None, :, :] / lengths[:, None, :]
        inv_d2 = np.einsum("nki,ij,nkj->nk", q, np.linalg.inv(cmat), q)
        return 1.0 / np.sqrt(inv_d2)

    def positions(self, wavelength: float, params: np.ndarray) -> np.ndarray:
        """Peak positions (N, n_peaks) in degrees for free parameters (N, len(free))."""
        return _bragg(wavelength, self.d_spacings(params))


def _bragg(wavelength: float, d: np.ndarray) -> np.ndarray:
    s = wavelength / (2.0 * d)
    with np.errstate(invalid="ignore"):
        return np.degrees(2.0 * np.arcsin(np.where(s <= 1.0, s, np.nan)))


def _three_index(hkl) -> tuple[int, int, int]:
    """(h, k, l) from pymatgen's (h, k, l) or hexagonal (h, k, i, l)."""
    hkl = tuple(int(i) for i in hkl)
    return (hkl[0], hkl[1], hkl[3]) if len(hkl) == 4 else hkl


def crystal_system(structure: Structure) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    return SpacegroupAnalyzer(structure).get_crystal_system()


def peak_list(
    structure: Structure, wavelength: float, two_theta_max: float = 180.0, name: str | None = None
) -> PeakList:
    """Reflections of ``structure`` at ``wavelength`` (Å) up to ``two_theta_max`` degrees.

    Reflections that coincide at the nominal cell (one pymatgen peak, several families)
    are kept apart, their intensity shared by multiplicity, so strain can split them.
    """
    calc = XRDCalculator(wavelength=float(wavelength))
    pattern = calc.get_pattern(structure, scaled=False, two_theta_range=(0.0, two_theta_max))
    system = crystal_system(structure)
    d, inten, hkl = [], [], []
    for dk, yk, families in zip(pattern.d_hkls, pattern.y, pattern.hkls):
        total = sum(f["multiplicity"] for f in families) or 1
        for fam in families if system != "cubic" else families[:1]:
            share = 1.0 if system == "cubic" else fam["multiplicity"] / total
            d.append(dk)
            inten.append(yk * share)
            hkl.append(tuple(fam["hkl"]))
    lat = structure.lattice
    return PeakList(
        name=name or structure.composition.reduced_formula,
        d=np.asarray(d, dtype=float),
        intensity=np.asarray(inten, dtype=float),
        hkl=hkl,
        a=float(lat.a),
        system=system,
        lengths=(float(lat.a), float(lat.b), float(lat.c)),
        angles=(float(lat.alpha), float(lat.beta), float(lat.gamma)),
    )


def scherrer_fwhm(two_theta: np.ndarray, size_nm: np.ndarray, wavelength: float) -> np.ndarray:
    """Lorentzian size broadening (FWHM in degrees 2θ) for crystallite size in nm."""
    theta = np.radians(two_theta) / 2.0
    return np.degrees(SCHERRER_K * wavelength / (np.asarray(size_nm) * 10.0 * np.cos(theta)))


def tch(fwhm_g, fwhm_l):
    """Thompson-Cox-Hastings total FWHM and Lorentzian fraction η of a pseudo-Voigt."""
    g, lo = fwhm_g, fwhm_l
    fwhm = (
        g**5 + 2.69269 * g**4 * lo + 2.42843 * g**3 * lo**2
        + 4.47163 * g**2 * lo**3 + 0.07842 * g * lo**4 + lo**5
    ) ** 0.2
    q = lo / fwhm
    eta = 1.36603 * q - 0.47719 * q**2 + 0.11116 * q**3
    return fwhm, eta


def pseudo_voigt(
    x: np.ndarray, center: np.ndarray, fwhm_g: np.ndarray, fwhm_l: np.ndarray
) -> np.ndarray:
    """Unit-area Thompson-Cox-Hastings pseudo-Voigt, broadcast over ``center``/widths.

    ``x`` is the grid (M,); the parameters broadcast against each other and the
    result gets a trailing axis of length M.
    """
    fwhm, eta = tch(np.asarray(fwhm_g, float), np.asarray(fwhm_l, float))
    dx = x - np.asarray(center, float)[..., None]
    hw = (fwhm / 2.0)[..., None]
    lorentz = hw / np.pi / (dx**2 + hw**2)
    sigma = (fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0))))[..., None]
    gauss = np.exp(-0.5 * (dx / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))
    return eta[..., None] * lorentz + (1.0 - eta[..., None]) * gauss


@dataclass(frozen=True)
class Ranges:
    """What a training (or test) set draws from; recorded in the model card.

    Each phase is present with probability ``p_present`` (at least one per pattern), with a
    weight uniform in ``weight``, normalised over the present phases (= its ``fraction``);
    each free lattice parameter uniform within ±``lattice_rel`` of nominal; crystallite
    size uniform in ``size_nm``; total counts log-uniform in ``counts``, of which a share
    uniform in [0, ``background_max``] is a smooth background; Poisson noise.
    """

    lattice_rel: float = 0.01
    size_nm: tuple[float, float] = (5.0, 100.0)
    counts: tuple[float, float] = (1e4, 1e6)
    background_max: float = 0.5
    p_present: float = 0.5
    weight: tuple[float, float] = (0.02, 1.0)

    def as_dict(self) -> dict:
        return {"lattice_rel": self.lattice_rel, "size_nm": list(self.size_nm),
                "counts": list(self.counts), "background_max": self.background_max,
                "p_present": self.p_present, "weight": list(self.weight),
                "size_distribution": "uniform", "counts_distribution": "log-uniform"}


@dataclass
class Sample:
    """Simulated patterns with their truth. Arrays are (N, n_phases) unless noted;
    ``lattice`` is name -> (N, n_free)."""

    counts: np.ndarray  # (N, M) float32 Poisson counts
    scale: np.ndarray
    fraction: np.ndarray
    size_nm: np.ndarray
    lattice: dict[str, np.ndarray]
    present: np.ndarray  # bool
    total: np.ndarray  # (N,) expected total counts
    background: np.ndarray  # (N,) background share of the counts
    names: list[str] = field(default_factory=list)

    @property
    def lattice_a(self) -> np.ndarray:
        """(N, n_phases) first free lattice parameter of every phase."""
        return np.stack([self.lattice[n][:, 0] for n in self.names], axis=1)


class PowderSimulator:
    """Simulate powder patterns of a set of phases on a fixed 2θ grid.

    Parameters
    ----------
    phases : dict name -> pymatgen Structure
    wavelength : Å
    two_theta : the detector's 2θ grid in degrees (uniformly spaced)
    instrument_fwhm : Gaussian instrumental FWHM in degrees, constant over 2θ
    """

    OVERSAMPLE = 4  # fine-grid points per grid step for the fast path
    MARGIN = 1.0  # degrees beyond the grid whose peaks still count (their tails reach in)

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
        self._fast: dict = {}

    @property
    def free(self) -> dict[str, tuple[str, ...]]:
        """Free lattice parameters per phase, e.g. ``{"Ni": ("a",)}``."""
        return {n: self.peaks[n].free for n in self.names}

    def _lattice(self, name: str, a) -> np.ndarray:
        pk = self.peaks[name]
        arr = np.asarray(a, float)
        if len(pk.free) == 1:
            return arr.reshape(-1, 1)
        return np.atleast_2d(arr)

    def phase_pattern(self, name: str, a: np.ndarray | float, size_nm: np.ndarray | float):
        """Unit-area pattern(s) of one phase: shape (N, M) for N lattice/size values.

        ``a``: the lattice parameter (N,), or for a phase with several free parameters
        (``free[name]``) an array (N, n_free).
        """
        pk = self.peaks[name]
        params = self._lattice(name, a)
        size = np.broadcast_to(np.asarray(size_nm, float).reshape(-1), (len(params),))
        centers = pk.positions(self.wavelength, params)  # (N, K)
        lo, hi = self.two_theta[0] - self.MARGIN, self.two_theta[-1] + self.MARGIN
        keep = np.any((centers > lo) & (centers < hi), axis=0)
        centers, weights = centers[:, keep], pk.intensity[keep]
        fwhm_l = scherrer_fwhm(centers, size[:, None], self.wavelength)
        profiles = pseudo_voigt(self.two_theta, centers, self.instrument_fwhm, fwhm_l)
        pattern = np.einsum("nkm,k->nm", profiles, weights)
        norm = pattern.sum(axis=1, keepdims=True) * self.step
        return pattern / np.where(norm > 0, norm, 1.0)

    def patterns(self, scale: np.ndarray, a, size_nm: np.ndarray, fast: bool = False):
        """Noise-free patterns: ``scale``, ``a``, ``size_nm`` of shape (N, n_phases) -> (N, M).

        ``a`` may also be a dict name -> (N, n_free) for phases with several free
        parameters. ``fast=True`` uses the batched Fourier path (see the module docstring).
        """
        scale, size = (np.atleast_2d(np.asarray(v, float)) for v in (scale, size_nm))
        lattice = self._lattice_dict(a, len(scale))
        if fast:
            return self.fast_patterns(scale, lattice, size)
        out = np.zeros((scale.shape[0], self.two_theta.size))
        for j, name in enumerate(self.names):
            present = scale[:, j] > 0
            if present.any():
                out[present] += scale[present, j, None] * self.phase_pattern(
                    name, lattice[name][present], size[present, j]
                )
        return out

    def _lattice_dict(self, a, n: int) -> dict[str, np.ndarray]:
        if isinstance(a, dict):
            return {k: np.asarray(a[k], float).reshape(n, -1) for k in self.names}
        a = np.atleast_2d(np.asarray(a, float))
        return {k: a[:, j:j + 1] for j, k in enumerate(self.names)}

    # --- fast path -------------------------------------------------------------------
    def _fast_setup(self):
        if self._fast:
            return self._fast
        o = self.OVERSAMPLE
        margin_steps = int(math.ceil(self.MARGIN / self.step))
        h = self.step / o
        x0 = self.two_theta[0] - margin_steps * self.step  # fine index 0
        n_used = (self.two_theta.size - 1 + 2 * margin_steps) * o + 1
        length = 1 << int(math.ceil(math.log2(n_used * 1.5)))  # room so tails do not wrap
        cos_mid = {}
        for name in self.names:
            pk = self.peaks[name]
            pos = pk.positions(self.wavelength, pk.nominal[None])[0]
            inside = (pos > self.two_theta[0]) & (pos < self.two_theta[-1])
            w = pk.intensity * inside
            cth = np.cos(np.radians(np.nan_to_num(pos)) / 2)
            cos_mid[name] = float((w * cth).sum() / w.sum()) if w.sum() > 0 else 1.0
        self._fast = {"o": o, "h": h, "x0": x0, "length": length,
                      "first": margin_steps * o, "cos_mid": cos_mid}
        return self._fast

    def _spectra(self, lattice: dict, size_nm: np.ndarray, sl: slice):
        """Fourier spectra (nb, n_phases, F) of the unit-area phase patterns on the fine grid,
        up to the frequency where every profile has decayed (< 1e-6 of its peak)."""
        import torch
        from scipy.special import erf

        f = self._fast_setup()
        nb = sl.stop - sl.start
        sticks = torch.zeros(nb, len(self.names), f["length"], dtype=torch.float32)
        fwhm_p, eta_p, norms = [], [], []
        edges = (self.two_theta[0] - self.step / 2, self.two_theta[-1] + self.step / 2)
        for j, name in enumerate(self.names):
            pk = self.peaks[name]
            pos = pk.positions(self.wavelength, lattice[name][sl])  # (nb, K)
            inside = np.isfinite(pos) & (pos > self.two_theta[0] - self.MARGIN) & (
                pos < self.two_theta[-1] + self.MARGIN)
            inten = np.where(inside, pk.intensity[None, :], 0.0)
            pos = np.where(inside, pos, self.two_theta[0])
            u = (pos - f["x0"]) / f["h"]
            i0 = np.floor(u).astype(np.int64)
            w = u - i0
            fl = scherrer_fwhm(np.degrees(2 * np.arccos(f["cos_mid"][name])),
                               size_nm[sl, j], self.wavelength)
            fwhm, eta = tch(self.instrument_fwhm, fl)
            # the share of each peak's area that falls on the grid: the normalisation
            hw = fwhm[:, None] / 2
            sig = fwhm[:, None] / (2 * np.sqrt(2 * np.log(2)))
            lor = (np.arctan((edges[1] - pos) / hw) - np.arctan((edges[0] - pos) / hw)) / np.pi
            gau = 0.5 * (erf((edges[1] - pos) / (sig * np.sqrt(2)))
                         - erf((edges[0] - pos) / (sig * np.sqrt(2))))
            area = eta[:, None] * lor + (1 - eta[:, None]) * gau
            norms.append((inten * area).sum(axis=1))
            row = sticks[:, j]
            row.scatter_add_(1, torch.from_numpy(i0),
                             torch.from_numpy((inten * (1 - w)).astype(np.float32)))
            row.scatter_add_(1, torch.from_numpy(i0 + 1),
                             torch.from_numpy((inten * w).astype(np.float32)))
            fwhm_p.append(fwhm)
            eta_p.append(eta)
        fwhm = np.stack(fwhm_p, 1)
        f_cut = 16.0 / (np.pi * fwhm.min())  # exp(-π fwhm f) < 1e-6 beyond
        n_freq = min(f["length"] // 2 + 1, int(f_cut * f["length"] * f["h"]) + 2)
        freq = torch.arange(n_freq, dtype=torch.float32) / (f["length"] * f["h"])
        fwhm_t = torch.from_numpy(fwhm.astype(np.float32))[..., None]  # (nb, P, 1)
        eta_t = torch.from_numpy(np.stack(eta_p, 1).astype(np.float32))[..., None]
        norm = torch.from_numpy(np.stack(norms, 1).astype(np.float32))[..., None]
        # analytic Fourier transforms of the unit-area Lorentzian and Gaussian
        lor_ft = torch.exp(-torch.pi * fwhm_t * freq)
        sigma2 = (fwhm_t / (2 * math.sqrt(2 * math.log(2)))) ** 2
        gau_ft = torch.exp(-2 * torch.pi**2 * sigma2 * freq**2)
        prof = (eta_t * (lor_ft - gau_ft) + gau_ft) / (norm.clamp_min(1e-30) * f["h"])
        return torch.fft.rfft(sticks, dim=-1)[..., :n_freq] * prof

    def _to_grid(self, spec):
        import torch

        f = self._fast_setup()
        fine = torch.fft.irfft(spec, n=f["length"], dim=-1)
        m = self.two_theta.size
        return fine[..., f["first"]: f["first"] + (m - 1) * f["o"] + 1: f["o"]].numpy()

    def fast_phase_patterns(self, lattice: dict, size_nm: np.ndarray, chunk: int = 256):
        """Unit-area patterns of every phase, (N, n_phases, M) float32, fast path."""
        size_nm = np.atleast_2d(np.asarray(size_nm, float))
        n = size_nm.shape[0]
        out = np.empty((n, len(self.names), self.two_theta.size), np.float32)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            out[sl] = self._to_grid(self._spectra(lattice, size_nm, sl))
        return out

    def fast_patterns(self, scale: np.ndarray, lattice: dict, size_nm: np.ndarray,
                      chunk: int = 256) -> np.ndarray:
        """Noise-free patterns (N, M) float32 from the fast path."""
        import torch

        scale = np.atleast_2d(np.asarray(scale, np.float32))
        size_nm = np.atleast_2d(np.asarray(size_nm, float))
        n = scale.shape[0]
        out = np.empty((n, self.two_theta.size), np.float32)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            spec = self._spectra(lattice, size_nm, sl)
            weights = torch.from_numpy(scale[sl])[..., None].to(spec.dtype)
            out[sl] = self._to_grid((spec * weights).sum(dim=1))
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

    def sample(self, n: int, rng: np.random.Generator, ranges: Ranges | None = None,
               exact: bool = False) -> Sample:
        """``n`` random noisy patterns with their truth, drawn from ``ranges``.

        ``exact=True`` evaluates every peak (slow; for test sets); the default is the
        batched fast path.
        """
        r = ranges or Ranges()
        p = len(self.names)
        present = rng.random((n, p)) < r.p_present
        none = ~present.any(axis=1)
        present[none, rng.integers(0, p, none.sum())] = True
        weight = rng.uniform(*r.weight, (n, p)) * present
        fraction = weight / weight.sum(axis=1, keepdims=True)
        lattice = {}
        for name in self.names:
            nom = self.peaks[name].nominal
            lattice[name] = nom * (1 + rng.uniform(-r.lattice_rel, r.lattice_rel, (n, nom.size)))
        size = rng.uniform(*r.size_nm, (n, p))
        total = np.exp(rng.uniform(np.log(r.counts[0]), np.log(r.counts[1]), n))
        bg_share = rng.uniform(0.0, r.background_max, n)
        scale = fraction * (total * (1 - bg_share))[:, None] * self.step
        if exact:
            expected = self.patterns(scale, lattice, size)
        else:
            expected = self.fast_patterns(scale, lattice, size).astype(np.float64)
        expected += self.background(n, total * bg_share / self.two_theta.size, rng)
        counts = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
        return Sample(counts=counts, scale=scale, fraction=fraction, size_nm=size,
                      lattice=lattice, present=present, total=total, background=bg_share,
                      names=list(self.names))

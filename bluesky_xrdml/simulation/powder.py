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

    def as_dict(self) -> dict:
        """Plain JSON-able form (a model card keeps the peak lists it was trained on)."""
        return {"name": self.name, "d": [round(float(v), 7) for v in self.d],
                "intensity": [round(float(v), 6) for v in self.intensity],
                "hkl": [list(h) for h in self.hkl], "a": self.a, "system": self.system,
                "lengths": list(self.lengths or (self.a,) * 3), "angles": list(self.angles)}

    @classmethod
    def from_dict(cls, d: dict) -> PeakList:
        return cls(name=d["name"], d=np.asarray(d["d"], float),
                   intensity=np.asarray(d["intensity"], float),
                   hkl=[tuple(h) for h in d["hkl"]], a=float(d["a"]), system=d["system"],
                   lengths=tuple(d["lengths"]), angles=tuple(d["angles"]))


def _bragg(wavelength: float, d: np.ndarray) -> np.ndarray:
    s = wavelength / (2.0 * d)
    with np.errstate(invalid="ignore"):
        return np.degrees(2.0 * np.arcsin(np.where(s <= 1.0, s, np.nan)))


def _three_index(hkl) -> tuple[int, int, int]:
    """(h, k, l) from pymatgen's (h, k, l) or hexagonal (h, k, i, l)."""
    hkl = tuple(int(i) for i in hkl)
    return (hkl[0], hkl[1], hkl[3]) if len(hkl) == 4 else hkl


def _laue_ops(system: str) -> np.ndarray:
    """Integer matrices (n, 3, 3) of the holohedral Laue group of a crystal system, acting
    on Miller indices as row vectors (hexagonal/trigonal: 3-index hexagonal axes)."""
    inv = -np.eye(3, dtype=int)
    gens = {
        "cubic": [[[0, 1, 0], [0, 0, 1], [1, 0, 0]], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]],
        "tetragonal": [[[0, 1, 0], [-1, 0, 0], [0, 0, 1]], [[1, 0, 0], [0, -1, 0], [0, 0, -1]]],
        "hexagonal": [[[1, -1, 0], [1, 0, 0], [0, 0, 1]], [[0, 1, 0], [1, 0, 0], [0, 0, 1]],
                      [[1, 0, 0], [0, 1, 0], [0, 0, -1]]],
        "orthorhombic": [[[-1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, -1, 0], [0, 0, 1]]],
        "monoclinic": [[[-1, 0, 0], [0, 1, 0], [0, 0, -1]]],
    }
    gens["trigonal"] = gens["hexagonal"]
    mats = [np.array(g, int) for g in gens.get(system, [])] + [inv]
    group = {np.eye(3, dtype=int).tobytes(): np.eye(3, dtype=int)}
    frontier = list(group.values())
    while frontier:  # closure under products with the generators
        new = []
        for m in frontier:
            for g in mats:
                prod = m @ g
                key = prod.tobytes()
                if key not in group:
                    group[key] = prod
                    new.append(prod)
        frontier = new
    return np.stack(list(group.values()))


def march_dollase_cos2(pk: PeakList, axis=(0, 0, 1)) -> list[np.ndarray]:
    """Per reflection of ``pk``: cos² of the angle between each symmetry-equivalent
    scattering vector and the preferred-orientation axis (the normal of plane ``axis``)."""
    lengths = np.asarray(pk.lengths or (pk.a,) * 3, float)
    cos = np.cos(np.radians(pk.angles))
    metric = np.outer(lengths, lengths) * np.array(
        [[1, cos[2], cos[1]], [cos[2], 1, cos[0]], [cos[1], cos[0], 1]])
    g_star = np.linalg.inv(metric)
    u = np.asarray(axis, float)
    uu = u @ g_star @ u
    ops = _laue_ops(pk.system)
    out = []
    for hkl in pk.hkl:
        h = np.array(_three_index(hkl), float)
        if not h.any():  # a reflection without indices (impurity banks): no texture
            out.append(np.array([]))
            continue
        eq = np.unique((ops @ h).reshape(-1, 3), axis=0)
        num = eq @ g_star @ u
        den = np.einsum("ij,jk,ik->i", eq, g_star, eq) * uu
        out.append(np.clip(num**2 / den, 0.0, 1.0))
    return out


def march_dollase(cos2: list[np.ndarray], r: np.ndarray) -> np.ndarray:
    """March-Dollase intensity factors (N, K) for March coefficients ``r`` (N,): per
    reflection the mean over its equivalents of (r² cos²α + sin²α / r)^(-3/2) (r = 1: none;
    r < 1: plates with the axis along the beam-sample normal, r > 1: needles)."""
    r = np.asarray(r, float).reshape(-1, 1)
    return np.stack([np.mean((r**2 * c + (1 - c) / r) ** -1.5, axis=1) if c.size
                     else np.ones(len(r)) for c in cos2], axis=1)


def capillary_absorption(two_theta: np.ndarray, mu_r) -> np.ndarray:
    """Relative transmission of a cylindrical (capillary) sample of μR ``mu_r`` at
    ``two_theta`` (degrees), normalised to 1 at 2θ = 0: the Hewat approximation
    T ∝ exp(-(1.7133 - 0.0368 sin²θ) μR + (0.0927 + 0.375 sin²θ) (μR)²), valid for μR ≲ 1.5
    (absorption takes more from low angles)."""
    s2 = np.sin(np.radians(np.asarray(two_theta, float)) / 2) ** 2
    m = np.asarray(mu_r, float)
    return np.exp(0.0368 * s2 * m + 0.375 * s2 * m**2)


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

    Instrument and sample effects (all off by default, the old training set):

    - ``zero_shift``: a 2θ zero offset uniform in ±this (degrees);
    - ``displacement``: a sample-displacement shift Δ2θ = s cos θ, s uniform in ±this (°);
    - ``debye_waller``: per phase an isotropic B uniform in [0, this] Å², intensities
      × exp(-B / 2d²) (thermal motion, and the intensity fall-off that absorption,
      polarisation and detector efficiency add towards high angle);
    - ``intensity_jitter``: per reflection a log-normal factor of this σ (preferred
      orientation, structure-factor errors of the model structure);
    - ``humps``: up to this share of the counts in 1-3 broad amorphous humps (glass,
      capillary, Kapton, liquid), FWHM 1-8°;
    - ``impurity`` with probability ``p_impurity``: up to this share of the counts in
      1-2 crystalline phases outside the model (random cells, see ``impurity_bank``);
    - ``preferred_orientation``: per phase a March-Dollase coefficient r, log-uniform in
      [1/(1 + this), 1 + this], texture along the normal of (001) (``march_dollase``);
    - ``absorption``: a capillary's μR uniform in [0, this] (``capillary_absorption``).
    """

    lattice_rel: float = 0.01
    size_nm: tuple[float, float] = (5.0, 100.0)
    counts: tuple[float, float] = (1e4, 1e6)
    background_max: float = 0.5
    p_present: float = 0.5
    weight: tuple[float, float] = (0.02, 1.0)
    zero_shift: float = 0.0
    displacement: float = 0.0
    debye_waller: float = 0.0
    intensity_jitter: float = 0.0
    humps: float = 0.0
    impurity: float = 0.0
    p_impurity: float = 0.5
    preferred_orientation: float = 0.0
    absorption: float = 0.0

    @classmethod
    def measured(cls, **kwargs) -> Ranges:
        """Ranges with the instrument and sample effects a measured pattern shows switched
        on (the defaults of ``xrdml train pqnet``)."""
        base = dict(zero_shift=0.01, displacement=0.01, debye_waller=1.5,
                    intensity_jitter=0.15, humps=0.3, impurity=0.15, p_impurity=0.4,
                    preferred_orientation=0.25, absorption=0.5)
        return cls(**{**base, **kwargs})

    @property
    def effects(self) -> bool:
        return any((self.zero_shift, self.displacement, self.debye_waller,
                    self.intensity_jitter, self.humps, self.impurity,
                    self.preferred_orientation, self.absorption))

    def as_dict(self) -> dict:
        return {"lattice_rel": self.lattice_rel, "size_nm": list(self.size_nm),
                "counts": list(self.counts), "background_max": self.background_max,
                "p_present": self.p_present, "weight": list(self.weight),
                "zero_shift": self.zero_shift, "displacement": self.displacement,
                "debye_waller": self.debye_waller, "intensity_jitter": self.intensity_jitter,
                "humps": self.humps, "impurity": self.impurity, "p_impurity": self.p_impurity,
                "preferred_orientation": self.preferred_orientation,
                "absorption": self.absorption,
                "size_distribution": "uniform", "counts_distribution": "log-uniform"}

    @classmethod
    def from_dict(cls, d: dict) -> Ranges:
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)


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
    impurity: np.ndarray | None = None  # (N,) share of the counts from phases outside

    @property
    def lattice_a(self) -> np.ndarray:
        """(N, n_phases) first free lattice parameter of every phase."""
        return np.stack([self.lattice[n][:, 0] for n in self.names], axis=1)


@dataclass
class Effects:
    """Per-pattern instrument/sample effects (None: off): ``shift`` (N,) zero shift in
    degrees, ``displacement`` (N,) coefficient of cos θ in degrees, ``b_factor`` (N, P) Å²,
    ``jitter`` name -> (N, K) intensity factors per reflection, ``march`` (N, P)
    March-Dollase r (texture along ``po_axis``), ``mu_r`` (N,) capillary μR."""

    shift: np.ndarray | None = None
    displacement: np.ndarray | None = None
    b_factor: np.ndarray | None = None
    jitter: dict | None = None
    march: np.ndarray | None = None
    mu_r: np.ndarray | None = None
    po_axis: tuple = (0, 0, 1)


class PowderSimulator:
    """Simulate powder patterns of a set of phases on a fixed 2θ grid.

    Parameters
    ----------
    phases : dict name -> pymatgen Structure (or None with ``peaks``)
    wavelength : Å
    two_theta : the detector's 2θ grid in degrees (uniformly spaced)
    instrument_fwhm : Gaussian instrumental FWHM in degrees, constant over 2θ (used when
        no ``instrument`` is given)
    instrument : ``simulation.instrument.Instrument``: beam lines (Kα1/Kα2), Caglioti
        profile, asymmetry, zero shift, e.g. from ``xrdml calibrate profile``
    peaks : dict name -> ``PeakList`` instead of structures (e.g. from a model card)
    """

    OVERSAMPLE = 2  # fine-grid points per grid step for the fast path
    OVERSAMPLE_EXACT = 4  # the same for asymmetric profiles in the exact path
    MARGIN = 1.0  # degrees beyond the grid whose peaks still count (their tails reach in)
    BANDS = 5  # profile widths are interpolated between this many points over the grid

    def __init__(
        self,
        phases: dict[str, Structure] | None,
        wavelength: float,
        two_theta: np.ndarray,
        instrument_fwhm: float = 0.03,
        instrument=None,
        peaks: dict[str, PeakList] | None = None,
    ):
        from .instrument import Instrument

        self.wavelength = float(wavelength)
        self.two_theta = np.asarray(two_theta, dtype=float)
        self.step = float(self.two_theta[1] - self.two_theta[0])
        self.instrument_fwhm = float(instrument_fwhm)
        if instrument is None:
            instrument = Instrument.constant(self.wavelength, self.instrument_fwhm)
        elif abs(instrument.wavelength - self.wavelength) > 1e-4:
            raise ValueError(f"instrument profile at λ = {instrument.wavelength} Å, simulator "
                             f"at {self.wavelength} Å")
        self.instrument = instrument
        tmax = min(180.0, float(self.two_theta[-1]) + 5.0)
        if peaks is None:
            self.peaks = {name: peak_list(s, self.wavelength, tmax, name=name)
                          for name, s in (phases or {}).items()}
        else:
            self.peaks = dict(peaks)
        self.names = list(self.peaks)
        self.nominal_a = np.array([self.peaks[n].a for n in self.names])
        self._fast: dict = {}
        self._bank: list[PeakList] | None = None
        self._po: dict = {}  # (phase, axis) -> March-Dollase cos² per reflection

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

    def _sticks(self, pk: PeakList, params: np.ndarray, effects: Effects | None, j: int,
                rows, name: str | None = None):  # name None: a cell outside the model
        """Positions (N, L·K) in degrees and intensities (N, L·K) of the reflections of
        ``pk`` for every beam line L, with the pattern's shifts and intensity factors."""
        d = pk.d_spacings(params) if name is not None else np.broadcast_to(
            pk.d, (len(params), pk.d.size))
        inten = np.broadcast_to(pk.intensity, d.shape).astype(float)
        if effects is not None:
            if effects.b_factor is not None:
                inten = inten * np.exp(-effects.b_factor[rows, j, None] / (2 * d**2))
            if effects.jitter is not None and name in effects.jitter:
                inten = inten * effects.jitter[name][rows]
            if effects.march is not None and name is not None:
                key = (name, tuple(effects.po_axis))
                if key not in self._po:
                    self._po[key] = march_dollase_cos2(pk, effects.po_axis)
                inten = inten * march_dollase(self._po[key], effects.march[rows, j])
        pos, wts = [], []
        for lam, ratio in self.instrument.lines:
            p = _bragg(lam, d) + self.instrument.zero
            w = inten * ratio
            if effects is not None:
                if effects.mu_r is not None:
                    w = w * capillary_absorption(p, effects.mu_r[rows, None])
                if effects.shift is not None:
                    p = p + effects.shift[rows, None]
                if effects.displacement is not None:
                    p = p + effects.displacement[rows, None] * np.cos(np.radians(p) / 2)
            pos.append(p)
            wts.append(w)
        return np.concatenate(pos, axis=1), np.concatenate(wts, axis=1)

    def _widths(self, centers: np.ndarray, size_nm: np.ndarray):
        """Gaussian and Lorentzian FWHM and asymmetry τ at ``centers`` (degrees)."""
        inst = self.instrument
        c = np.nan_to_num(centers, nan=float(self.two_theta[0]))
        fl = inst.fwhm_l(c) + scherrer_fwhm(c, size_nm, self.wavelength)
        return inst.fwhm_g(c), fl, inst.tau(c)

    def phase_pattern(self, name: str, a: np.ndarray | float, size_nm: np.ndarray | float,
                      effects: Effects | None = None, rows=None, chunk: int = 32):
        """Unit-area pattern(s) of one phase: shape (N, M) for N lattice/size values, every
        reflection evaluated with its own width and asymmetry (exact).

        ``a``: the lattice parameter (N,), or for a phase with several free parameters
        (``free[name]``) an array (N, n_free).
        """
        pk = self.peaks[name]
        params = self._lattice(name, a)
        n = len(params)
        size = np.broadcast_to(np.asarray(size_nm, float).reshape(-1), (n,))
        rows = np.arange(n) if rows is None else np.asarray(rows)
        j = self.names.index(name) if name in self.names else 0
        out = np.zeros((n, self.two_theta.size))
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            out[sl] = self._exact(pk, params[sl], size[sl], effects, j, rows[sl], name)
        return out

    def _exact(self, pk, params, size, effects, j, rows, name):
        centers, weights = self._sticks(pk, params, effects, j, rows, name)
        lo, hi = self.two_theta[0] - self.MARGIN, self.two_theta[-1] + self.MARGIN
        keep = np.any(np.isfinite(centers) & (centers > lo) & (centers < hi), axis=0)
        centers, weights = centers[:, keep], np.nan_to_num(weights[:, keep])
        inside = np.isfinite(centers)
        weights = np.where(inside, weights, 0.0)
        centers = np.where(inside, centers, self.two_theta[0])
        fg, fl, tau = self._widths(centers, size[:, None])
        if not np.any(np.abs(tau) > 1e-6):
            profiles = pseudo_voigt(self.two_theta, centers, fg, fl)
            pattern = np.einsum("nkm,nk->nm", profiles, weights)
        else:  # asymmetric: each reflection on a 4× finer grid, its exponential tail applied
            from .instrument import exp_tail

            o = self.OVERSAMPLE_EXACT
            h = self.step / o
            fine = self.two_theta[0] + h * np.arange((self.two_theta.size - 1) * o + 1)
            pattern = np.zeros((len(centers), fine.size))
            for k in range(centers.shape[1]):
                prof = pseudo_voigt(fine, centers[:, k], fg[:, k], fl[:, k])  # (n, F)
                # τ changes by < 1e-4° over a ±1 % strain: one tail for the reflection
                pattern += weights[:, k, None] * exp_tail(prof, h, float(np.median(tau[:, k])))
            pattern = pattern[:, ::o]
        norm = pattern.sum(axis=1, keepdims=True) * self.step
        return pattern / np.where(norm > 0, norm, 1.0)

    def patterns(self, scale: np.ndarray, a, size_nm: np.ndarray, fast: bool = False,
                 effects: Effects | None = None):
        """Noise-free patterns: ``scale``, ``a``, ``size_nm`` of shape (N, n_phases) -> (N, M).

        ``a`` may also be a dict name -> (N, n_free) for phases with several free
        parameters. ``fast=True`` uses the batched Fourier path (see the module docstring).
        """
        scale, size = (np.atleast_2d(np.asarray(v, float)) for v in (scale, size_nm))
        lattice = self._lattice_dict(a, len(scale))
        if fast:
            return self.fast_patterns(scale, lattice, size, effects=effects)
        out = np.zeros((scale.shape[0], self.two_theta.size))
        for j, name in enumerate(self.names):
            present = scale[:, j] > 0
            if present.any():
                rows = np.nonzero(present)[0]
                out[present] += scale[present, j, None] * self.phase_pattern(
                    name, lattice[name][present], size[present, j], effects, rows)
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
        lo, hi = self.two_theta[0], self.two_theta[-1]
        # widths and asymmetry change fastest at low angle: band points spaced geometrically
        bands = (np.geomspace(lo, hi, self.BANDS) if lo > 0
                 else np.linspace(lo, hi, self.BANDS))
        self._fast = {"o": o, "h": h, "x0": x0, "length": length,
                      "first": margin_steps * o, "bands": bands}
        return self._fast

    def _phase_spectrum(self, pk, params, size, effects, j, rows, name):
        """Fourier spectrum (nb, F') of unit-area patterns of one phase on the fine grid.

        Each reflection is a stick shared between the two nearest of ``BANDS`` points over
        the grid (linear weights); each band point has its profile (Caglioti, Scherrer and
        asymmetry at that 2θ), applied as a product in Fourier space."""
        pos, inten = self._sticks(pk, params, effects, j, rows, name)
        return self._stick_spectrum(pos, inten, size)

    def _stick_spectrum(self, pos: np.ndarray, inten: np.ndarray, size: np.ndarray):
        """Fourier spectrum (nb, F') of unit-area patterns made of reflections at ``pos``
        (nb, K) degrees with intensities ``inten`` (nb, K), crystallite sizes ``size``
        (nb,)."""
        import torch
        from scipy.special import erf

        f = self._fast_setup()
        bands = f["bands"]
        nb = len(pos)
        inside = np.isfinite(pos) & (pos > self.two_theta[0] - self.MARGIN) & (
            pos < self.two_theta[-1] + self.MARGIN)
        inten = np.where(inside, np.nan_to_num(inten), 0.0)
        pos = np.where(inside, pos, self.two_theta[0])
        # the share of each peak's area on the grid (its own widths): the normalisation
        fg, fl, _ = self._widths(pos, size[:, None])
        fwhm, eta = tch(fg, fl)
        edges = (self.two_theta[0] - self.step / 2, self.two_theta[-1] + self.step / 2)
        hw = fwhm / 2
        sig = fwhm / (2 * np.sqrt(2 * np.log(2)))
        lor = (np.arctan((edges[1] - pos) / hw) - np.arctan((edges[0] - pos) / hw)) / np.pi
        gau = 0.5 * (erf((edges[1] - pos) / (sig * np.sqrt(2)))
                     - erf((edges[0] - pos) / (sig * np.sqrt(2))))
        norm = (inten * (eta * lor + (1 - eta) * gau)).sum(axis=1)
        # sticks on the fine grid, split between neighbouring bands
        u = (pos - f["x0"]) / f["h"]
        i0 = np.floor(u).astype(np.int64)
        w = u - i0
        nbands = len(bands)
        ub = np.clip(np.interp(pos, bands, np.arange(nbands)), 0, nbands - 1)
        b0 = np.minimum(np.floor(ub).astype(np.int64), max(nbands - 2, 0))
        wb = ub - b0 if nbands > 1 else np.zeros_like(ub)
        sticks = torch.zeros(nb, nbands * f["length"], dtype=torch.float32)
        for db, bw in ((0, 1 - wb), (1, wb)):
            if nbands == 1 and db == 1:
                continue
            base = (b0 + db) * f["length"]
            for di, ww in ((0, 1 - w), (1, w)):
                sticks.scatter_add_(1, torch.from_numpy(base + i0 + di),
                                    torch.from_numpy((inten * bw * ww).astype(np.float32)))
        sticks = sticks.view(nb, nbands, f["length"])
        # band profiles
        bfg, bfl, btau = self._widths(np.broadcast_to(bands, (nb, nbands)), size[:, None])
        bfwhm, beta = tch(bfg, bfl)
        f_cut = 16.0 / (np.pi * bfwhm.min())  # exp(-π fwhm f) < 1e-6 beyond
        n_freq = min(f["length"] // 2 + 1, int(f_cut * f["length"] * f["h"]) + 2)
        freq = torch.arange(n_freq, dtype=torch.float32) / (f["length"] * f["h"])
        fwhm_t = torch.from_numpy(bfwhm.astype(np.float32))[..., None]  # (nb, B, 1)
        eta_t = torch.from_numpy(beta.astype(np.float32))[..., None]
        lor_ft = torch.exp(-torch.pi * fwhm_t * freq)
        sigma2 = (fwhm_t / (2 * math.sqrt(2 * math.log(2)))) ** 2
        gau_ft = torch.exp(-2 * torch.pi**2 * sigma2 * freq**2)
        prof = (eta_t * (lor_ft - gau_ft) + gau_ft).to(torch.complex64)
        if np.any(np.abs(btau) > 1e-6):
            tau_t = torch.from_numpy(btau.astype(np.float32))[..., None]
            prof = prof / (1 - 2j * torch.pi * freq * tau_t)
        spec = (torch.fft.rfft(sticks, dim=-1)[..., :n_freq] * prof).sum(dim=1)
        norm_t = torch.from_numpy(norm.astype(np.float32)).clamp_min(1e-30)[:, None]
        return spec / (norm_t * f["h"])

    def _spectra(self, lattice: dict, size_nm: np.ndarray, sl: slice,
                 effects: Effects | None = None):
        """Fourier spectra (nb, n_phases, F) of the unit-area phase patterns on the fine
        grid."""
        import torch

        rows = np.arange(sl.start, sl.stop)
        specs = [self._phase_spectrum(self.peaks[n], lattice[n][sl], size_nm[sl, j], effects,
                                      j, rows, n) for j, n in enumerate(self.names)]
        n_freq = max(s.shape[-1] for s in specs)
        return torch.stack([torch.nn.functional.pad(s, (0, n_freq - s.shape[-1]))
                            for s in specs], dim=1)

    def _to_grid(self, spec):
        import torch

        f = self._fast_setup()
        fine = torch.fft.irfft(spec, n=f["length"], dim=-1)
        m = self.two_theta.size
        return fine[..., f["first"]: f["first"] + (m - 1) * f["o"] + 1: f["o"]].numpy()

    def fast_phase_patterns(self, lattice: dict, size_nm: np.ndarray, chunk: int = 128,
                            effects: Effects | None = None):
        """Unit-area patterns of every phase, (N, n_phases, M) float32, fast path."""
        size_nm = np.atleast_2d(np.asarray(size_nm, float))
        n = size_nm.shape[0]
        out = np.empty((n, len(self.names), self.two_theta.size), np.float32)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            out[sl] = self._to_grid(self._spectra(lattice, size_nm, sl, effects))
        return out

    def fast_patterns(self, scale: np.ndarray, lattice: dict, size_nm: np.ndarray,
                      chunk: int = 128, effects: Effects | None = None) -> np.ndarray:
        """Noise-free patterns (N, M) float32 from the fast path."""
        import torch

        scale = np.atleast_2d(np.asarray(scale, np.float32))
        size_nm = np.atleast_2d(np.asarray(size_nm, float))
        n = scale.shape[0]
        out = np.empty((n, self.two_theta.size), np.float32)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            spec = self._spectra(lattice, size_nm, sl, effects)
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

    def humps(self, n: int, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """1-3 broad Gaussian humps per pattern (amorphous scatter), ``counts`` (N,) in all."""
        tt = self.two_theta
        out = np.zeros((n, tt.size))
        k = rng.integers(1, 4, n)
        for i in range(3):
            on = k > i
            c = rng.uniform(tt[0] - 2, tt[-1], n)
            w = rng.uniform(1.0, 8.0, n) / 2.3548
            h = rng.uniform(0.2, 1.0, n) * on
            out += h[:, None] * np.exp(-0.5 * ((tt - c[:, None]) / w[:, None]) ** 2)
        total = out.sum(axis=1, keepdims=True)
        return out / np.where(total > 0, total, 1.0) * np.asarray(counts).reshape(-1, 1)

    def impurity_bank(self, n: int = 48, seed: int = 7) -> list[PeakList]:
        """Peak lists of ``n`` random crystalline phases outside the model: random cubic,
        tetragonal, hexagonal and orthorhombic cells (3-12 Å) with random reflection
        intensities; a cell whose strong lines mostly coincide with a model phase's is
        redrawn."""
        if self._bank is not None:
            return self._bank
        rng = np.random.default_rng(seed)
        tmax = float(self.two_theta[-1]) + self.MARGIN
        d_min = self.wavelength / (2 * np.sin(np.radians(min(tmax, 179.0)) / 2))
        model_pos = np.concatenate([pk.two_theta(self.wavelength) for pk in self.peaks.values()]
                                   or [np.array([])])
        model_pos = model_pos[np.isfinite(model_pos)]
        tol = 2 * float(np.median(self.instrument.fwhm_g(self.two_theta)))
        bank = []
        while len(bank) < n:
            system = rng.choice(["cubic", "tetragonal", "hexagonal", "orthorhombic"])
            a = rng.uniform(3, 12)
            c = a if system == "cubic" else rng.uniform(3, 12)
            b = rng.uniform(3, 12) if system == "orthorhombic" else a
            hmax = int(max(a, b, c) / d_min) + 1
            idx = np.arange(-hmax, hmax + 1)
            hkl = np.stack(np.meshgrid(idx[idx >= 0], idx, idx, indexing="ij"), -1).reshape(-1, 3)
            hkl = hkl[[tuple(v) > (0, 0, 0) for v in hkl]][:20000]
            if system == "hexagonal":
                inv_d2 = 4 / 3 * (hkl[:, 0]**2 + hkl[:, 0] * hkl[:, 1] + hkl[:, 1]**2) / a**2 \
                    + hkl[:, 2]**2 / c**2
            else:
                inv_d2 = (hkl[:, 0] / a) ** 2 + (hkl[:, 1] / b) ** 2 + (hkl[:, 2] / c) ** 2
            d = 1 / np.sqrt(inv_d2)
            keep = d >= d_min
            d = np.unique(np.round(d[keep], 4))[::-1]
            if d.size == 0:
                continue
            d = d[rng.random(d.size) < rng.uniform(0.3, 0.9)]  # systematic absences
            if d.size < 3:
                continue
            inten = rng.exponential(1.0, d.size) * np.exp(-rng.uniform(0, 2) / (2 * d**2))
            pos = _bragg(self.wavelength, d)
            strong = pos[np.argsort(inten)[::-1][:5]]
            strong = strong[np.isfinite(strong)]
            if model_pos.size and strong.size and np.mean(
                    np.min(np.abs(strong[:, None] - model_pos[None]), axis=1) < tol) >= 0.5:
                continue
            bank.append(PeakList(name=f"impurity{len(bank)}", d=d, intensity=inten,
                                 hkl=[(0, 0, 0)] * d.size, a=float(a), system="cubic",
                                 lengths=(a, a, a)))
        self._bank = bank
        return bank

    def impurity_patterns(self, n: int, counts: np.ndarray, rng: np.random.Generator,
                          effects: Effects | None = None, chunk: int = 128) -> np.ndarray:
        """Patterns (N, M) of 1-2 phases from ``impurity_bank`` with ``counts`` (N,) in all
        (random sizes 10-100 nm; the same instrument and shifts as the pattern; fast path)."""
        bank = self.impurity_bank()
        counts = np.asarray(counts, float).reshape(-1)
        kmax = max(pk.d.size for pk in bank) * len(self.instrument.lines)
        pos = np.full((n, 2 * kmax), float(self.two_theta[0]))
        inten = np.zeros((n, 2 * kmax))
        on = counts > 0
        for slot, use in enumerate((on, on & (rng.random(n) < 0.4))):
            choice = rng.integers(0, len(bank), n)
            share = rng.uniform(0.3, 1.0, n)
            for b in np.unique(choice[use]):
                rows = np.nonzero(use & (choice == b))[0]
                pk = bank[b]
                p_, w_ = self._sticks(pk, np.full((rows.size, 1), pk.a), effects, 0, rows)
                w_ = np.where(np.isfinite(p_), w_, 0.0)
                w_ = w_ / np.clip(w_.sum(axis=1, keepdims=True), 1e-30, None)
                cols = slice(slot * kmax, slot * kmax + p_.shape[1])
                pos[rows, cols] = np.nan_to_num(p_, nan=float(self.two_theta[0]))
                inten[rows, cols] = w_ * share[rows, None]
        size = rng.uniform(10, 100, n)
        out = np.zeros((n, self.two_theta.size))
        idx = np.nonzero(on)[0]
        for start in range(0, idx.size, chunk):
            r = idx[start:start + chunk]
            out[r] = self._to_grid(self._stick_spectrum(pos[r], inten[r], size[r]))
        out = np.clip(out, 0, None)
        total = out.sum(axis=1, keepdims=True)
        return out / np.where(total > 0, total, 1.0) * counts.reshape(-1, 1)

    def noisy(self, expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson counting noise on expected counts."""
        return rng.poisson(np.clip(expected, 0, None)).astype(np.float64)

    def draw_effects(self, n: int, rng: np.random.Generator, r: Ranges) -> Effects | None:
        if not (r.zero_shift or r.displacement or r.debye_waller or r.intensity_jitter
                or r.preferred_orientation or r.absorption):
            return None
        eff = Effects()
        if r.zero_shift:
            eff.shift = rng.uniform(-r.zero_shift, r.zero_shift, n)
        if r.displacement:
            eff.displacement = rng.uniform(-r.displacement, r.displacement, n)
        if r.debye_waller:
            eff.b_factor = rng.uniform(0.0, r.debye_waller, (n, len(self.names)))
        if r.intensity_jitter:
            eff.jitter = {name: np.exp(r.intensity_jitter * rng.standard_normal(
                (n, self.peaks[name].d.size))) for name in self.names}
        if r.preferred_orientation:
            lim = np.log1p(r.preferred_orientation)
            eff.march = np.exp(rng.uniform(-lim, lim, (n, len(self.names))))
        if r.absorption:
            eff.mu_r = rng.uniform(0.0, r.absorption, n)
        return eff

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
        hump_share = rng.uniform(0.0, r.humps, n) if r.humps else np.zeros(n)
        imp_share = np.zeros(n)
        if r.impurity:
            imp_share = rng.uniform(0.0, r.impurity, n) * (rng.random(n) < r.p_impurity)
        phase_share = np.clip(1 - bg_share - hump_share - imp_share, 0.05, None)
        scale = fraction * (total * phase_share)[:, None] * self.step
        effects = self.draw_effects(n, rng, r)
        if exact:
            expected = self.patterns(scale, lattice, size, effects=effects)
        else:
            expected = self.fast_patterns(scale, lattice, size,
                                          effects=effects).astype(np.float64)
        expected += self.background(n, total * bg_share / self.two_theta.size, rng)
        if r.humps:
            expected += self.humps(n, total * hump_share, rng)
        if r.impurity:
            expected += self.impurity_patterns(n, total * imp_share, rng, effects)
        counts = rng.poisson(np.clip(expected, 0, None)).astype(np.float32)
        return Sample(counts=counts, scale=scale, fraction=fraction, size_nm=size,
                      lattice=lattice, present=present, total=total, background=bg_share,
                      names=list(self.names), impurity=imp_share)


"""A simulated operando experiment: an NMC | graphite cell cycling in the beam.

Plain numpy/pymatgen; the ophyd devices (``devices/cell.py``, ``devices/operando.py``) and the
plan (``plans/operando.py``) drive these classes, and training uses them directly.

**The cell** (``CellModel``): state of charge ``s`` in [0, 1] moves at ±C/3600 per second
under constant current (C-rate ``C``). Terminal voltage::

    V = OCV(s) + σ · (h + R · C)        σ = +1 charging, -1 discharging

with a smooth full-cell open-circuit curve ``ocv`` (3.07 V at s = 0, 4.20 V at s = 1), a
rate-independent hysteresis ``h`` and an ohmic/charge-transfer polarisation ``R · C``.
Charge stops at ``v_max`` (4.2 V) and discharge at ``v_min`` (3.0 V), so a faster cell
reaches a smaller range of ``s``.

**The electrodes**: Li content of the cathode ``x_NMC = 1 - 0.66 s`` and of the anode
``x_C = 0.02 + 0.95 s_g`` (``x_C = 1`` is LiC6). ``s_g`` follows ``s`` through a play
(backlash) hysteresis of half-width ``graphite_play``: graphite staging lags behind on
charge and on discharge. Particles do not all hold the same state: at C-rate ``C`` their
states spread by ``inhomogeneity · C`` around the mean, with a skewed (exponential) spread
whose long tail points the way the current drives them; the pattern is the average of
``particles`` sub-patterns.

**The structures** (pymatgen, built in code):

- NMC111, LiNi1/3Mn1/3Co1/3O2, R-3m: ``a`` and ``c`` follow ``x_NMC`` as published for
  NMC111 (e.g. Yin et al., Chem. Mater. 18, 1901 (2006); Kondrakov et al., J. Phys. Chem. C
  121, 3286 (2017)): ``a`` falls about linearly from 2.862 Å (x = 1) to 2.820 Å (x = 0.34);
  ``c`` grows from 14.23 Å to 14.47 Å at x ≈ 0.5 and collapses slightly below.
- graphite (P6₃/mmc) whose layer spacing widens continuously over the dilute and higher
  stages, from d002 = 3.355 Å (x_C = 0) to 3.53 Å (x_C = 0.5); then a two-phase region of
  LiC12 (stage 2, d002 = 3.53 Å) and LiC6 (stage 1, d001 = 3.706 Å), LiC6 share
  ``2 x_C - 1``.
- Al (Fm-3m, a = 4.0495 Å) from the current collector, which never moves.

Peak positions and intensities come from ``simulation.powder`` (pymatgen's
``XRDCalculator`` once per phase; strained cells through ``PeakList``), profiles are its
Thompson-Cox-Hastings pseudo-Voigts. Each phase pattern has unit area over the 2θ grid;
``weights`` sets each phase's integrated counts share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Lattice, Structure

from .powder import PowderSimulator

CU_KA = 1.5406  # Å
DEFAULT_TWO_THETA = (16.0, 42.0, 1301)  # degrees, linspace; Cu Kα: Q 1.14-2.95 Å⁻¹
MODES = ("charge", "discharge")
RATES = (1.0, 0.2)  # C-rates of the demo: 1 C and C/5


def rate_label(rate: float) -> str:
    """``1.0`` → ``"1C"``, ``0.2`` → ``"0.2C"``."""
    return f"{float(rate):g}C"


# --- the cell -------------------------------------------------------------------------
def ocv(s):
    """Full-cell open-circuit voltage (V) of an NMC111 | graphite cell at state of charge ``s``."""
    s = np.asarray(s, float)
    return 3.42 + 0.72 * s - 0.35 * np.exp(-s / 0.04) + 0.06 * np.exp((s - 1.0) / 0.03)


@dataclass
class CellParameters:
    """Everything the cell model's behaviour depends on (recorded in model cards)."""

    hysteresis_v: float = 0.010  # V, rate-independent half-gap between charge and discharge
    resistance_v_per_c: float = 0.080  # V per C of rate: polarisation R · C
    v_min: float = 3.0
    v_max: float = 4.2
    graphite_play: float = 0.03  # half-width of the staging hysteresis, in state of charge
    inhomogeneity: float = 0.15  # particle-state spread per C of rate, in state of charge
    particles: int = 7  # sub-states averaged into one pattern

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CellState:
    """What the cell is doing at one instant."""

    time: float  # s since the start
    soc: float
    soc_graphite: float  # s_g: the staging state (play hysteresis of soc)
    mode: str  # "charge" / "discharge" / "rest"
    rate: float  # C-rate (0 at rest)
    voltage: float
    cycle: int


class CellModel:
    """Constant-current cycling with hysteresis and rate-dependent polarisation.

    ``set_current(mode, rate)`` chooses what the cell does; ``step(dt)`` advances the clock
    by ``dt`` seconds (never past a voltage cut-off: it stops there and ``at_cutoff`` turns
    True). ``state()`` is the reading now.
    """

    def __init__(self, params: CellParameters | None = None, soc: float = 0.0):
        self.p = params or CellParameters()
        self.time = 0.0
        self.soc = float(soc)
        self.soc_graphite = float(soc)
        self.mode, self.rate = "rest", 0.0
        self.cycle = 0
        self.at_cutoff = False

    def sign(self, mode: str | None = None) -> float:
        mode = mode or self.mode
        return {"charge": 1.0, "discharge": -1.0}.get(mode, 0.0)

    def voltage(self, soc=None, mode: str | None = None, rate: float | None = None):
        s = self.soc if soc is None else soc
        rate = self.rate if rate is None else rate
        return ocv(s) + self.sign(mode) * (self.p.hysteresis_v + self.p.resistance_v_per_c * rate)

    def set_current(self, mode: str, rate: float) -> None:
        if mode not in (*MODES, "rest"):
            raise ValueError(f"mode must be 'charge', 'discharge' or 'rest', not {mode!r}")
        if rate < 0:
            raise ValueError(f"C-rate must be ≥ 0, not {rate}")
        self.mode, self.rate = mode, float(rate) if mode != "rest" else 0.0
        self.at_cutoff = self._beyond_cutoff(self.soc)

    def _beyond_cutoff(self, soc: float) -> bool:
        v = float(self.voltage(soc))
        if self.mode == "charge":
            return v >= self.p.v_max or soc >= 1.0
        if self.mode == "discharge":
            return v <= self.p.v_min or soc <= 0.0
        return False

    def step(self, dt: float) -> CellState:
        if self.mode != "rest" and not self.at_cutoff:
            target = self.soc + self.sign() * self.rate * dt / 3600.0
            if self._beyond_cutoff(target):
                lo, hi = sorted((self.soc, float(np.clip(target, 0.0, 1.0))))
                for _ in range(40):  # bisection for the cut-off
                    mid = 0.5 * (lo + hi)
                    beyond = self._beyond_cutoff(mid)
                    if (self.mode == "charge") == beyond:
                        hi = mid
                    else:
                        lo = mid
                target = hi if self.mode == "charge" else lo
                dt = abs(target - self.soc) * 3600.0 / max(self.rate, 1e-12)
                self.at_cutoff = True
            self.soc = float(np.clip(target, 0.0, 1.0))
            g = self.p.graphite_play
            self.soc_graphite = float(np.clip(self.soc_graphite, self.soc - g, self.soc + g))
        self.time += dt
        return self.state()

    def state(self) -> CellState:
        return CellState(self.time, self.soc, self.soc_graphite, self.mode, self.rate,
                         float(self.voltage()), self.cycle)


def cycling_protocol(cycles: int, rates) -> list[tuple[float, float]]:
    """``rates`` (one C-rate per cycle, or one ``(charge, discharge)`` pair per cycle; a
    shorter list repeats) → ``cycles`` pairs (charge C-rate, discharge C-rate)."""
    rates = list(rates)
    if not rates:
        raise ValueError("rates: give at least one C-rate")
    out = []
    for i in range(int(cycles)):
        r = rates[i % len(rates)]
        pair = (float(r), float(r)) if np.isscalar(r) else tuple(float(v) for v in r)
        if len(pair) != 2 or min(pair) <= 0:
            raise ValueError(f"rates: {r!r} is neither a C-rate > 0 nor a (charge, discharge) pair")
        out.append(pair)
    return out


def simulate_cycling(cycles: int, rates, interval: float = 60.0, jitter: float = 0.5,
                     params: CellParameters | None = None, seed: int = 0) -> list[CellState]:
    """The states at which patterns are recorded over ``cycles`` charge/discharge cycles,
    one every ``interval`` s of cell time (× a random factor in 1 ± jitter/2). The same
    sequence of calls the ``operando`` plan makes, without a RunEngine."""
    rng = np.random.default_rng(seed)
    cell = CellModel(params)
    states = []
    for i, (rc, rd) in enumerate(cycling_protocol(cycles, rates)):
        cell.cycle = i
        for mode, rate in (("charge", rc), ("discharge", rd)):
            cell.set_current(mode, rate)
            while not cell.at_cutoff:
                states.append(cell.step(interval * (1 + jitter * (rng.random() - 0.5))))
    return states


# --- the structures and patterns ----------------------------------------------------------
def nmc_lattice(x):
    """NMC111 hexagonal ``(a, c)`` in Å at Li content ``x`` (1 = discharged)."""
    x = np.asarray(x, float)
    a = 2.862 - 0.0636 * (1.0 - x)
    # c grows to x ≈ 0.5 and collapses slightly below; a smooth blend of the two lines
    t = 0.5 - x
    up = 14.23 + 0.47 * (1.0 - x)
    down = 14.465 - 0.30 * t
    w = 1.0 / (1.0 + np.exp(-t / 0.02))  # 0 above x = 0.5, 1 below
    c = (1 - w) * up + w * down
    return a, c


def operando_structures(x_nmc: float = 1.0) -> dict[str, Structure]:
    """NMC111 (at Li content ``x_nmc``), graphite, LiC12, LiC6 and Al as pymatgen structures."""
    a, c = nmc_lattice(x_nmc)
    tm = {"Ni": 1 / 3, "Mn": 1 / 3, "Co": 1 / 3}
    nmc = Structure.from_spacegroup(
        "R-3m", Lattice.hexagonal(float(a), float(c)),
        [{"Li": float(x_nmc)}, tm, "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.2587]])
    graphite = Structure.from_spacegroup(
        "P6_3/mmc", Lattice.hexagonal(2.464, 6.710), ["C", "C"],
        [[0, 0, 0.25], [1 / 3, 2 / 3, 0.25]])
    lic12 = Structure.from_spacegroup(
        "P6/mmm", Lattice.hexagonal(4.288, 7.060), ["Li", "C"], [[0, 0, 0], [1 / 3, 0, 0.25]])
    lic6 = Structure.from_spacegroup(
        "P6/mmm", Lattice.hexagonal(4.305, 3.706), ["Li", "C"], [[0, 0, 0], [1 / 3, 0, 0.5]])
    al = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.0495), ["Al"], [[0, 0, 0]])
    return {"NMC": nmc, "graphite": graphite, "LiC12": lic12, "LiC6": lic6, "Al": al}


def graphite_state(x_c):
    """Anode at Li content ``x_c`` (1 = LiC6) → (graphite-like c in Å, LiC12 share, LiC6
    share); the graphite-like share is what is left."""
    x = np.clip(np.asarray(x_c, float), 0.0, 1.0)
    d002 = 3.355 + (3.53 - 3.355) * np.clip(x / 0.5, 0.0, 1.0)
    lic6 = np.clip(2 * x - 1, 0.0, 1.0)
    lic12 = np.where(x >= 0.5, 1.0 - lic6, 0.0)
    return 2 * d002, lic12, lic6


@dataclass
class PatternSettings:
    """The detector and the sample as the detector sees them."""

    wavelength: float = CU_KA
    two_theta: tuple[float, float, int] = DEFAULT_TWO_THETA
    instrument_fwhm: float = 0.08  # degrees (Gaussian)
    size_nm: dict = field(default_factory=lambda: {
        "NMC": 120.0, "graphite": 80.0, "LiC12": 80.0, "LiC6": 80.0, "Al": 200.0})
    weights: dict = field(default_factory=lambda: {"NMC": 1.0, "carbon": 0.7, "Al": 0.35})
    counts: float = 2e5  # integrated diffracted counts of a pattern
    background: float = 0.4  # share of the counts in the smooth background

    def as_dict(self) -> dict:
        return {**self.__dict__, "two_theta": list(self.two_theta)}


class OperandoPatterns:
    """Patterns of the cell at given states, on ``settings.two_theta`` at any wavelength."""

    CHUNK = 512

    def __init__(self, settings: PatternSettings | None = None,
                 params: CellParameters | None = None):
        self.settings = settings or PatternSettings()
        self.params = params or CellParameters()
        st = self.settings
        self.two_theta = np.linspace(*st.two_theta)
        self.sim = PowderSimulator(operando_structures(), st.wavelength, self.two_theta,
                                   instrument_fwhm=st.instrument_fwhm)
        size = st.size_nm
        self._fixed = {n: self.sim.phase_pattern(n, self.sim.peaks[n].nominal[None], size[n])[0]
                       for n in ("LiC12", "LiC6", "Al")}
        # the long tail of a particle-state spread points along the current (skewed)
        k = self.params.particles
        q = -np.log(1.0 - (np.arange(k) + 0.5) / k)
        self._spread = (q - q.mean()) / q.std()

    @property
    def wavelength(self) -> float:
        return self.settings.wavelength

    def particle_states(self, soc, soc_graphite, sign, rate):
        """(N, particles) states of charge of the cathode and of the anode particles."""
        spread = self.params.inhomogeneity * np.asarray(rate, float)[:, None] * \
            np.asarray(sign, float)[:, None] * self._spread[None, :]
        s = np.clip(np.asarray(soc, float)[:, None] + spread, 0.0, 1.0)
        g = np.clip(np.asarray(soc_graphite, float)[:, None] + spread, 0.0, 1.0)
        return s, g

    def expected(self, soc, soc_graphite, sign, rate) -> np.ndarray:
        """Noise-free patterns (N, M) of integrated counts ``settings.counts`` (diffraction)
        without background."""
        n = len(np.atleast_1d(soc))
        out = np.zeros((n, self.two_theta.size))
        for start in range(0, n, self.CHUNK):
            sl = slice(start, min(n, start + self.CHUNK))
            out[sl] = self._chunk(*(np.atleast_1d(v)[sl] for v in (soc, soc_graphite, sign,
                                                                    rate)))
        return out

    def _chunk(self, soc, soc_graphite, sign, rate):
        st = self.settings
        w = st.weights
        s, g = self.particle_states(soc, soc_graphite, sign, rate)
        n, k = s.shape
        a, c = nmc_lattice(1.0 - 0.66 * s.ravel())
        nmc = self.sim.phase_pattern("NMC", np.stack([a, c], 1), st.size_nm["NMC"])
        c_g, f12, f6 = graphite_state(0.02 + 0.95 * g.ravel())
        a_g = np.full_like(c_g, self.sim.peaks["graphite"].nominal[0])
        gra = self.sim.phase_pattern("graphite", np.stack([a_g, c_g], 1), st.size_nm["graphite"])
        carbon = ((1 - f12 - f6)[:, None] * gra + f12[:, None] * self._fixed["LiC12"]
                  + f6[:, None] * self._fixed["LiC6"])
        total = w["NMC"] + w["carbon"] + w["Al"]
        unit = (w["NMC"] * nmc + w["carbon"] * carbon).reshape(n, k, -1).mean(axis=1)
        unit = (unit + w["Al"] * self._fixed["Al"][None]) / total
        return st.counts * self.sim.step * unit

    def background(self, n: int, rng: np.random.Generator) -> np.ndarray:
        st = self.settings
        level = st.counts * st.background / (1 - st.background) / self.two_theta.size
        return self.sim.background(n, np.full(n, level), rng)

    def measure(self, soc, soc_graphite, sign, rate, rng: np.random.Generator) -> np.ndarray:
        """Poisson-noisy patterns (N, M) float32: diffraction + smooth background."""
        expected = self.expected(soc, soc_graphite, sign, rate)
        expected += self.background(len(expected), rng)
        return rng.poisson(np.clip(expected, 0, None)).astype(np.float32)

    def of_states(self, states: list[CellState], rng: np.random.Generator) -> np.ndarray:
        """Patterns of a list of ``CellState``."""
        sign = [{"charge": 1.0, "discharge": -1.0}.get(st.mode, 0.0) for st in states]
        return self.measure([st.soc for st in states], [st.soc_graphite for st in states],
                            sign, [st.rate for st in states], rng)


def two_theta_for_q(q_range: tuple[float, float], wavelength: float, n: int) -> np.ndarray:
    """A 2θ grid (degrees, n points) that covers momentum transfer ``q_range`` (Å⁻¹) at
    ``wavelength`` (Å): the same reflections at another wavelength."""
    s = np.asarray(q_range, float) * wavelength / (4 * np.pi)
    if s.max() >= 1.0:
        raise ValueError(f"Q up to {q_range[1]:.3g} Å⁻¹ is out of reach at λ = {wavelength} Å")
    lo, hi = np.degrees(2 * np.arcsin(s))
    return np.linspace(lo, hi, int(n))


@dataclass
class OperandoRun:
    """A simulated operando run as arrays: what training and benchmarks use."""

    patterns: np.ndarray  # (N, M) counts
    two_theta: np.ndarray  # (M,)
    wavelength: float
    voltage: np.ndarray
    mode: np.ndarray  # (N,) str
    rate: np.ndarray  # (N,) C-rate
    cycle: np.ndarray  # (N,) int
    time: np.ndarray
    soc: np.ndarray


def simulate_run(cycles: int, rates, *, interval: float = 60.0, seed: int = 0,
                 settings: PatternSettings | None = None,
                 params: CellParameters | None = None, first_cycle: int = 0,
                 patterns: OperandoPatterns | None = None) -> OperandoRun:
    """Cycle a cell ``cycles`` times at ``rates`` (see ``cycling_protocol``) and record a
    pattern every ``interval`` s: the operando plan's data, without a RunEngine."""
    pats = patterns or OperandoPatterns(settings, params)
    states = simulate_cycling(cycles, rates, interval, params=pats.params, seed=seed)
    rng = np.random.default_rng(seed + 7919)
    counts = pats.of_states(states, rng)
    return OperandoRun(
        patterns=counts, two_theta=pats.two_theta.copy(), wavelength=pats.wavelength,
        voltage=np.array([st.voltage for st in states]),
        mode=np.array([st.mode for st in states]),
        rate=np.array([st.rate for st in states]),
        cycle=np.array([st.cycle for st in states]) + first_cycle,
        time=np.array([st.time for st in states]),
        soc=np.array([st.soc for st in states]))


def moving_peaks(soc, wavelength: float) -> dict[str, np.ndarray]:
    """2θ (degrees) of the reflections that move with state of charge — NMC 003 and 101
    (hexagonal indices), the carbon 00l peak (graphite 002 / LiC12 002 / LiC6 001, whichever
    dominates) — and of Al 111, which does not; each (N,). Also NMC 012, which moves and
    overlaps Al 111 in the discharged state. For attention checks."""
    soc = np.asarray(soc, float)
    a, c = nmc_lattice(1.0 - 0.66 * soc)

    def tt(d):
        return np.degrees(2 * np.arcsin(wavelength / (2 * np.asarray(d, float))))

    d101 = 1.0 / np.sqrt(4 / (3 * a**2) + 1 / c**2)
    d012 = 1.0 / np.sqrt(4 / (3 * a**2) + 4 / c**2)
    c_g, f12, f6 = graphite_state(0.02 + 0.95 * soc)
    d_c = np.where(f6 > 0.5, 3.706, np.where(f12 > 0, 3.53, c_g / 2))
    return {"NMC 003": tt(c / 3), "NMC 101": tt(d101), "C 00l": tt(d_c),
            "Al 111": np.full_like(soc, tt(4.0495 / np.sqrt(3))),
            # weak, and at x_NMC ≈ 1 on top of Al 111 (d 2.339 vs 2.338 Å)
            "NMC 012": tt(d012)}

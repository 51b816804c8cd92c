"""The instrument seen in a powder pattern: beam spectrum, peak profile, 2θ offsets.

One definition, used by the simulator (``simulation.powder``), the calibration
(``analysis.calibrate``) and the model card:

- beam: a wavelength ``wavelength`` (Å), optionally a second line ``wavelength2`` with
  intensity ratio ``ratio2`` (lab Kα1/Kα2; synchrotron beams are monochromatic);
- peak profile: a Thompson-Cox-Hastings pseudo-Voigt whose Gaussian FWHM follows
  Caglioti, FWHM_G² = U tan²θ + V tanθ + W (degrees²), and whose Lorentzian FWHM is
  ``X / cos θ`` (instrumental) plus the sample's Scherrer size broadening;
- asymmetry: the pseudo-Voigt convolved with a one-sided exponential of signed length
  τ(2θ) = ``asym0 + asym1 / tan 2θ`` degrees (τ > 0: a tail towards low angles, as axial
  divergence gives; τ < 0: towards high angles, as detector parallax gives). The kernel's
  Fourier transform is 1 / (1 - 2πi f τ);
- zero shift ``zero`` (degrees, added to every measured 2θ).

Values come from a calibrant measurement (``xrdml calibrate profile``), saved as a small
JSON file that training reads (``--profile``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

# lab anodes: (Kα1, Kα2) in Å (Hölzer et al. 1997), Kα2/Kα1 intensity ratio ~0.5
ANODES = {"Cu": (1.540593, 1.544427), "Mo": (0.709317, 0.713607), "Co": (1.788965, 1.792850),
          "Fe": (1.936042, 1.939980), "Cr": (2.289760, 2.293663), "Ag": (0.559422, 0.563813)}


@dataclass(frozen=True)
class Instrument:
    """Beam spectrum, Caglioti profile, asymmetry and zero shift (see the module doc)."""

    wavelength: float
    U: float = 0.0
    V: float = 0.0
    W: float = 0.03**2
    X: float = 0.0
    asym0: float = 0.0
    asym1: float = 0.0
    zero: float = 0.0
    wavelength2: float | None = None
    ratio2: float = 0.5
    source: str = ""

    @classmethod
    def constant(cls, wavelength: float, fwhm: float = 0.03) -> Instrument:
        """A monochromatic beam and a constant Gaussian FWHM (degrees): the old default."""
        return cls(wavelength=float(wavelength), W=float(fwhm) ** 2)

    @classmethod
    def lab(cls, anode: str = "Cu", **kwargs) -> Instrument:
        """A lab tube's Kα1/Kα2 doublet, e.g. ``Instrument.lab("Cu", W=0.002)``."""
        try:
            k1, k2 = ANODES[anode]
        except KeyError:
            raise ValueError(f"unknown anode {anode!r}; one of {sorted(ANODES)}") from None
        return cls(wavelength=k1, wavelength2=k2, **kwargs)

    @property
    def lines(self) -> list[tuple[float, float]]:
        """(wavelength, relative intensity) of each line of the beam."""
        out = [(self.wavelength, 1.0)]
        if self.wavelength2:
            out.append((float(self.wavelength2), float(self.ratio2)))
        return out

    @property
    def lines_wavelengths(self) -> list[float]:
        return [lam for lam, _ in self.lines]

    def fwhm_g(self, two_theta) -> np.ndarray:
        """Instrumental Gaussian FWHM (degrees) at ``two_theta`` (Caglioti)."""
        t = np.tan(np.radians(np.asarray(two_theta, float)) / 2)
        return np.sqrt(np.clip(self.U * t**2 + self.V * t + self.W, 1e-8, None))

    def fwhm_l(self, two_theta) -> np.ndarray:
        """Instrumental Lorentzian FWHM (degrees) at ``two_theta``."""
        return self.X / np.cos(np.radians(np.asarray(two_theta, float)) / 2)

    def tau(self, two_theta) -> np.ndarray:
        """Signed length (degrees) of the asymmetry's exponential tail at ``two_theta``."""
        tt = np.clip(np.asarray(two_theta, float), 0.2, 179.8)
        return self.asym0 + self.asym1 / np.tan(np.radians(tt))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Instrument:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"instrument": self.as_dict(), **extra}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, wavelength: float | None = None) -> Instrument:
        """An instrument profile file written by ``xrdml calibrate profile``.

        ``wavelength``: check that the file was made at this wavelength (a profile
        measured at one energy does not transfer to another)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no instrument profile at {path} "
                                    "(make one with: xrdml calibrate profile CALIBRANT.xy)")
        data = json.loads(path.read_text())
        inst = cls.from_dict(data.get("instrument", data))
        if wavelength is not None and abs(inst.wavelength - float(wavelength)) > 1e-4:
            raise ValueError(f"{path} was calibrated at λ = {inst.wavelength} Å, not "
                             f"{wavelength} Å; calibrate at the wavelength you measure with")
        return inst

    def with_(self, **changes) -> Instrument:
        return replace(self, **changes)


def pseudo_voigt_asym(x, center, fwhm_g, fwhm_l, tau, oversample: int = 8) -> np.ndarray:
    """Unit-area TCH pseudo-Voigt at ``center`` convolved with the asymmetry exponential
    (signed length ``tau``), evaluated on the uniform grid ``x`` (1D, scalars for the
    rest). Numerical: the pseudo-Voigt on an ``oversample``× finer grid, the exponential
    as a one-pole recursive filter, then sampled back at ``x``."""

    from .powder import pseudo_voigt

    x = np.asarray(x, float)
    h = (x[1] - x[0]) / oversample
    fine = x[0] + h * np.arange((x.size - 1) * oversample + 1)
    y = exp_tail(pseudo_voigt(fine, np.asarray(center, float), fwhm_g, fwhm_l), h, tau)
    return y[::oversample]


def exp_tail(y: np.ndarray, h: float, tau: float) -> np.ndarray:
    """``y`` (..., M) on a grid of step ``h`` convolved (last axis) with the unit-area
    one-sided exponential of signed length ``tau`` (> 0: tail towards lower index).

    In Fourier space, with the kernel's transform 1 / (1 - 2πi f τ) — the same as the
    simulator's fast path — and zero padding so the tail does not wrap around. Exact for
    any ``tau``, also below the grid step (the peak then shifts by -τ, smoothly)."""
    if abs(tau) < 1e-12:
        return y
    y = np.asarray(y, float)
    m = y.shape[-1]
    pad = int(min(np.ceil(12 * abs(tau) / h), 4 * m)) + 2
    n = 1 << int(np.ceil(np.log2(m + 2 * pad)))
    buf = np.zeros(y.shape[:-1] + (n,))
    buf[..., pad:pad + m] = y
    freq = np.fft.rfftfreq(n, d=h)
    out = np.fft.irfft(np.fft.rfft(buf, axis=-1) / (1 - 2j * np.pi * freq * tau), n=n, axis=-1)
    return out[..., pad:pad + m]

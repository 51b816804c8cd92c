"""The instrument's peak profile from a calibrant pattern (``xrdml calibrate profile``).

What beamlines do before quantifying phases: measure a calibrant whose crystallites are
large and strain-free (CeO2, LaB6, Si), so that its peak widths and shapes are the
instrument's alone, and fit a smooth profile model through them.

1. The calibrant's d-spacings come from pyFAI (``pyFAI.calibrant.get_calibrant``); with the
   wavelength they give the expected peak positions. Reflections closer than two peak
   widths are fitted as one group.
2. Each reflection is fitted on its own (pseudo-Voigt + a linear background in a window):
   position, FWHM, Lorentzian share η, area. Peaks too weak (height < ``min_snr`` times
   the background's scatter) are left out.
3. One global fit over every window: the profile of ``simulation.instrument.Instrument``
   (Caglioti U, V, W for the Gaussian width, X / cos θ Lorentzian width, asymmetry
   τ = asym0 + asym1 / tan 2θ, zero shift) with an area and a linear background per
   window; scipy ``least_squares``, residuals weighted 1/√max(I, 1).

The result is an ``Instrument`` saved as JSON, with the per-peak table and the fit quality,
which ``xrdml train pqnet --profile FILE`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from ..simulation.instrument import Instrument, pseudo_voigt_asym
from ..simulation.powder import _bragg, pseudo_voigt, tch


class CalibrationError(ValueError):
    """The pattern cannot be calibrated (what to do is in the message)."""


def read_xy(path) -> tuple[np.ndarray, np.ndarray]:
    """A two-column text pattern (2θ in degrees, intensity), ``#`` comments: Dioptas,
    pyFAI and most integration tools write this."""
    try:
        data = np.loadtxt(path, comments="#", ndmin=2)
    except (OSError, ValueError) as err:
        raise CalibrationError(f"could not read {path} as 2θ/intensity columns: {err}") from None
    if data.shape[1] < 2 or len(data) < 32:
        raise CalibrationError(f"{path}: expected two columns (2θ in degrees, intensity) "
                               f"and at least 32 rows, got shape {data.shape}")
    x, y = data[:, 0], data[:, 1]
    if not np.all(np.diff(x) > 0):
        raise CalibrationError(f"{path}: 2θ must increase from row to row")
    return x, y


def calibrant_d_spacings(name: str) -> np.ndarray:
    """d-spacings (Å) of a pyFAI calibrant, e.g. ``"CeO2"``, ``"LaB6"``, ``"Si"``."""
    from pyFAI.calibrant import ALL_CALIBRANTS, get_calibrant

    if name not in ALL_CALIBRANTS:
        raise CalibrationError(f"unknown calibrant {name!r}; pyFAI knows e.g. CeO2, LaB6, Si, "
                               f"alpha_Al2O3 ({len(ALL_CALIBRANTS)} in all)")
    cal = get_calibrant(name)
    return np.asarray(cal.dspacing if hasattr(cal, "dspacing") else cal.dSpacing, float)


@dataclass
class ProfileCalibration:
    """What ``fit_profile`` found: the instrument, the peaks it used and the fit quality."""

    instrument: Instrument
    peaks: list[dict] = field(default_factory=list)  # per-reflection fits
    rwp: float = float("nan")  # weighted profile R of the global fit over the windows
    fwhm_rms: float = float("nan")  # rms of (per-peak FWHM - Caglioti curve), degrees
    calibrant: str = ""

    def as_dict(self) -> dict:
        return {"instrument": self.instrument.as_dict(), "calibrant": self.calibrant,
                "rwp": self.rwp, "fwhm_rms_deg": self.fwhm_rms, "peaks": self.peaks}

    def save(self, path):
        return self.instrument.save(path, calibrant=self.calibrant, rwp=self.rwp,
                                    fwhm_rms_deg=self.fwhm_rms, peaks=self.peaks)


def _single_fit(x, y, center, fwhm0):
    """pseudo-Voigt + linear background on one window → dict or None."""
    def model(p):
        c, fw, eta, area, b0, b1 = p
        prof = (eta * pseudo_voigt(x, c, 0.0 + 1e-9, fw)
                + (1 - eta) * pseudo_voigt(x, c, fw, 1e-9))
        return area * prof + b0 + b1 * (x - center)

    w = 1 / np.sqrt(np.maximum(y, 1.0))
    b = np.median(np.r_[y[:3], y[-3:]])
    area0 = max((y - b).sum() * (x[1] - x[0]), 1e-6)
    p0 = [center, fwhm0, 0.5, area0, b, 0.0]
    lo = [center - fwhm0, fwhm0 / 10, 0.0, 0.0, -np.inf, -np.inf]
    hi = [center + fwhm0, fwhm0 * 10, 1.0, np.inf, np.inf, np.inf]
    try:
        r = least_squares(lambda p: (model(p) - y) * w, p0, bounds=(lo, hi), x_scale="jac")
    except ValueError:
        return None
    c, fw, eta, area, b0, _ = r.x
    return {"two_theta": float(c), "fwhm": float(fw), "eta": float(eta), "area": float(area),
            "background": float(b0)}


def fit_profile(two_theta, intensity, wavelength: float, calibrant: str = "CeO2",
                min_snr: float = 10.0, window_fwhm: float = 8.0, source: str = "",
                fit_zero: bool = True, wavelength2: float | None = None,
                ratio2: float = 0.5) -> ProfileCalibration:
    """Fit the instrument profile (see the module doc) to a calibrant pattern.

    ``two_theta`` (degrees, increasing) and ``intensity``: the integrated pattern;
    ``wavelength`` in Å (the one the calibrant was measured at; Kα1 for a lab tube, whose
    Kα2 line ``wavelength2`` with intensity ratio ``ratio2`` is then part of every peak)."""
    x = np.asarray(two_theta, float)
    y = np.asarray(intensity, float)
    if x.shape != y.shape or x.ndim != 1:
        raise CalibrationError("two_theta and intensity must be 1D arrays of the same length")
    if not np.all(np.isfinite(y)):
        raise CalibrationError("the pattern holds NaN/inf intensities; mask them out first")
    step = float(np.median(np.diff(x)))
    d = calibrant_d_spacings(calibrant)
    pos = _bragg(float(wavelength), d)
    pos = np.unique(np.round(pos[np.isfinite(pos)], 6))
    pos = pos[(pos > x[0] + 0.2) & (pos < x[-1] - 0.2)]
    if pos.size < 3:
        raise CalibrationError(f"fewer than 3 {calibrant} reflections between {x[0]:.3g} and "
                               f"{x[-1]:.3g}° at λ = {wavelength} Å: wrong wavelength or "
                               "calibrant?")
    # a first width: the strongest expected reflection's half-height span
    near = [np.argmin(np.abs(x - p)) for p in pos]
    k = int(np.argmax([y[i] for i in near]))
    i = near[k]
    i = max(0, i - 10) + int(np.argmax(y[max(0, i - 10): i + 11]))
    base = np.median(y[max(0, i - 60): i + 61])
    half = base + (y[i] - base) / 2
    lo_i, hi_i = i, i
    while lo_i > 0 and y[lo_i] > half:
        lo_i -= 1
    while hi_i < y.size - 1 and y[hi_i] > half:
        hi_i += 1
    fwhm0 = max((hi_i - lo_i) * step, 2 * step)
    # group reflections closer than 2 FWHM; one window per group
    groups = [[pos[0]]]
    for p in pos[1:]:
        if p - groups[-1][-1] < 2 * fwhm0:
            groups[-1].append(p)
        else:
            groups.append([p])
    windows, peaks = [], []
    for g in groups:
        if len(g) > 1:
            continue  # overlapping reflections: their widths are not the instrument's alone
        c = g[0]
        gap = np.min(np.abs(np.delete(pos, np.searchsorted(pos, c)) - c)) if pos.size > 1 \
            else np.inf
        half_w = min(window_fwhm * fwhm0, gap - 3 * fwhm0)
        if half_w < max(3 * fwhm0, 4 * step):
            continue
        m = (x > c - half_w) & (x < c + half_w)
        xs, ys = x[m], y[m]
        edge = np.r_[ys[:4], ys[-4:]]
        noise = max(np.std(edge), np.sqrt(max(np.median(edge), 1.0)), 1e-9)
        if ys.max() - np.median(edge) < min_snr * noise:
            continue
        single = _single_fit(xs, ys, c, fwhm0)
        if single is None:
            continue
        single["expected"] = float(c)
        peaks.append(single)
        windows.append((xs, ys, c))
    if len(windows) < 4:
        raise CalibrationError(f"only {len(windows)} isolated {calibrant} peaks above "
                               f"{min_snr}× the background scatter; need 4 (lower --min-snr, "
                               "or check the wavelength)")
    # global fit
    theta = np.radians([c for _, _, c in windows]) / 2
    t = np.tan(theta)
    fw = np.array([p["fwhm"] for p in peaks])
    A = np.c_[t**2, t, np.ones_like(t)]
    u0, v0, w0 = np.linalg.lstsq(A, fw**2, rcond=None)[0]
    w0 = max(w0, (0.5 * fw.min()) ** 2)
    def inst_of(p):
        return Instrument(wavelength=float(wavelength), U=p[0], V=p[1], W=p[2], X=p[3],
                          asym0=p[4], asym1=p[5], zero=p[6] if fit_zero else 0.0,
                          wavelength2=wavelength2, ratio2=ratio2)

    def line_profile(inst, xs, c):
        """The calibrant reflection at nominal ``c`` drawn by ``inst``, every beam line."""
        d = float(wavelength) / (2 * np.sin(np.radians(c) / 2))
        out = 0.0
        for lam, ratio in inst.lines:
            cc = float(_bragg(lam, d)) + inst.zero
            out = out + ratio * pseudo_voigt_asym(xs, cc, float(inst.fwhm_g(cc)),
                                                  float(inst.fwhm_l(cc)), float(inst.tau(cc)),
                                                  oversample=4)
        return out

    def linear(p):
        """Per window: profile, and area + linear background by weighted least squares."""
        inst = inst_of(p)
        out = []
        for xs, ys, c in windows:
            prof = line_profile(inst, xs, c)
            w = 1 / np.sqrt(np.maximum(ys, 1.0))
            basis = np.c_[prof, np.ones_like(xs), xs - c]
            coef = np.linalg.lstsq(basis * w[:, None], ys * w, rcond=None)[0]
            out.append((basis @ coef - ys) * w)
        return out, coef

    def resid(p):
        return np.concatenate(linear(p)[0])

    # the areas and backgrounds are linear: solved inside (variable projection)
    p0 = np.array([u0, v0, w0, 0.1 * float(np.median(fw)), 0.0, 0.0, 0.0])
    lo = np.array([-np.inf, -np.inf, 0.0, 0.0, -0.2, -0.2, -0.2])
    hi = np.array([np.inf, np.inf, np.inf, 1.0, 0.2, 0.2, 0.2])
    p0 = np.clip(p0, lo + 1e-12, hi - 1e-12)
    res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac", max_nfev=100)
    inst = inst_of(res.x).with_(source=source)
    num = float(res.fun @ res.fun)
    den = float(sum((ys**2 / np.maximum(ys, 1.0)).sum() for _, ys, _ in windows))
    fit_fwhm = np.array([tch(inst.fwhm_g(c), inst.fwhm_l(c))[0] for _, _, c in windows])
    for pk, f in zip(peaks, fit_fwhm):
        pk["fwhm_model"] = float(f)
    return ProfileCalibration(instrument=inst, peaks=peaks, rwp=float(np.sqrt(num / den)),
                              fwhm_rms=float(np.sqrt(np.mean((fw - fit_fwhm) ** 2))),
                              calibrant=calibrant)


def plot_calibration(two_theta, intensity, cal: ProfileCalibration, path):
    """PNG: the pattern with the fitted calibrant peaks, and FWHM against 2θ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inst = cal.instrument
    x, y = np.asarray(two_theta, float), np.asarray(intensity, float)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), constrained_layout=True)
    ax.plot(x, y, lw=0.7, color="k", label="measured")
    for pk in cal.peaks:
        c = pk["expected"] + inst.zero
        xs = x[np.abs(x - c) < 4 * pk["fwhm"] + 0.1]
        prof = pseudo_voigt_asym(xs, c, float(inst.fwhm_g(c)), float(inst.fwhm_l(c)),
                                 float(inst.tau(c)))
        peak_area = pk["area"]
        ax.plot(xs, peak_area * prof + pk["background"], color="tab:red", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("2θ (°)")
    ax.set_title(f"{cal.calibrant} peaks and the fitted instrument profile (Rwp {cal.rwp:.3f})")
    tt = np.linspace(x[0], x[-1], 200)
    ax2.plot([p["two_theta"] for p in cal.peaks], [p["fwhm"] for p in cal.peaks], "o",
             label="single-peak fits")
    ax2.plot(tt, tch(inst.fwhm_g(tt), inst.fwhm_l(tt))[0], label="Caglioti + X/cos θ")
    ax2.set_xlabel("2θ (°)")
    ax2.set_ylabel("FWHM (°)")
    ax2.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Least-squares full-profile fit of powder patterns: the conventional baseline for PQ-Net
(a stand-in for Rietveld refinement), also usable without a trained model.

The model is the simulator's (``simulation.powder``): per phase a scale, its free lattice
parameter(s) and crystallite size, pseudo-Voigt (TCH) profiles with the instrument's
Gaussian width, plus a smooth background (Chebyshev polynomial of degree 3 and an
air-scatter decay ``exp(-3 (x + 1))`` on x ∈ [-1, 1]). Residuals are Poisson-weighted
(1/√max(counts, 1)); scipy's ``least_squares`` (trust-region reflective, bounded) with a
Jacobian that is analytic for the linear parameters (scales, background) and a forward
difference per phase for lattice and size. Standard deviations come from the covariance
(JᵀJ)⁻¹ times the reduced χ².

Starting values are what a user would take: nominal lattice parameters, ``size0`` nm, and
scales + background from a non-negative linear fit of the phase patterns at those values.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares, nnls

from ..simulation.powder import PowderSimulator
from .roi import check_patterns


class ProfileFit:
    """Full-profile fits with the interface of ``PQNetPredictor``: ``.phases``,
    ``.two_theta``, ``.wavelength`` and ``.predict(patterns)`` → ``xarray.Dataset``
    (``scale``, ``fraction``, ``size_nm``, ``lattice_<axis>`` and ``*_std``,
    dims ``("pattern", "phase")``)."""

    name = "profile-fit"

    def __init__(self, simulator: PowderSimulator, size0: float = 30.0,
                 lattice_rel: float = 0.02, size_bounds=(2.0, 300.0), max_nfev: int = 60):
        self.sim = simulator
        self.phases = list(simulator.names)
        self.two_theta = simulator.two_theta
        self.wavelength = simulator.wavelength
        self.size0, self.lattice_rel = size0, lattice_rel
        self.size_bounds, self.max_nfev = size_bounds, max_nfev
        x = np.linspace(-1.0, 1.0, self.two_theta.size)
        cheb = np.polynomial.chebyshev.chebvander(x, 3).T  # (4, M)
        self.bkg_basis = np.vstack([cheb, np.exp(-3 * (x + 1))])  # (5, M)
        self.nominal = {n: simulator.peaks[n].nominal for n in self.phases}

    @classmethod
    def demo(cls, **kwargs) -> ProfileFit:
        """A fit of the four demo phases on the powder detector's grid (λ = 0.1771 Å)."""
        from ..simulation.structures import demo_structures

        sim = PowderSimulator(demo_structures(), 0.1771, np.linspace(1.0, 11.0, 2048))
        return cls(sim, **kwargs)

    # parameter vector: per phase [scale, lattice..., size], then background coefficients
    def _layout(self):
        idx, i = [], 0
        for n in self.phases:
            k = len(self.nominal[n])
            idx.append((i, slice(i + 1, i + 1 + k), i + 1 + k))
            i += k + 2
        return idx, i

    def _unpack(self, p):
        idx, nb = self._layout()
        return idx, p[nb:]

    def fit_one(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Fit one pattern: (parameters, standard deviations, info)."""
        sim = self.sim
        w = 1.0 / np.sqrt(np.maximum(y, 1.0))
        idx, nb = self._layout()
        # start: nominal lattice, size0, scales and background by non-negative least squares
        phi0 = np.vstack([sim.phase_pattern(n, self.nominal[n][None], self.size0)[0]
                          for n in self.phases])
        basis = np.vstack([phi0, self.bkg_basis, -self.bkg_basis[:1]])
        coef, _ = nnls((basis * w).T, y * w)
        p0 = np.zeros(nb + self.bkg_basis.shape[0])
        lo, hi = np.full_like(p0, -np.inf), np.full_like(p0, np.inf)
        for j, (si, li, zi) in enumerate(idx):
            nom = self.nominal[self.phases[j]]
            p0[si], p0[li], p0[zi] = coef[j], nom, self.size0
            lo[si], lo[li], hi[li] = 0.0, nom * (1 - self.lattice_rel), nom * (1 + self.lattice_rel)
            lo[zi], hi[zi] = self.size_bounds
        p0[nb:] = coef[len(self.phases):-1]
        p0[nb] -= coef[-1]
        p0 = np.clip(p0, lo, hi)

        cache = {}

        def phase_and_derivs(p):
            key = p.tobytes()
            if key not in cache:
                cache.clear()
                out = []
                for j, (_si, li, zi) in enumerate(idx):
                    a, size = p[li], p[zi]
                    k = a.size
                    da = np.maximum(a * 1e-6, 1e-7)
                    dz = max(size * 1e-4, 1e-4)
                    lat = np.vstack([a, *(a + da[i] * np.eye(k)[i] for i in range(k)), a])
                    sizes = np.array([size] * (k + 1) + [size + dz])
                    pats = sim.phase_pattern(self.phases[j], lat, sizes)
                    out.append((pats[0], (pats[1:k + 1] - pats[0]) / da[:, None],
                                (pats[-1] - pats[0]) / dz))
                cache[key] = out
            return cache[key]

        def resid(p):
            model = p[nb:] @ self.bkg_basis
            for (si, _, _), (phi, _, _) in zip(idx, phase_and_derivs(p)):
                model = model + p[si] * phi
            return (model - y) * w

        def jac(p):
            J = np.zeros((y.size, p.size))
            for (si, li, zi), (phi, dphi_a, dphi_z) in zip(idx, phase_and_derivs(p)):
                J[:, si] = phi
                J[:, li] = (p[si] * dphi_a).T
                J[:, zi] = p[si] * dphi_z
            J[:, nb:] = self.bkg_basis.T
            return J * w[:, None]

        res = least_squares(resid, p0, jac=jac, bounds=(lo, hi), method="trf",
                            x_scale="jac", max_nfev=self.max_nfev)
        J = res.jac
        dof = max(1, y.size - p0.size)
        chi2 = float(res.fun @ res.fun) / dof
        cov = np.linalg.pinv(J.T @ J) * chi2
        return res.x, np.sqrt(np.clip(np.diag(cov), 0, None)), {"cov": cov, "chi2": chi2,
                                                                  "nfev": res.nfev}

    def predict(self, patterns):
        """Counts (N, M) → ``xarray.Dataset`` like ``PQNetPredictor.predict``."""
        import xarray as xr

        y = check_patterns(patterns, self.two_theta.size)
        n, p = len(y), len(self.phases)
        idx, _ = self._layout()
        axes = []
        for name in self.phases:
            for ax in self.sim.peaks[name].free:
                if ax not in axes:
                    axes.append(ax)
        out = {k: np.full((n, p), np.nan) for k in
               ["scale", "fraction", "size_nm", *[f"lattice_{a}" for a in axes]]}
        std = {k: np.full((n, p), np.nan) for k in out}
        for i in range(n):
            x, sd, info = self.fit_one(y[i])
            cov = info["cov"]
            si = np.array([s for s, _, _ in idx])
            scales = x[si]
            total = scales.sum()
            frac = scales / total if total > 0 else np.zeros(p)
            # fraction covariance by the delta method: d f_j / d s_k = (δ_jk - f_j) / Σ s
            g = (np.eye(p) - frac[:, None]) / max(total, 1e-12)
            fcov = g @ cov[np.ix_(si, si)] @ g.T
            out["scale"][i], std["scale"][i] = scales, sd[si]
            out["fraction"][i] = frac
            std["fraction"][i] = np.sqrt(np.clip(np.diag(fcov), 0, None))
            for j, (_s, li, zi) in enumerate(idx):
                out["size_nm"][i, j], std["size_nm"][i, j] = x[zi], sd[zi]
                for k, ax in enumerate(self.sim.peaks[self.phases[j]].free):
                    out[f"lattice_{ax}"][i, j] = x[li][k]
                    std[f"lattice_{ax}"][i, j] = sd[li][k]
        data = {}
        for k in out:
            data[k] = (("pattern", "phase"), out[k])
            data[f"{k}_std"] = (("pattern", "phase"), std[k])
        return xr.Dataset(data, coords={"phase": self.phases, "pattern": np.arange(n)})

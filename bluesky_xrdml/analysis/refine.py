"""Full-profile refinement that starts where a network left off (PQ-Net → least squares).

A network reads a pattern in a millisecond but places a peak only to a fraction of its
width; a least-squares fit of the forward model places it to a fraction of that, but needs
a good start and knows nothing about which phases are there. ``Refinement`` takes both:
the phases judged present, their scales, lattice parameters and sizes from the network,
and refines them against the pattern with the simulator's own forward model
(``simulation.powder``: TCH pseudo-Voigt on the model's instrument, Kα2 where the beam has
it).

Parameters refined per pattern:

- per phase judged present: scale (integrated counts × degrees), free lattice
  parameter(s), log crystallite size and (``b_factor``) an isotropic intensity fall-off
  B (Å², intensities × exp(-B / 2d²): thermal motion, and, with B < 0, a capillary's
  absorption, which has the same sin²θ form to first order) and (``preferred_orientation``)
  a March-Dollase coefficient r along (001) (log r refined);
- for the pattern: a zero shift of 2θ (degrees; it absorbs a sample displacement where
  cos θ hardly changes over the grid) and (``displacement``: on by default where cos θ
  changes by > 5 % over the grid) the displacement coefficient s of Δ2θ = s cos θ;
- a smooth background: Chebyshev polynomial of degree ``background_degree`` (default one
  per ~3° of 2θ, 12-40, so that amorphous humps a few degrees wide are followed) plus an
  air-scatter decay exp(-3 (x + 1)) on x ∈ [-1, 1] (linear).

Zero shift and displacement shift every peak of every phase; over a 2θ range where cos θ
follows tan θ closely they trade against the lattice parameters (a single-phase pattern
cannot tell them apart). ``zero_sd`` / ``displacement_sd`` (degrees) add a Gaussian prior
around 0 for each: ``PQNetPredictor.refine`` takes them from the ranges the model was
trained on (the zero shift and displacement it expects a pattern to have).

Residuals are Poisson-weighted (1 / √max(counts, 1)); ``robust=True`` makes the loss
``soft_l1`` with a scale of ``f_scale`` standard deviations, so peaks of phases outside the
model pull less (on the held-out simulated patterns it did not help: off by default);
scipy's ``least_squares`` (trust-region reflective, bounded), the
Jacobian analytic for the linear parameters and forward differences for the rest, the
finite-difference patterns of each phase computed in one batch of the simulator's fast
(Fourier) path (``fast=False``: every peak evaluated; ~10× slower).

The network's estimate of lattice and size enters as a Gaussian prior (``prior``): one
extra residual (value − network mean) / network σ each. Where the pattern pins a
parameter (lattice of a phase with sharp peaks) the prior does not matter; where it
hardly does (the size of a crystal whose size broadening is far below the instrument's
width) the result stays near the network's and so does its uncertainty. Standard
deviations: the covariance (JᵀJ)⁻¹ of the weighted, prior-augmented problem times the
reduced χ², times a per-parameter factor ``std_scale`` calibrated on held-out simulated
patterns (``calibrate``), like the ensemble's.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import least_squares, nnls
from threadpoolctl import threadpool_limits

from .roi import check_patterns

logger = logging.getLogger(__name__)

FREE_KEYS = ("scale", "lattice", "size_nm", "b_factor", "zero", "displacement")


class Refinement:
    """Refine phases judged present from a starting estimate (see the module doc).

    ``simulator``: a ``PowderSimulator`` (e.g. ``PQNetPredictor.simulator``);
    ``refine(patterns, start, use)`` → dict of arrays (N, P) (NaN for phases not refined)
    plus per-pattern ``zero``, ``chi2``, ``rwp``, ``nfev``.
    """

    def __init__(self, simulator, background_degree: int | None = None, b_factor: bool = True,
                 preferred_orientation: bool = False,
                 displacement: bool | None = None, robust: bool = False, f_scale: float = 3.0,
                 prior: bool = True, fast: bool = True, max_nfev: int = 40,
                 zero_sd: float | None = None, displacement_sd: float | None = None,
                 lattice_rel: float = 0.03, size_bounds=(1.0, 3000.0),
                 b_bounds=(-3.0, 8.0), zero_bound: float = 0.2, std_scale: dict | None = None):
        self.sim = simulator
        self.phases = list(simulator.names)
        self.two_theta = simulator.two_theta
        if background_degree is None:  # a degree per ~3° of 2θ: humps of a few degrees
            span = float(self.two_theta[-1] - self.two_theta[0])
            background_degree = int(np.clip(round(span / 3.0), 12, 40))
        self.background_degree = int(background_degree)
        self.b_factor, self.robust, self.f_scale = bool(b_factor), bool(robust), float(f_scale)
        self.march = bool(preferred_orientation)
        self.prior, self.fast, self.max_nfev = bool(prior), bool(fast), int(max_nfev)
        self.zero_sd, self.displacement_sd = zero_sd, displacement_sd
        self.lattice_rel, self.size_bounds = float(lattice_rel), tuple(size_bounds)
        self.b_bounds, self.zero_bound = tuple(b_bounds), float(zero_bound)
        if displacement is None:
            cos = np.cos(np.radians(self.two_theta[[0, -1]]) / 2)
            displacement = bool(cos[0] - cos[1] > 0.05)
        self.displacement = bool(displacement)
        self.std_scale = dict(std_scale or {})
        x = np.linspace(-1.0, 1.0, self.two_theta.size)
        cheb = np.polynomial.chebyshev.chebvander(x, self.background_degree).T
        self.bkg_basis = np.vstack([cheb, np.exp(-3 * (x + 1))])  # (D, M)

    # --- forward model --------------------------------------------------------------------
    def phase_rows(self, name: str, lattice: np.ndarray, size: np.ndarray, b: np.ndarray,
                   zero: np.ndarray, disp: np.ndarray, march=None) -> np.ndarray:
        """Unit-area patterns (n, M) of phase ``name`` for n rows of parameters (``march``:
        March-Dollase r per row, None: no texture)."""
        from ..simulation.powder import Effects

        sim = self.sim
        n = len(lattice)
        j = self.phases.index(name)
        bmat = np.zeros((n, len(self.phases)))
        bmat[:, j] = b
        eff = Effects(shift=np.asarray(zero, float), displacement=np.asarray(disp, float),
                      b_factor=bmat)
        if march is not None:
            eff.march = np.ones((n, len(self.phases)))
            eff.march[:, j] = march
        rows = np.arange(n)
        if self.fast:
            spec = sim._phase_spectrum(sim.peaks[name], lattice, np.asarray(size, float), eff,
                                       j, rows, name)
            return sim._to_grid(spec).astype(float)
        return sim.phase_pattern(name, lattice, size, effects=eff)

    def _layout(self, use):
        """Where each parameter sits in the vector: per phase refined a dict of indices
        (``s`` scale, ``lat`` lattice slice, ``z`` log size, ``b`` B, ``m`` log r), then
        the zero shift, the displacement (or None) and the number before the background."""
        idx = [j for j in range(len(self.phases)) if use[j]]
        lay, i = [], 0
        for j in idx:
            k = len(self.sim.peaks[self.phases[j]].free)
            entry = {"j": j, "s": i, "lat": slice(i + 1, i + 1 + k), "z": i + 1 + k}
            i += k + 2
            if self.b_factor:
                entry["b"] = i
                i += 1
            if self.march:
                entry["m"] = i
                i += 1
            lay.append(entry)
        g_zero = i
        i += 1
        g_disp = None
        if self.displacement:
            g_disp = i
            i += 1
        nb = i
        return lay, g_zero, g_disp, nb

    def _start(self, lay, g_zero, g_disp, nb, lattice0, size0, lattice_sd, size_sd):
        """Start vector, bounds and prior (indices, means, σ) of the parameters."""
        nd = self.bkg_basis.shape[0]
        p0 = np.zeros(nb + nd)
        lo, hi = np.full_like(p0, -np.inf), np.full_like(p0, np.inf)
        b0 = 0.0
        prior_mu, prior_sd, prior_idx = [], [], []
        for e in lay:
            name = self.phases[e["j"]]
            nom = self.sim.peaks[name].nominal
            lat = np.clip(np.asarray(lattice0[name], float), nom * (1 - self.lattice_rel),
                          nom * (1 + self.lattice_rel))
            p0[e["lat"]] = lat
            lo[e["lat"]], hi[e["lat"]] = nom * (1 - self.lattice_rel), nom * (1 + self.lattice_rel)
            ls = np.log(np.clip(size0[e["j"]], *self.size_bounds))
            p0[e["z"]] = ls
            lo[e["z"]], hi[e["z"]] = np.log(self.size_bounds)
            lo[e["s"]] = 0.0
            if self.b_factor:
                p0[e["b"]] = b0
                lo[e["b"]], hi[e["b"]] = self.b_bounds
            if self.march:
                p0[e["m"]] = 0.0
                lo[e["m"]], hi[e["m"]] = np.log(0.5), np.log(2.0)
            if self.prior and lattice_sd is not None:
                sd = np.asarray(lattice_sd[name], float)
                for q in range(e["lat"].start, e["lat"].stop):
                    s_ = sd[q - e["lat"].start]
                    if np.isfinite(s_) and s_ > 0:
                        prior_idx.append(q)
                        prior_mu.append(p0[q])
                        prior_sd.append(s_)
            if self.prior and size_sd is not None and np.isfinite(size_sd[e["j"]]) \
                    and size_sd[e["j"]] > 0:
                prior_idx.append(e["z"])
                prior_mu.append(ls)
                prior_sd.append(max(size_sd[e["j"]] / np.exp(ls), 1e-3))  # σ of log size
        lo[g_zero], hi[g_zero] = -self.zero_bound, self.zero_bound
        if g_disp is not None:
            lo[g_disp], hi[g_disp] = -self.zero_bound, self.zero_bound
        for g, sd_ in ((g_zero, self.zero_sd), (g_disp, self.displacement_sd)):
            if g is not None and sd_:
                prior_idx.append(g)
                prior_mu.append(0.0)
                prior_sd.append(float(sd_))
        prior_idx = np.asarray(prior_idx, int)
        prior_mu, prior_sd = np.asarray(prior_mu, float), np.asarray(prior_sd, float)

        return p0, lo, hi, (prior_idx, prior_mu, prior_sd)

    # --- one pattern ----------------------------------------------------------------------
    def refine_one(self, y: np.ndarray, scale0, lattice0: dict, size0, use,
                   lattice_sd=None, size_sd=None) -> dict:
        """Refine one pattern ``y`` (M,) from scales (P,), lattice {phase: (n_free,)},
        sizes (P,) for the phases with ``use`` (P,) true. ``lattice_sd`` {phase: (n_free,)}
        and ``size_sd`` (P,): the prior's widths (None: no prior). Returns a dict with
        ``x``/``sd`` per parameter (see ``refine``), ``chi2``, ``rwp``, ``nfev``."""
        y = np.asarray(y, float)
        w = 1.0 / np.sqrt(np.maximum(y, 1.0))
        lay, g_zero, g_disp, nb = self._layout(use)
        nd = self.bkg_basis.shape[0]
        p0, lo, hi, (prior_idx, prior_mu, prior_sd) = self._start(
            lay, g_zero, g_disp, nb, lattice0, size0, lattice_sd, size_sd)

        def globals_(p):
            return p[g_zero], (p[g_disp] if g_disp is not None else 0.0)

        def base(p):
            z, d = globals_(p)
            out = []
            for e in lay:
                name = self.phases[e["j"]]
                b = p[e["b"]] if self.b_factor else 0.0
                mr = np.exp([p[e["m"]]]) if self.march else None
                out.append(self.phase_rows(name, p[e["lat"]][None], np.exp([p[e["z"]]]),
                                           np.array([b]), np.array([z]), np.array([d]),
                                           mr)[0])
            return out

        # start: scales and background by non-negative least squares at the start values
        phi0 = base(p0)
        if lay:
            basis = np.vstack([*phi0, self.bkg_basis, -self.bkg_basis])
        else:
            basis = np.vstack([self.bkg_basis, -self.bkg_basis])
        coef, _ = nnls((basis * w).T, y * w, maxiter=50 * basis.shape[0])
        for q, e in enumerate(lay):
            p0[e["s"]] = coef[q]
        p0[nb:] = coef[len(lay):len(lay) + nd] - coef[len(lay) + nd:]
        p0 = np.clip(p0, lo, hi)

        cache: dict = {}

        def phases_and_derivs(p):
            key = p.tobytes()
            if key in cache:
                return cache[key]
            cache.clear()
            z, d = globals_(p)
            out = []
            for e in lay:
                name = self.phases[e["j"]]
                lat = p[e["lat"]]
                k = lat.size
                # one row of (lattice..., log size, B, log r, zero, displacement) per pattern
                # needed: the base, then one forward step in each nonlinear parameter
                base_row = np.concatenate([lat, [p[e["z"]], p[e["b"]] if self.b_factor else 0.0,
                                                 p[e["m"]] if self.march else 0.0, z, d]])
                h = np.concatenate([np.maximum(np.abs(lat) * 2e-5, 1e-6),
                                    [2e-3, 2e-2, 2e-3, 2e-4, 2e-4]])
                cols = list(range(k)) + [k] + ([k + 1] if self.b_factor else []) + (
                    [k + 2] if self.march else []) + [k + 3] + (
                    [k + 4] if g_disp is not None else [])
                rows = np.tile(base_row, (1 + len(cols), 1))
                for r_, c in enumerate(cols, start=1):
                    rows[r_, c] += h[c]
                pats = self.phase_rows(name, rows[:, :k], np.exp(rows[:, k]), rows[:, k + 1],
                                       rows[:, k + 3], rows[:, k + 4],
                                       np.exp(rows[:, k + 2]) if self.march else None)
                phi = pats[0]
                der = {c: (pats[r_] - phi) / h[c] for r_, c in enumerate(cols, start=1)}
                deriv = {"lat": np.stack([der[c] for c in range(k)]), "z": der[k],
                         "zero": der[k + 3]}
                if self.b_factor:
                    deriv["b"] = der[k + 1]
                if self.march:
                    deriv["m"] = der[k + 2]
                if g_disp is not None:
                    deriv["disp"] = der[k + 4]
                out.append((phi, deriv))
            cache[key] = out
            return out

        def model_of(p):
            model = p[nb:] @ self.bkg_basis
            for e, (phi, _) in zip(lay, phases_and_derivs(p)):
                model = model + p[e["s"]] * phi
            return model

        def resid(p):
            r = (model_of(p) - y) * w
            if prior_idx.size:
                r = np.concatenate([r, (p[prior_idx] - prior_mu) / prior_sd])
            return r

        def jac(p):
            J = np.zeros((y.size + prior_idx.size, p.size))
            Jd = J[:y.size]
            for e, (phi, der) in zip(lay, phases_and_derivs(p)):
                s = p[e["s"]]
                Jd[:, e["s"]] = phi
                Jd[:, e["lat"]] = (s * der["lat"]).T
                Jd[:, e["z"]] = s * der["z"]
                if self.b_factor:
                    Jd[:, e["b"]] = s * der["b"]
                if self.march:
                    Jd[:, e["m"]] = s * der["m"]
                Jd[:, g_zero] += s * der["zero"]
                if g_disp is not None:
                    Jd[:, g_disp] += s * der["disp"]
            Jd[:, nb:] = self.bkg_basis.T
            J[:y.size] *= w[:, None]
            for q, (pi, sd) in enumerate(zip(prior_idx, prior_sd)):
                J[y.size + q, pi] = 1.0 / sd
            return J

        loss = "soft_l1" if self.robust else "linear"
        res = least_squares(resid, p0, jac=jac, bounds=(lo, hi), method="trf", x_scale="jac",
                            max_nfev=self.max_nfev, loss=loss, f_scale=self.f_scale)
        x = res.x
        J = jac(x)
        r = resid(x)
        dof = max(1, y.size - (nb + nd))
        chi2 = float(r[:y.size] @ r[:y.size]) / dof
        # covariance: Gauss-Newton of the weighted problem, data part scaled by χ²_red
        Jd, Jp = J[:y.size], J[y.size:]
        H = Jd.T @ Jd / max(chi2, 1e-12) + Jp.T @ Jp
        cov = np.linalg.pinv(H)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        model = model_of(x)
        rwp = float(np.sqrt(np.sum(w**2 * (y - model) ** 2) / max(np.sum(w**2 * y**2), 1e-12)))
        out = {"chi2": chi2, "rwp": rwp, "nfev": int(res.nfev), "zero": float(x[g_zero]),
               "zero_sd": float(sd[g_zero]), "model": model, "phases": {}}
        if g_disp is not None:
            out["displacement"], out["displacement_sd"] = float(x[g_disp]), float(sd[g_disp])
        for e in lay:
            name = self.phases[e["j"]]
            size = float(np.exp(x[e["z"]]))
            ph = {"scale": (float(x[e["s"]]), float(sd[e["s"]])),
                  "lattice": (x[e["lat"]].copy(), sd[e["lat"]].copy()),
                  "size_nm": (size, size * float(sd[e["z"]]))}
            if self.b_factor:
                ph["b_factor"] = (float(x[e["b"]]), float(sd[e["b"]]))
            if self.march:
                r_ = float(np.exp(x[e["m"]]))
                ph["march_r"] = (r_, r_ * float(sd[e["m"]]))
            out["phases"][name] = ph
        return out

    # --- many patterns ---------------------------------------------------------------------
    def refine(self, patterns, scale, lattice: dict, size_nm, use, lattice_sd: dict | None = None,
               size_sd=None, progress=None) -> dict:
        """Patterns (N, M) with starting ``scale`` (N, P), ``lattice`` {phase: (N, n_free)},
        ``size_nm`` (N, P) and ``use`` (N, P) bool → dict: ``scale``, ``size_nm``,
        ``b_factor`` (N, P), ``lattice`` {phase: (N, n_free)}, each with ``<key>_std``
        (NaN where a phase was not refined, times ``std_scale``), and (N,) ``zero``,
        ``zero_std``, ``chi2``, ``rwp``, ``nfev`` and ``ok`` (False: the fit failed, logged;
        that pattern's values stay NaN), and ``model`` (N, M) the fitted patterns."""
        y = check_patterns(patterns, self.two_theta.size)
        n, p = len(y), len(self.phases)
        nan = np.full((n, p), np.nan)
        out = {k: nan.copy() for k in ("scale", "size_nm", "b_factor", "scale_std",
                                        "size_nm_std", "b_factor_std")}
        out["lattice"] = {ph: np.full((n, len(self.sim.peaks[ph].free)), np.nan)
                          for ph in self.phases}
        out["lattice_std"] = {ph: v.copy() for ph, v in out["lattice"].items()}
        for k in ("zero", "zero_std", "chi2", "rwp", "nfev"):
            out[k] = np.full(n, np.nan)
        out["ok"] = np.ones(n, bool)
        out["model"] = np.full(y.shape, np.nan, np.float32)
        f = self.std_scale
        with threadpool_limits(limits=1, user_api="blas"):  # small solves: threads only wait
            self._refine_rows(y, scale, lattice, size_nm, use, lattice_sd, size_sd, out, f,
                              progress)
        return out

    def _refine_rows(self, y, scale, lattice, size_nm, use, lattice_sd, size_sd, out, f,
                     progress):
        n = len(y)
        for i in range(n):
            try:
                res = self.refine_one(
                    y[i], scale[i], {ph: lattice[ph][i] for ph in self.phases}, size_nm[i],
                    use[i],
                    None if lattice_sd is None else {ph: lattice_sd[ph][i] for ph in self.phases},
                    None if size_sd is None else size_sd[i])
                if not all(np.all(np.isfinite(v[0])) and np.all(np.isfinite(v[1]))
                           for ph in res["phases"].values() for v in ph.values()):
                    raise FloatingPointError("the fit ended on non-finite values")
            except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
                logger.warning("xrdml: refinement of pattern %d failed (%s): the network's "
                               "values stay", i, err)
                out["ok"][i] = False
                continue
            out["model"][i] = res["model"]
            for k in ("zero", "chi2", "rwp", "nfev"):
                out[k][i] = res[k]
            out["zero_std"][i] = res["zero_sd"]
            for name, ph in res["phases"].items():
                j = self.phases.index(name)
                for key in ("scale", "size_nm", "b_factor"):
                    if key in ph:
                        out[key][i, j] = ph[key][0]
                        out[f"{key}_std"][i, j] = ph[key][1] * f.get(key, 1.0)
                for q, ax in enumerate(self.sim.peaks[name].free):
                    out["lattice"][name][i, q] = ph["lattice"][0][q]
                    out["lattice_std"][name][i, q] = ph["lattice"][1][q] * f.get(
                        f"lattice_{ax}", 1.0)
            if progress is not None:
                progress(i + 1, n)

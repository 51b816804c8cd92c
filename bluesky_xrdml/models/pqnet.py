"""PQ-Net: per-pattern phase quantification of powder patterns (Dong et al., npj Comput.
Mater. 7, 74, 2021), as a deep ensemble.

One member (``PQNet``), for any number of phases:

- input: one pattern of counts on the model's 2θ grid, divided by its mean count (so the
  network never sees the absolute counts), plus log10 of the total counts as a scalar
  that the parameter blocks see (it sets the noise level);
- *pattern block*, shared: a strided convolution (stride 4, a learned filter bank that
  keeps sub-channel peak positions in its channel ratios), then convolution + ReLU +
  max-pooling stages;
- one *phase block* per phase: convolutions + max-pooling on the shared features;
- one *parameter block* per phase (fully connected): for the phase's share of the
  integrated counts, each free lattice parameter of its crystal system and log size,
  a mean and a log-variance (trained with a Gaussian likelihood on normalised targets).

``PQNetEnsemble`` holds ``members`` independently initialised networks. The predictor
(``PQNetPredictor``, what ``load_model("pqnet-demo")`` returns) combines them: mean of the
members' means, variance = mean of their variances + variance of their means (a deep
ensemble), times a per-parameter factor calibrated on held-out simulated patterns
(``std_scale`` in the card). No Bluesky in here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..analysis.roi import PatternError, check_patterns  # noqa: F401 (PatternError: public)
from . import weights as weights_io

NAME = "pqnet"
SHIPPED = weights_io.WEIGHTS_DIR / "pqnet-demo.safetensors"
LOG2 = float(np.log(2.0))

DEFAULT_ARCH = {
    "stem": [12, 8, 4],  # channels, kernel, stride of the first (strided) convolution
    "pattern_block": [[16, 5], [24, 3]],  # (channels, kernel) per stage, each + max-pool 2
    "phase_block": [[12, 3]],  # per phase, each + max-pool 2
    "hidden": 64,  # parameter block width
}


class PQNet(nn.Module):
    """One member. ``forward(x, logc)``: x (N, 1, M) normalised pattern, logc (N, 1)
    → (N, n_phases, n_out, 2) normalised means and log-variances, and with ``presence``
    (N, n_phases) logits of the probability that each phase is in the pattern (else None)."""

    def __init__(self, n_points: int, n_phases: int, n_out: int, arch: dict | None = None,
                 presence: bool = False):
        super().__init__()
        arch = {**DEFAULT_ARCH, **(arch or {})}
        self.n_phases, self.n_out, self.presence = n_phases, n_out, bool(presence)
        c0, k0, s0 = arch["stem"]
        # max-pooling before ReLU (they commute): the activation runs on half the data
        layers = [nn.Conv1d(1, c0, k0, stride=s0, padding=(k0 - s0) // 2), nn.ReLU(True)]
        length, cin = n_points // s0, c0
        for c, k in arch["pattern_block"]:
            layers += [nn.Conv1d(cin, c, k, padding=k // 2), nn.MaxPool1d(2), nn.ReLU(True)]
            length, cin = length // 2, c
        self.pattern_block = nn.Sequential(*layers)
        self.phase_blocks = nn.ModuleList()
        self.parameter_blocks = nn.ModuleList()
        for _ in range(n_phases):
            layers, c_in, n = [], cin, length
            for c, k in arch["phase_block"]:
                layers += [nn.Conv1d(c_in, c, k, padding=k // 2), nn.MaxPool1d(2), nn.ReLU(True)]
                n, c_in = n // 2, c
            self.phase_blocks.append(nn.Sequential(*layers, nn.Flatten()))
            self.parameter_blocks.append(nn.Sequential(
                nn.Linear(c_in * n + 1, arch["hidden"]), nn.ReLU(True),
                nn.Linear(arch["hidden"], arch["hidden"]), nn.ReLU(True),
                nn.Linear(arch["hidden"], 2 * n_out + int(self.presence))))

    def forward(self, x, logc):
        shared = self.pattern_block(x)
        out, logits = [], []
        k = 2 * self.n_out
        for phase, params in zip(self.phase_blocks, self.parameter_blocks):
            h = params(torch.cat([phase(shared), logc], dim=1))
            out.append(h[:, :k].reshape(-1, self.n_out, 2))
            if self.presence:
                logits.append(h[:, k])
        return torch.stack(out, dim=1), (torch.stack(logits, dim=1) if self.presence else None)


class PQNetEnsemble(nn.Module):
    """``members`` independently initialised PQNets; ``forward`` → (members, N, P, n_out, 2)
    and presence logits (members, N, P) or None."""

    def __init__(self, n_points: int, n_phases: int, n_out: int, members: int = 5,
                 arch: dict | None = None, seed: int = 0, presence: bool = False):
        super().__init__()
        nets = []
        for i in range(members):
            torch.manual_seed(seed * 1000 + i)
            nets.append(PQNet(n_points, n_phases, n_out, arch, presence))
        self.members = nn.ModuleList(nets)
        self.presence = bool(presence)

    def forward(self, x, logc):
        outs = [m(x, logc) for m in self.members]
        logits = torch.stack([o[1] for o in outs]) if self.presence else None
        return torch.stack([o[0] for o in outs]), logits


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prepare(counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (N, M) → network inputs: pattern / its mean (N, 1, M), log10 total (N, 1)."""
    y = torch.as_tensor(np.ascontiguousarray(counts, dtype=np.float32))
    total = y.sum(dim=1, keepdim=True).clamp_min(1.0)
    x = y / (total / y.shape[1])
    return x.unsqueeze(1), torch.log10(total)


class Targets:
    """Normalisation of the per-phase outputs: share of counts, free lattice parameters,
    log size → zero-centred, unit-range network targets, and back."""

    def __init__(self, nominal: list[list[float]], lattice_rel: float, size_nm):
        self.n_free = [len(v) for v in nominal]
        self.max_free = max(self.n_free)
        self.nominal = np.zeros((len(nominal), self.max_free))
        for j, v in enumerate(nominal):
            self.nominal[j, :len(v)] = v
        self.lattice_rel = float(lattice_rel)
        self.log_size = (float(np.log(size_nm[0])), float(np.log(size_nm[1])))

    @property
    def n_out(self) -> int:
        return 2 + self.max_free  # share, lattice..., log size

    def encode(self, share, lattice, size_nm) -> np.ndarray:
        """share (N, P), lattice (N, P, max_free), size (N, P) → (N, P, n_out)."""
        lo, hi = self.log_size
        lat = (np.asarray(lattice) / np.where(self.nominal > 0, self.nominal, 1.0) - 1.0)
        lat = lat / self.lattice_rel
        s = (np.log(np.asarray(size_nm)) - lo) / (hi - lo) * 2 - 1
        return np.concatenate([np.asarray(share)[..., None] * 4 - 2, lat, s[..., None]], -1)

    def decode(self, mean, var):
        """Normalised means and variances (..., P, n_out) → physical means and variances:
        dict share, lattice (..., P, max_free), size_nm; variance by the delta method."""
        lo, hi = self.log_size
        k = self.lattice_rel * self.nominal
        share = (mean[..., 0] + 2) / 4
        lattice = self.nominal * (1 + self.lattice_rel * mean[..., 1:-1])
        log_size = (mean[..., -1] + 1) / 2 * (hi - lo) + lo
        size = np.exp(log_size)
        return ({"share": share, "lattice": lattice, "size_nm": size},
                {"share": var[..., 0] / 16, "lattice": var[..., 1:-1] * k**2,
                 "size_nm": var[..., -1] * ((hi - lo) / 2 * size) ** 2})


class PQNetPredictor:
    """What ``load_model("pqnet-demo")`` returns.

    ``predict(patterns)``: counts (N, M) on ``two_theta`` → ``xarray.Dataset`` with
    ``scale`` (integrated counts × degrees, as the simulator's ``scale``), ``fraction``,
    ``size_nm``, ``lattice_a`` (+ ``lattice_b``/``lattice_c`` where a phase has them; NaN
    for phases without) and ``<name>_std`` of each, dims ``("pattern", "phase")``.

    Models trained with presence heads (``card["presence"]``) also give ``presence``: the
    calibrated probability that the phase is in the pattern; ``fraction`` is then the
    presence-weighted share, p_j s_j / Σ_k p_k s_k, so a phase the model does not see takes
    no share of the others. ``predict(patterns, two_theta=...)`` takes patterns on another
    2θ grid and resamples them onto the model's (``resample``). ``explain`` gives the
    pattern the prediction implies, the residual and a goodness of fit.
    """

    POOR_FIT = 0.2  # ``explain``: a pattern with more unexplained intensity is flagged
    MAX_STEP_RATIO = 1.1  # ``resample``: input grids at most this much coarser than the model's

    def __init__(self, ensemble: PQNetEnsemble, card: dict, device: str = "cpu",
                 batch_size: int = 1024):
        self.card = dict(card)
        self.device = torch.device(device)
        self.ensemble = ensemble.to(self.device).eval()
        self.batch_size = batch_size
        self.phases: list[str] = list(card["phases"])
        self.free: dict[str, list[str]] = {k: list(v) for k, v in card["free"].items()}
        self.two_theta = np.asarray(np.linspace(*card["two_theta"]), float)
        self.wavelength = float(card["wavelength"])
        ranges = card["ranges"]
        self.targets = Targets([card["nominal"][p] for p in self.phases],
                               ranges["lattice_rel"], ranges["size_nm"])
        self.std_scale = {k: float(v) for k, v in card.get("std_scale", {}).items()}
        self.presence = bool(card.get("presence", False))
        self.temperature = float(card.get("presence_temperature", 1.0))
        self._sim = None
        self._refiners: dict = {}  # Refinement per set of options (``refinement``)

    @property
    def name(self) -> str:
        return self.card.get("name", NAME)

    def provenance(self) -> dict:
        return weights_io.provenance(self.card)

    @property
    def lattice_names(self) -> list[str]:
        names = []
        for p in self.phases:
            for f in self.free[p]:
                if f"lattice_{f}" not in names:
                    names.append(f"lattice_{f}")
        return names

    @property
    def parameters(self) -> list[str]:
        """Result variables (without ``_std``) in the order ``predict`` returns them."""
        extra = ["presence"] if self.presence else []
        return ["scale", "fraction", "size_nm", *self.lattice_names, *extra]

    def resample(self, patterns, two_theta) -> np.ndarray:
        """Patterns (N, K) on the grid ``two_theta`` (K,) → (N, M) on the model's grid:
        linear interpolation, counts scaled by the ratio of the steps (so the integrated
        counts stay). The model's grid must lie inside ``two_theta``."""
        y = np.atleast_2d(np.asarray(patterns, float))
        tt = np.asarray(two_theta, float).reshape(-1)
        if tt.size != y.shape[1]:
            raise PatternError(f"two_theta has {tt.size} points, the patterns {y.shape[1]}")
        if tt.size == self.two_theta.size and np.allclose(tt, self.two_theta, atol=1e-6):
            return y
        step_in = float(np.median(np.diff(tt)))
        step = float(self.two_theta[1] - self.two_theta[0])
        if step_in > self.MAX_STEP_RATIO * step:
            raise PatternError(
                f"the patterns' 2θ step {step_in:.4g}° is coarser than the model's {step:.4g}° "
                f"({self.two_theta.size} points): interpolation cannot restore the peak shapes; "
                "train a model on this detector's grid (xrdml train pqnet --two-theta ...)")
        if tt[0] > self.two_theta[0] + step / 2 or tt[-1] < self.two_theta[-1] - step / 2:
            raise PatternError(
                f"the patterns cover 2θ {tt[0]:.4g}-{tt[-1]:.4g}°, the model needs "
                f"{self.two_theta[0]:.4g}-{self.two_theta[-1]:.4g}°; train a model for this "
                "detector's range (xrdml train pqnet --two-theta START:STOP:N)")
        out = np.stack([np.interp(self.two_theta, tt, row) for row in y])
        return out * (step / step_in)

    def members_output(self, patterns):
        """Raw (members, N, P, n_out, 2) normalised means/log-variances, float64, and the
        presence logits (members, N, P) (None for models without presence heads)."""
        y = check_patterns(patterns, self.two_theta.size)
        out, logits = [], []
        with torch.inference_mode():
            for start in range(0, len(y), self.batch_size):
                x, logc = prepare(y[start:start + self.batch_size])
                o, lg = self.ensemble(x.to(self.device), logc.to(self.device))
                out.append(o.float().cpu())
                if lg is not None:
                    logits.append(lg.float().cpu())
        m = len(self.ensemble.members)
        if not out:
            return (np.zeros((m, 0, len(self.phases), self.targets.n_out, 2)),
                    np.zeros((m, 0, len(self.phases))) if self.presence else None)
        lg = torch.cat(logits, dim=1).double().numpy() if logits else None
        return torch.cat(out, dim=1).double().numpy(), lg

    def presence_probability(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated per-member probabilities from presence logits (temperature scaling)."""
        return 1.0 / (1.0 + np.exp(-np.clip(logits / self.temperature, -40, 40)))

    def predict(self, patterns, two_theta=None, refine: bool = False):
        """Counts (N, M) (or one pattern (M,)) → ``xarray.Dataset`` (see the class doc).
        ``two_theta``: the patterns' own 2θ grid, when it is not the model's.
        ``refine=True``: then refine the phases judged present by a full-profile fit
        started from the network's estimate (``refine``; ~0.1-0.5 s a pattern)."""
        import xarray as xr

        if two_theta is not None:
            patterns = self.resample(check_patterns(patterns, np.size(two_theta)), two_theta)
        y = check_patterns(patterns, self.two_theta.size)
        if refine:
            return self.refine(y, self.predict(y))
        raw, logits = self.members_output(y)
        total = y.sum(axis=1) * (self.two_theta[1] - self.two_theta[0])  # counts × degrees
        mean, var = raw[..., 0], np.exp(np.clip(raw[..., 1], -20, 10))
        phys, pvar = self.targets.decode(mean, var)  # each (members, N, P[, F])
        share = np.clip(phys["share"], 0.0, None)
        scale_m = share * total[None, :, None]
        prob = self.presence_probability(logits) if logits is not None else np.ones_like(share)
        weighted = share * prob
        frac_m = weighted / np.clip(weighted.sum(axis=-1, keepdims=True), 1e-12, None)

        def combine(values, variances, key):
            mu = values.mean(axis=0)
            v = variances.mean(axis=0) + (values.var(axis=0, ddof=1) if len(values) > 1 else 0)
            return mu, np.sqrt(v) * self.std_scale.get(key, 1.0)

        out = {}
        out["scale"] = combine(scale_m, pvar["share"] * total[None, :, None] ** 2, "scale")
        # fraction: members' fractions; its variance propagated from the share variances
        share_sum = np.clip(weighted.sum(axis=-1, keepdims=True), 1e-12, None)
        frac_var = np.minimum(pvar["share"] * (prob * (1 - frac_m) / share_sum) ** 2, 0.25)
        out["fraction"] = combine(frac_m, frac_var, "fraction")
        out["size_nm"] = combine(phys["size_nm"], pvar["size_nm"], "size_nm")
        for name in self.lattice_names:
            axis = name.split("_")[1]
            mu = np.full(scale_m.shape[1:], np.nan)
            sd = np.full_like(mu, np.nan)
            for j, p in enumerate(self.phases):
                if axis in self.free[p]:
                    i = self.free[p].index(axis)
                    m_, s_ = combine(phys["lattice"][..., j, i], pvar["lattice"][..., j, i], name)
                    mu[:, j], sd[:, j] = m_, s_
            out[name] = (mu, sd)
        if logits is not None:
            out["presence"] = (prob.mean(axis=0), prob.std(axis=0))
        data = {}
        for key, (mu, sd) in out.items():
            data[key] = (("pattern", "phase"), mu)
            data[f"{key}_std"] = (("pattern", "phase"), sd)
        ds = xr.Dataset(data, coords={"phase": self.phases, "pattern": np.arange(len(y))})
        units = {"scale": "counts·deg", "fraction": "", "size_nm": "nm", "presence": ""}
        for key in out:
            ds[key].attrs["units"] = units.get(key, "Å")
        ds.attrs.update(model=self.name, sha256=self.card.get("sha256", ""))
        return ds

    PRESENT = 0.5  # ``refine``: phases with a presence probability at least this are refined
    MIN_FRACTION = 0.03  # … or, for models without presence heads, at least this fraction

    def refinement(self, **options):
        """The ``analysis.refine.Refinement`` of this model's phases and instrument (options:
        see its doc), its uncertainties scaled by the card's ``refinement.std_scale``."""
        from ..analysis.refine import Refinement

        key = tuple(sorted(options.items()))
        if key not in self._refiners:
            card = self.card.get("refinement", {})
            ranges = self.card["ranges"]
            sizes = ranges["size_nm"]
            texture = float(ranges.get("preferred_orientation", 0.0)) > 0
            # priors of zero shift and displacement: the spread the model was trained with
            # (uniform ±range: σ = range / √3), at least 0.002°
            shifts = {k: max(float(ranges.get(k, 0.0)) / np.sqrt(3), 0.002)
                      for k in ("zero_shift", "displacement")}
            opts = {"size_bounds": (sizes[0] / 3, sizes[1] * 5),
                    "preferred_orientation": texture, "zero_sd": shifts["zero_shift"],
                    "displacement_sd": shifts["displacement"],
                    "lattice_rel": 2 * float(ranges["lattice_rel"]) + 0.005,
                    "std_scale": card.get("std_scale", {}), **options}
            self._refiners[key] = Refinement(self.simulator, **opts)
        return self._refiners[key]

    def refine(self, patterns, ds=None, two_theta=None, progress=None, implied: bool = False,
               **options):
        """Network-initialised full-profile refinement (``analysis.refine``).

        The phases judged present (presence ≥ ``PRESENT``, or fraction ≥ ``MIN_FRACTION``
        without presence heads) are refined from the network's scale, lattice and size,
        with the network's estimate as a prior; the others keep the network's values.
        Returns the dataset of ``predict`` with refined ``scale``, ``size_nm``,
        ``lattice_*`` (each ``*_std`` from the refinement's covariance), ``fraction`` (the
        refined phases share what the others leave) and per pattern ``refined`` (P) bool,
        ``rwp_refined``, ``zero_shift`` (degrees) ± ``zero_shift_std``; with ``implied``
        also ``implied_refined`` (pattern × two_theta): the fitted pattern, background
        included."""
        if two_theta is not None:
            patterns = self.resample(check_patterns(patterns, np.size(two_theta)), two_theta)
        y = check_patterns(patterns, self.two_theta.size)
        ds = self.predict(y) if ds is None else ds
        ref = self.refinement(**options)
        if "presence" in ds:
            use = ds["presence"].values >= self.PRESENT
        else:
            use = ds["fraction"].values >= self.MIN_FRACTION
        lattice, lattice_sd = {}, {}
        for j, p in enumerate(self.phases):
            lattice[p] = np.stack([ds[f"lattice_{ax}"].values[:, j] for ax in self.free[p]], 1)
            lattice_sd[p] = np.stack([ds[f"lattice_{ax}_std"].values[:, j]
                                      for ax in self.free[p]], 1)
        res = ref.refine(y, np.nan_to_num(ds["scale"].values), lattice,
                         ds["size_nm"].values, use, lattice_sd, ds["size_nm_std"].values,
                         progress=progress)
        use = use & res["ok"][:, None]  # a failed fit keeps the network's values
        out = ds.copy(deep=True)
        for key in ("scale", "size_nm"):
            out[key].values[use] = res[key][use]
            out[f"{key}_std"].values[use] = res[f"{key}_std"][use]
        for j, p in enumerate(self.phases):
            rows = use[:, j]
            for q, ax in enumerate(self.free[p]):
                out[f"lattice_{ax}"].values[rows, j] = res["lattice"][p][rows, q]
                out[f"lattice_{ax}_std"].values[rows, j] = res["lattice_std"][p][rows, q]
        f_ref, f_sd = refined_fractions(
            ds["fraction"].values, use, res["scale"],
            res["scale_std"] / ref.std_scale.get("scale", 1.0),
            ref.std_scale.get("fraction", 1.0), ds["fraction_std"].values)
        out["fraction"].values[use] = f_ref[use]
        out["fraction_std"].values[use] = f_sd[use]
        out["refined"] = (("pattern", "phase"), use)
        out["rwp_refined"] = (("pattern",), res["rwp"])
        out["zero_shift"] = (("pattern",), res["zero"])
        out["zero_shift_std"] = (("pattern",), res["zero_std"])
        if implied:
            out["implied_refined"] = (("pattern", "two_theta"), res["model"])
            out = out.assign_coords(two_theta=self.two_theta)
        out.attrs["refined"] = "network-initialised full-profile refinement (analysis.refine)"
        return out

    @property
    def simulator(self):
        """The simulator of the model's phases and instrument (peak lists from the card)."""
        if self._sim is None:
            from ..simulation.instrument import Instrument
            from ..simulation.powder import PeakList, PowderSimulator

            inst = self.card.get("instrument")
            inst = (Instrument.from_dict(inst) if inst else
                    Instrument.constant(self.wavelength, self.card.get("instrument_fwhm", 0.03)))
            if "peaks" in self.card:
                peaks = {n: PeakList.from_dict(self.card["peaks"][n]) for n in self.phases}
                self._sim = PowderSimulator(None, self.wavelength, self.two_theta,
                                            instrument=inst, peaks=peaks)
            else:  # cards before peak lists were stored: the demo phases
                from ..simulation.structures import demo_structures

                structures = demo_structures()
                missing = [p for p in self.phases if p not in structures]
                if missing:
                    raise ValueError(f"the card of {self.name} holds no peak lists and "
                                     f"{missing} are not demo phases: retrain the model")
                self._sim = PowderSimulator({p: structures[p] for p in self.phases},
                                            self.wavelength, self.two_theta, instrument=inst)
        return self._sim

    def explain(self, patterns, ds=None, two_theta=None, background_degree: int = 8):
        """How well the prediction explains each pattern.

        The pattern the prediction implies (every phase at its predicted scale × presence,
        lattice and size, on the model's instrument) plus a smooth background (Chebyshev
        polynomial fitted to what the phases leave, peaks above it excluded) → dict of
        ``implied`` (N, M), ``residual`` = measured − implied (N, M), ``rwp`` (N,) the
        weighted profile R (weights 1/max(counts, 1)), ``unexplained`` (N,) the share of
        the intensity above the background that the phases do not explain (beyond 2σ of
        counting noise) and ``poor`` (N,) bool: ``unexplained`` > ``POOR_FIT``.
        """
        if two_theta is not None:
            patterns = self.resample(check_patterns(patterns, np.size(two_theta)), two_theta)
        y = check_patterns(patterns, self.two_theta.size)
        ds = self.predict(y) if ds is None else ds
        sim = self.simulator
        scale = np.nan_to_num(ds["scale"].values)
        if "presence" in ds:
            scale = scale * ds["presence"].values
        size = np.clip(np.nan_to_num(ds["size_nm"].values, nan=30.0), 1.0, None)
        lattice = {}
        for j, p in enumerate(self.phases):
            cols = [np.nan_to_num(ds[f"lattice_{ax}"].values[:, j],
                                  nan=float(sim.peaks[p].nominal[i]))
                    for i, ax in enumerate(self.free[p])]
            lattice[p] = np.stack(cols, axis=1)
        phases = sim.patterns(scale, lattice, size)
        x = np.linspace(-1, 1, y.shape[1])
        basis = np.polynomial.chebyshev.chebvander(x, background_degree)  # (M, D)
        implied = np.empty_like(y)
        net = np.empty(len(y))
        for i in range(len(y)):
            rest = y[i] - phases[i]
            keep = np.ones(y.shape[1], bool)
            for _ in range(4):  # fit, drop what sits well above the background, refit
                coef = np.linalg.lstsq(basis[keep], rest[keep], rcond=None)[0]
                bg = basis @ coef
                keep = rest - bg < 2 * np.sqrt(np.maximum(bg, 1.0))
            implied[i] = phases[i] + bg
            net[i] = np.clip(y[i] - bg, 0, None).sum()
        residual = y - implied
        sigma = np.sqrt(np.maximum(implied, 1.0))
        excess = np.clip(np.abs(residual) - 2 * sigma, 0, None).sum(axis=1)
        unexplained = excess / np.clip(net, 1e-9, None)
        w = 1.0 / np.maximum(y, 1.0)
        rwp = np.sqrt((w * residual**2).sum(axis=1) / np.clip((w * y**2).sum(axis=1), 1e-12,
                                                                 None))
        return {"implied": implied, "residual": residual, "rwp": rwp,
                "unexplained": unexplained, "poor": unexplained > self.POOR_FIT}


def refined_fractions(frac, use, scale, scale_std, factor: float = 1.0, frac_std=None):
    """Fractions (N, P) and their σ after refining the phases ``use``: they share what the
    phases not refined (their network fractions) leave, in the ratio of their refined
    scales. σ by the delta method (correlations left out) from the scales' covariance σ
    ``scale_std`` and from the network σ ``frac_std`` of what the others leave — without
    that term a phase refined alone would claim σ = 0 — the whole × ``factor``."""
    left = 1.0 - np.where(use, 0.0, frac).sum(axis=1, keepdims=True)
    s = np.where(use, np.clip(scale, 0, None), 0.0)
    tot = s.sum(axis=1, keepdims=True)
    safe = np.where(tot > 0, tot, 1.0)
    g = np.where(tot > 0, s / safe, 0.0)
    var = np.where(use, scale_std, 0.0) ** 2
    f_var = ((1 - g) ** 2 * var + g**2 * (var.sum(axis=1, keepdims=True) - var)) * (
        left / safe) ** 2
    if frac_std is not None:
        left_var = (np.where(use, 0.0, frac_std) ** 2).sum(axis=1, keepdims=True)
        f_var = f_var + g**2 * left_var
    return g * left, np.sqrt(f_var) * factor


def card_arch(card: dict) -> dict:
    return {k: card["architecture"][k] for k in DEFAULT_ARCH if k in card.get("architecture", {})}


def from_tensors(state: dict, card: dict) -> PQNetEnsemble:
    members = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("members."))
    n_points = int(card["two_theta"][2])
    n_out = 2 + max(len(v) for v in card["free"].values())
    ensemble = PQNetEnsemble(n_points, len(card["phases"]), n_out, members, card_arch(card),
                             presence=bool(card.get("presence", False)))
    ensemble.load_state_dict(state)
    return ensemble


def load(path: str | Path | None = None, device: str = "cpu") -> PQNetPredictor:
    """The shipped ``pqnet-demo`` ensemble (``path=None``), another shipped model by name
    (``"pqnet-oxides"``) or your own ``.safetensors`` (card beside it)."""
    if path is not None and not Path(path).exists() and "/" not in str(path):
        shipped = weights_io.WEIGHTS_DIR / f"{Path(path).stem}.safetensors"
        if shipped.exists():
            path = shipped
    state, card = weights_io.load(path or SHIPPED)
    if card.get("model", NAME) != NAME:
        raise ValueError(f"{path} holds a {card.get('model')!r} model, not {NAME!r}")
    return PQNetPredictor(from_tensors(state, card), card, device=device)

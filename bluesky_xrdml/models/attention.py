"""Multi-task CNN with single-head self-attention for operando patterns (Kano, Segi, Ozono,
"Careful analysis of XRD patterns with Attention", arXiv 2006.01451). No Bluesky in here.

Input: a 1D pattern of counts on a 2θ grid at a stated wavelength. The 2θ axis is converted
to momentum transfer Q = 4π sin θ / λ and the pattern is resampled onto the model's fixed
grid of 256 Q bins (``q_range`` in the card) — a monotone cubic (PCHIP) spline of the
cumulative counts, differenced at the bin edges, so that no peak is aliased away — then
min-max scaled to [0, 1]. Because the grid is in Q, not 2θ, a model trained at one
wavelength reads patterns taken at another.

Peak widths in Q depend on the wavelength too: a detector with the same 2θ resolution gives
peaks 2.2× wider in Q at Mo Kα than at Cu Kα, and a model that learned to read the C-rate
from the particle-state broadening would read that as a faster rate. So before resampling,
each pattern is brought to the model's common Q resolution (``resolution_q_fwhm`` in the
card): it is convolved with a Gaussian whose FWHM at each point is
``sqrt(R² − f(Q)²)``, ``f(Q) = (2π/λ) cos θ · FWHM_2θ`` being the instrument's own width in
Q (``instrument_fwhm`` in degrees 2θ, the caller's instrument; default the training
instrument's). Inputs whose instrument is already coarser than ``R`` cannot be sharpened:
``prepare`` warns (``ResolutionWarning``).

Network (``AttentionNet``), as in the paper: ten 1D convolutions of 32 filters with four
kernel sizes, ReLU, batch normalisation at the 7th; single-head attention with QUERY = the
6th layer's output and KEY = VALUE = the 10th's: ``weights = softmax(Q·Kᵀ)`` (256 × 256),
``combination = tanh(weights · V)``; one head per task on the combination:

- voltage: mean and log-variance (learned variance; trained with log-cosh on the mean and
  a Gaussian likelihood on the variance, std calibrated on held-out cycles);
- mode: charge / discharge (softmax);
- rate: one class per C-rate of the card (softmax).

Visualised Attention Weight (VAW): for each query position the maximum weight over the
keys: one value per Q bin, reported with the 2θ of the bin centres at the caller's
wavelength.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import weights as weights_io

NAME = "attention"
SHIPPED = weights_io.WEIGHTS_DIR / "attention-demo.safetensors"
N_POINTS = 256
MODES = ("charge", "discharge")

DEFAULT_ARCH = {
    "channels": 32,
    # ten layers, four kernel sizes: 1×1 up to the query but for the 6th layer's 3, so a
    # query sees ±1 bin (±0.1° at Cu Kα: the VAW says where to within a bin and does not
    # light a peak's flanks); wider ones after it (keys and values see ±11 bins of context)
    "kernels": [1, 1, 1, 1, 1, 3, 5, 7, 5, 7],
    "batchnorm_layer": 7,  # 1-based
    "query_layer": 6,
    "key_layer": 10,
    "attention_scale": 1.0,  # the paper's softmax(Q·Kᵀ); 1/sqrt(channels) would be "scaled"
    "head_channels": 4,  # 1×1 convolution of the combination before each head's MLP
    "hidden": 64,
    # a learned weight per Q bin on the query (sigmoid of a logit, 0.5 at the start): a query
    # that sees a few bins cannot tell a static peak from a moving one of the same shape;
    # with the sparsity priors of training the gate learns which d-spacings need a query
    "query_gate": True,
}


class PatternError(ValueError):
    """A pattern the model cannot read (wrong shape, NaN, no overlap with its Q range)."""


class ResolutionWarning(UserWarning):
    """The instrument is coarser in Q than the model's common resolution: peaks reach the
    network wider than in training."""


class AttentionNet(nn.Module):
    """``forward(x)``: x (N, 1, 256) → (voltage (N, 2) mean/log-variance, mode logits (N, 2),
    rate logits (N, K), attention weights (N, 256, 256))."""

    def __init__(self, n_rates: int, arch: dict | None = None, n_points: int = N_POINTS):
        super().__init__()
        arch = {**DEFAULT_ARCH, **(arch or {})}
        self.arch = arch
        ch = int(arch["channels"])
        self.convs = nn.ModuleList()
        cin = 1
        for k in arch["kernels"]:
            conv = nn.Conv1d(cin, ch, int(k), padding=int(k) // 2)
            # He initialisation: ten ReLU layers on a sparse pattern keep their signal
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            self.convs.append(conv)
            cin = ch
        self.bn = nn.BatchNorm1d(ch)
        if arch["query_gate"]:
            self.gate_logit = nn.Parameter(torch.zeros(n_points))
        hc, hidden = int(arch["head_channels"]), int(arch["hidden"])

        def head(n_out):
            return nn.Sequential(nn.Conv1d(ch, hc, 1), nn.ReLU(True), nn.Flatten(),
                                 nn.Linear(hc * n_points, hidden), nn.ReLU(True),
                                 nn.Linear(hidden, n_out))

        self.voltage_head = head(2)
        self.mode_head = head(len(MODES))
        self.rate_head = head(n_rates)

    def features(self, x):
        """(query (N, L, C), key = value (N, L, C))."""
        a = self.arch
        query = None
        h = x
        for i, conv in enumerate(self.convs, start=1):
            h = conv(h)
            if i == a["batchnorm_layer"]:
                h = self.bn(h)
            h = torch.relu(h)
            if i == a["query_layer"]:
                query = h * torch.sigmoid(self.gate_logit) if a["query_gate"] else h
        return query.transpose(1, 2), h.transpose(1, 2)

    def forward(self, x, with_query: bool = False):
        q, kv = self.features(x)
        weights = torch.softmax(self.arch["attention_scale"] * q @ kv.transpose(1, 2), dim=-1)
        comb = torch.tanh(weights @ kv).transpose(1, 2)  # (N, C, L)
        out = self.voltage_head(comb), self.mode_head(comb), self.rate_head(comb), weights
        return (*out, q) if with_query else out


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the input axis ------------------------------------------------------------------
def q_of(two_theta, wavelength: float) -> np.ndarray:
    """Momentum transfer Q = 4π sin θ / λ (Å⁻¹) of 2θ in degrees at ``wavelength`` Å."""
    return 4 * np.pi * np.sin(np.radians(np.asarray(two_theta, float)) / 2) / float(wavelength)


def two_theta_of(q, wavelength: float) -> np.ndarray:
    """2θ in degrees of momentum transfer ``q`` (Å⁻¹) at ``wavelength`` Å (NaN out of reach)."""
    s = np.asarray(q, float) * float(wavelength) / (4 * np.pi)
    with np.errstate(invalid="ignore"):
        return np.degrees(2 * np.arcsin(np.where(s <= 1, s, np.nan)))


def q_grid(q_range, n: int = N_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges (n+1,), bin centres (n,)) of the model's Q grid."""
    edges = np.linspace(float(q_range[0]), float(q_range[1]), n + 1)
    return edges, 0.5 * (edges[1:] + edges[:-1])


def check_patterns(patterns, two_theta, wavelength) -> tuple[np.ndarray, np.ndarray]:
    """Validated (patterns (N, M) float64, two_theta (M,)); raises ``PatternError``."""
    y = np.asarray(patterns, dtype=float)
    if y.ndim == 1:
        y = y[None]
    tt = np.asarray(two_theta, dtype=float).ravel()
    if y.ndim != 2:
        raise PatternError(f"patterns must be (N, M) or (M,), got shape {y.shape}")
    if y.shape[1] != tt.size:
        raise PatternError(f"patterns have {y.shape[1]} points but two_theta has {tt.size}")
    if tt.size < 16 or np.any(np.diff(tt) <= 0):
        raise PatternError("two_theta must be increasing with at least 16 points")
    if wavelength is None or not np.isfinite(wavelength) or float(wavelength) <= 0:
        raise PatternError(f"wavelength must be a positive number of Å, got {wavelength!r}")
    bad = ~np.isfinite(y).all(axis=1)
    if bad.any():
        raise PatternError(f"{int(bad.sum())} pattern(s) hold NaN or inf (first: index "
                           f"{int(np.argmax(bad))}); mask or drop them first")
    return y, tt


def pixel_edges(q: np.ndarray) -> np.ndarray:
    """Detector bin edges (M+1,) of pixel centres ``q`` (M,): the midpoints, extended by half
    a step at both ends."""
    mid = 0.5 * (q[1:] + q[:-1])
    return np.concatenate([[q[0] - (mid[0] - q[0])], mid, [q[-1] + (q[-1] - mid[-1])]])


def instrument_q_fwhm(two_theta, wavelength: float, fwhm_deg: float) -> np.ndarray:
    """The instrument's FWHM in Q (Å⁻¹) at each 2θ (degrees) for a 2θ FWHM of ``fwhm_deg``:
    dQ/d(2θ) = (2π/λ) cos θ."""
    theta = np.radians(np.asarray(two_theta, float)) / 2
    return 2 * np.pi / float(wavelength) * np.cos(theta) * np.radians(float(fwhm_deg))


@functools.lru_cache(maxsize=16)
def _matching_kernel(tt_key: bytes, wavelength: float, fwhm_deg: float, resolution: float):
    tt = np.frombuffer(tt_key, dtype=float)
    return resolution_kernel(tt, wavelength, fwhm_deg, resolution)


def resolution_kernel(two_theta, wavelength: float, fwhm_deg: float, resolution: float):
    """Sparse (M, M) matrix K that brings counts on ``two_theta`` (instrument FWHM
    ``fwhm_deg`` degrees) to a Gaussian Q resolution of ``resolution`` Å⁻¹ FWHM:
    ``y @ K.T``. Column j spreads pixel j's counts over the pixels' Q intervals with the
    Gaussian of FWHM ``sqrt(R² − f_j²)`` (counts are conserved away from the edges).
    Returns (K, share of pixels whose instrument is coarser than ``resolution``)."""
    from scipy import sparse
    from scipy.special import ndtr

    tt = np.asarray(two_theta, float)
    q = q_of(tt, wavelength)
    edges = pixel_edges(q)
    f = instrument_q_fwhm(tt, wavelength, fwhm_deg)
    coarse = float(np.mean(f > resolution * 1.02))
    sigma = np.sqrt(np.clip(resolution**2 - f**2, 0, None)) / (2 * np.sqrt(2 * np.log(2)))
    sigma = np.maximum(sigma, 1e-9)
    lo = np.searchsorted(edges, q - 6 * sigma, side="right") - 1
    hi = np.searchsorted(edges, q + 6 * sigma, side="left")
    lo, hi = np.clip(lo, 0, q.size - 1), np.clip(hi, 1, q.size)
    width = int((hi - lo).max())
    rows = lo[:, None] + np.arange(width)[None, :]  # (M source, width) target pixels
    valid = rows < hi[:, None]
    rows = np.minimum(rows, q.size - 1)
    upper = ndtr((edges[rows + 1] - q[:, None]) / sigma[:, None])
    lower = ndtr((edges[rows] - q[:, None]) / sigma[:, None])
    w = np.where(valid, upper - lower, 0.0)
    cols = np.broadcast_to(np.arange(q.size)[:, None], rows.shape)
    kernel = sparse.csr_matrix((w[valid], (rows[valid], cols[valid])), shape=(q.size, q.size))
    return kernel, coarse


def match_resolution(y: np.ndarray, two_theta, wavelength: float, fwhm_deg: float,
                     resolution: float) -> np.ndarray:
    """Counts (N, M) convolved to the Q resolution ``resolution`` (see the module doc);
    warns ``ResolutionWarning`` when the instrument is coarser than that."""
    tt = np.ascontiguousarray(two_theta, dtype=float)
    kernel, coarse = _matching_kernel(tt.tobytes(), float(wavelength), float(fwhm_deg),
                                      float(resolution))
    if coarse > 0:
        f = instrument_q_fwhm(tt[[0, -1]], wavelength, fwhm_deg)
        warnings.warn(
            f"the instrument's Q resolution ({f.min():.4f}-{f.max():.4f} Å⁻¹ FWHM for "
            f"{fwhm_deg}° 2θ at λ = {wavelength} Å) is coarser than the model's "
            f"{resolution:.4f} Å⁻¹ on {100 * coarse:.0f} % of the pattern: peaks look wider "
            "than in training (rate and voltage may suffer); train a model at this "
            "resolution (xrdml train attention --resolution)", ResolutionWarning, stacklevel=3)
    return np.asarray(kernel @ y.T).T


def resample(patterns, two_theta, wavelength: float, q_range, n: int = N_POINTS,
             min_coverage: float = 0.9, instrument_fwhm: float | None = None,
             resolution: float | None = None) -> np.ndarray:
    """Counts (N, M) on 2θ at ``wavelength`` → (N, n) float32 on the model's Q bins, min-max
    scaled per pattern (the network's input). With ``resolution`` (Å⁻¹ FWHM) the counts are
    first brought to that Q resolution from the instrument's ``instrument_fwhm`` (degrees
    2θ). Bins outside the measured Q range are 0; less than ``min_coverage`` of the model's
    range measured raises ``PatternError``."""
    from scipy.interpolate import PchipInterpolator

    y, tt = check_patterns(patterns, two_theta, wavelength)
    q_edges = pixel_edges(q_of(tt, wavelength))
    edges, _ = q_grid(q_range, n)
    inside = (min(edges[-1], q_edges[-1]) - max(edges[0], q_edges[0])) / (edges[-1] - edges[0])
    if inside < min_coverage:
        raise PatternError(
            f"the pattern covers Q {q_edges[0]:.3f}-{q_edges[-1]:.3f} Å⁻¹ (2θ {tt[0]:.2f}-"
            f"{tt[-1]:.2f}° at λ = {wavelength} Å), only {100 * max(inside, 0):.0f} % of the "
            f"model's {edges[0]:.3f}-{edges[-1]:.3f} Å⁻¹; measure that range or train a model "
            "for yours")
    y = np.clip(y, 0, None)
    if resolution:
        y = match_resolution(y, tt, wavelength, instrument_fwhm or 0.0, resolution)
    cum = np.concatenate([np.zeros((len(y), 1)), np.cumsum(y, axis=1)], 1)
    spline = PchipInterpolator(q_edges, cum, axis=1, extrapolate=False)
    at = np.clip(edges, q_edges[0], q_edges[-1])
    binned = np.diff(spline(at), axis=1)
    binned = np.nan_to_num(binned, nan=0.0)
    lo = binned.min(axis=1, keepdims=True)
    hi = binned.max(axis=1, keepdims=True)
    return ((binned - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


class AttentionPredictor:
    """What ``load_model("attention-demo")`` (or a path) returns.

    ``predict(patterns, two_theta, wavelength, instrument_fwhm=None)``: counts (N, M) (or
    one pattern (M,)) on ``two_theta`` (degrees) at ``wavelength`` (Å), taken with an
    instrument of ``instrument_fwhm`` degrees 2θ (default: the training one's) → dict of
    numpy arrays: ``voltage`` (N,), ``voltage_std`` (N,), ``mode`` (N, 2) probabilities
    [charge, discharge], ``rate`` (N, K) probabilities in the order of ``rates`` (C-rates;
    ``rate_labels``), ``vaw`` (N, 256) and ``vaw_two_theta`` (256,), the 2θ of the model's
    Q bins at ``wavelength``.
    """

    def __init__(self, net: AttentionNet, card: dict, device: str = "cpu",
                 batch_size: int = 512):
        self.card = dict(card)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size
        self.q_range = tuple(float(v) for v in card["q_range"])
        self.n_points = int(card.get("n_points", N_POINTS))
        self.rates = [float(r) for r in card["rates"]]
        self.rate_labels = [f"{r:g}C" for r in self.rates]
        self.modes = list(card.get("modes", MODES))
        self.voltage_offset = float(card["voltage_norm"][0])
        self.voltage_scale = float(card["voltage_norm"][1])
        self.std_scale = float(card.get("std_scale", 1.0))
        self.wavelength = float(card["wavelength"])  # the training wavelength (any works)
        # the common Q resolution inputs are brought to (None: models trained without it)
        self.resolution = card.get("resolution_q_fwhm")
        self.instrument_fwhm = float(card.get("instrument_fwhm_deg") or 0.0)

    @property
    def name(self) -> str:
        return self.card.get("name", NAME)

    def provenance(self) -> dict:
        return weights_io.provenance(self.card)

    @property
    def q_centres(self) -> np.ndarray:
        return q_grid(self.q_range, self.n_points)[1]

    def vaw_two_theta(self, wavelength: float) -> np.ndarray:
        return two_theta_of(self.q_centres, wavelength)

    def prepare(self, patterns, two_theta, wavelength,
                instrument_fwhm: float | None = None) -> np.ndarray:
        """The network's input (N, 256) float32. ``instrument_fwhm``: your instrument's
        FWHM in degrees 2θ (default: the training instrument's, ``instrument_fwhm_deg``)."""
        fwhm = self.instrument_fwhm if instrument_fwhm is None else float(instrument_fwhm)
        return resample(patterns, two_theta, wavelength, self.q_range, self.n_points,
                        instrument_fwhm=fwhm, resolution=self.resolution)

    def forward(self, x: np.ndarray) -> dict:
        """Network outputs of prepared inputs (N, 256) as numpy arrays."""
        outs = {"v": [], "mode": [], "rate": [], "vaw": []}
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                xb = torch.from_numpy(x[start:start + self.batch_size]).to(self.device)
                v, m, r, w = self.net(xb[:, None, :])
                outs["v"].append(v.float().cpu())
                outs["mode"].append(torch.softmax(m.float(), -1).cpu())
                outs["rate"].append(torch.softmax(r.float(), -1).cpu())
                outs["vaw"].append(w.amax(dim=-1).float().cpu())
        if not outs["v"]:
            k = len(self.rates)
            return {"v": np.zeros((0, 2)), "mode": np.zeros((0, 2)), "rate": np.zeros((0, k)),
                    "vaw": np.zeros((0, self.n_points))}
        return {k: torch.cat(v).numpy() for k, v in outs.items()}

    def predict(self, patterns, two_theta, wavelength,
                instrument_fwhm: float | None = None) -> dict:
        """See the class doc; ``instrument_fwhm`` as in ``prepare``."""
        return self.predict_prepared(
            self.prepare(patterns, two_theta, wavelength, instrument_fwhm), wavelength)

    def predict_prepared(self, x: np.ndarray, wavelength: float) -> dict:
        """``predict`` of inputs already on the model's grid (``prepare``)."""
        out = self.forward(x)
        v = out["v"].astype(np.float64)
        std = np.sqrt(np.exp(np.clip(v[:, 1], -20, 10))) * self.voltage_scale * self.std_scale
        return {
            "voltage": v[:, 0] * self.voltage_scale + self.voltage_offset,
            "voltage_std": std,
            "mode": out["mode"].astype(np.float64),
            "rate": out["rate"].astype(np.float64),
            "vaw": out["vaw"].astype(np.float64),
            "vaw_two_theta": self.vaw_two_theta(float(wavelength)),
        }


def from_tensors(state: dict, card: dict) -> AttentionNet:
    arch = {k: v for k, v in card.get("architecture", {}).items() if k in DEFAULT_ARCH}
    arch.setdefault("query_gate", False)  # cards written before the gate existed
    net = AttentionNet(len(card["rates"]), arch, int(card.get("n_points", N_POINTS)))
    net.load_state_dict(state)
    return net


def load(path: str | Path | None = None, device: str = "cpu") -> AttentionPredictor:
    """The shipped ``attention-demo`` model (``path=None``) or your own ``.safetensors``
    (card beside it)."""
    state, card = weights_io.load(path or SHIPPED)
    if card.get("model", NAME) != NAME:
        raise ValueError(f"{path} holds a {card.get('model')!r} model, not {NAME!r}")
    return AttentionPredictor(from_tensors(state, card), card, device=device)

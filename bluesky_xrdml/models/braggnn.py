"""BraggNN: sub-pixel Bragg-peak centres from 11×11 patches (Liu et al., IUCrJ 9, 104, 2022).

The reference architecture, as in the authors' public code:

- input: one 11×11 patch, min-max scaled to [0, 1];
- three 3×3 convolutions without padding (64, 32, 8 channels; LeakyReLU 0.01):
  11 → 9 → 7 → 5, so 8×5×5 = 200 features;
- a non-local (self-attention) block on the first convolution's 64 channels, before its
  activation: θ, φ, g are 1×1 convolutions to 32 channels, the attention is a softmax over
  the 9×9 = 81 positions, its output is projected back to 64 channels and added;
- fully connected 200 → 16 → 8 → 4 → 2 (LeakyReLU between), ~33 k parameters.

The network predicts the centre divided by the patch size. The shipped default
(``load_model("braggnn")``) is one network of the blend variant ``WIDE_BLEND``: no non-local
block, 16/32/16 channels, dense 400 → 128 → 64 → 7: an absolute centre, a correction to the
patch's thresholded centroid (``patch_centroid``), a gate that blends the two per peak, and
the log-variance of the blended centre (a heteroscedastic head), ~0.8 MFLOP per patch
(``LEAN_BLEND``, the same at half the widths, was the v4 default). The earlier two-network
pair (``LEAN`` + ``LEAN_RESIDUAL``, combined by their variances) is
``load_model("braggnn-pair")``, the reference 5-member ensemble
``load_model("braggnn-ensemble")``. ``BraggNNPredictor`` wraps either behind
``predict(patches, return_std=False)`` (one forward pass for all members, batched over
patches). No Bluesky in here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import weights as weights_io

PATCH = 11
NAME = "braggnn"
SHIPPED = weights_io.WEIGHTS_DIR / "braggnn.safetensors"


class NonLocalBlock(nn.Module):
    """Self-attention over the positions of a feature map, added back to its input."""

    def __init__(self, channels: int = 64, inter: int = 32):
        super().__init__()
        self.inter = inter
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Conv2d(inter, channels, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        theta = self.theta(x).reshape(n, self.inter, h * w).transpose(1, 2)  # (n, hw, c)
        phi = self.phi(x).reshape(n, self.inter, h * w)  # (n, c, hw)
        g = self.g(x).reshape(n, self.inter, h * w).transpose(1, 2)  # (n, hw, c)
        attention = torch.softmax(theta @ phi, dim=-1)  # (n, hw, hw): over the 81 positions
        y = (attention @ g).transpose(1, 2).reshape(n, self.inter, h, w)
        return x + self.out(y)


class BraggNN(nn.Module):
    """The reference BraggNN. Input ``(N, 1, 11, 11)`` scaled patches; output ``(N, 2)``
    centre ``(row, col)`` / patch size (centre of pixel [0, 0] is 0).

    ``inter=0`` leaves out the non-local block (the lean variant ``LEAN`` shipped as the
    default: ~20× fewer FLOPs). ``outputs=4`` adds a heteroscedastic head: the log-variance
    of the (row, col) centre / patch size, trained with a Gaussian negative log-likelihood.
    """

    def __init__(self, patch: int = PATCH, channels=(64, 32, 8), fc=(16, 8, 4),
                 inter: int = 32, slope: float = 0.01, outputs: int = 2,
                 residual: bool = False, blend: bool = False):
        super().__init__()
        if blend and (residual or outputs != 4):
            raise ValueError("a blend network has a variance head (outputs=4) and its own "
                             "centroid branch (residual=False)")
        self.patch = patch
        self.outputs = outputs
        self.residual = residual
        self.blend = blend
        if residual:  # so that saved weights say how their output is to be read
            self.register_buffer("centroid_base", torch.ones(()))
        if blend:
            self.register_buffer("centroid_blend", torch.ones(()))
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3)
        self.nlb = NonLocalBlock(c1, inter) if inter else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.conv3 = nn.Conv2d(c2, c3, 3)
        self.act = nn.LeakyReLU(slope)
        side = patch - 6
        sizes = (c3 * side * side, *fc)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(slope)]
        # a blend network's last layer: absolute centre (2), correction to the centroid (2),
        # gate (1), log-variance (2)
        layers.append(nn.Linear(sizes[-1], BLEND_OUTPUTS if blend else outputs))
        self.dense = nn.Sequential(*layers)
        # start by predicting the patch centre (labels are centre / patch size), or no
        # correction to the centroid, and a variance of about (1 px)²
        nn.init.constant_(self.dense[-1].bias[:2], 0.0 if residual else (patch - 1) / 2 / patch)
        with torch.no_grad():
            if outputs == 4:
                self.dense[-1].bias[-2:] = 2 * np.log(1.0 / patch)
            if blend:
                self.dense[-1].bias[2:5] = 0.0

    def forward(self, x):
        y = self.act(self.nlb(self.conv1(x)))
        y = self.act(self.conv2(y))
        y = self.act(self.conv3(y))
        y = self.dense(y.flatten(1))
        if self.blend:  # one estimate, from two branches of the same features
            gate = torch.sigmoid(y[:, 4:5])
            corrected = patch_centroid(x) / self.patch + y[:, 2:4]
            return torch.cat([gate * corrected + (1 - gate) * y[:, :2], y[:, 5:]], dim=1)
        if not self.residual:
            return y
        return torch.cat([y[:, :2] + patch_centroid(x) / self.patch, y[:, 2:]], dim=1)


BLEND_OUTPUTS = 7

# The centroid a residual network corrects: of the pixels above BASE_LEVEL × the peak and
# BASE_SIGMAS × the noise of the border (above the background). On simulated compact spots
# ~0.025 px from the truth at p50 (the plain patch centroid: 0.11) and 0.6 px at p95 (1.7).
BASE_LEVEL = 0.1
BASE_SIGMAS = 2.0


def patch_centroid(x: torch.Tensor, level: float = BASE_LEVEL,
                   sigmas: float = BASE_SIGMAS) -> torch.Tensor:
    """Intensity centroids ``(N, 2)`` (patch pixels) of patches ``(N, 1, p, p)``: the
    background (the lower median of each patch's border) subtracted, then the pixels above
    ``level`` × the peak and ``sigmas`` × the border's noise (1.4826 × its median absolute
    deviation), less that threshold; the patch centre where nothing stands above it."""
    p = x.shape[-1]
    x = x[:, 0]
    border = torch.cat([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], dim=1)
    lower = (border.shape[1] + 1) // 2  # the lower median, as torch.median (faster)
    bg = border.kthvalue(lower, dim=1).values
    noise = 1.4826 * (border - bg[:, None]).abs().kthvalue(lower, dim=1).values
    signal = (x - bg[:, None, None]).clamp_min(0.0)
    top = signal.flatten(1).amax(dim=1)
    cut = torch.maximum(level * top, sigmas * noise)
    signal = (signal - cut[:, None, None]).clamp_min(0.0)
    total = signal.sum(dim=(1, 2))
    idx = torch.arange(p, dtype=x.dtype, device=x.device)
    centre = torch.stack([signal.sum(dim=2) @ idx, signal.sum(dim=1) @ idx], dim=1)
    mid = torch.full_like(centre, (p - 1) / 2)
    return torch.where(total[:, None] > 1e-6, centre / total.clamp_min(1e-6)[:, None], mid)


# the shipped default: no non-local block, narrow convolutions, a variance head
LEAN = {"channels": [8, 16, 8], "fc": [64, 32], "inter": 0, "outputs": 4}
# the same, its centre a learned correction to the patch's thresholded centroid
LEAN_RESIDUAL = {**LEAN, "residual": True}
# one network, both: its features give an absolute centre, a correction to the centroid and
# a gate that blends the two per peak (the centroid where it is good: bright spots), and
# the log-variance of the blend
LEAN_BLEND = {**LEAN, "blend": True}
# the shipped default (v5.x): the blend at twice the widths (4× the parameters, ~4× the FLOPs;
# closer to the Cramér-Rao bound on faint spots)
WIDE_BLEND = {**LEAN_BLEND, "channels": [16, 32, 16], "fc": [128, 64]}


def architecture(**overrides) -> dict:
    """The architecture as recorded in a model card (the reference one unless overridden)."""
    arch = {"class": "BraggNN", "patch": PATCH, "channels": [64, 32, 8], "fc": [16, 8, 4],
            "inter": 32, "slope": 0.01, "outputs": 2, "nonlocal_after": "conv1",
            "input": "min-max [0, 1]", "output": "centre (row, col) / patch size"}
    arch.update(overrides)
    if not arch["inter"]:
        arch["nonlocal_after"] = None
    if arch["outputs"] == 4:
        arch["output"] += " + log-variance of each (heteroscedastic head)"
    if arch.get("blend"):
        arch["output"] = arch["output"].replace(
            "centre (row, col)", "centre (row, col) = g × (centroid of the patch above "
            f"{BASE_LEVEL:g} × its peak and {BASE_SIGMAS:g} σ of its border + learned "
            "correction) + (1 - g) × learned absolute centre, gate g learned per peak", 1)
    if arch.get("residual"):
        arch["output"] = arch["output"].replace(
            "centre (row, col)", f"centre (row, col) = centroid of the patch above "
            f"{BASE_LEVEL:g} × its peak and {BASE_SIGMAS:g} σ of its border + learned "
            "correction", 1)
    return arch


def arch_kwargs(arch: dict) -> dict:
    """Constructor arguments of ``BraggNN`` from a card's architecture."""
    return {"patch": arch.get("patch", PATCH), "channels": tuple(arch.get("channels", (64, 32, 8))),
            "fc": tuple(arch.get("fc", (16, 8, 4))), "inter": arch.get("inter", 32),
            "slope": arch.get("slope", 0.01), "outputs": arch.get("outputs", 2),
            "residual": bool(arch.get("residual", False)),
            "blend": bool(arch.get("blend", False))}


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_patch(net: BraggNN | None = None) -> int:
    """Multiply-adds ×2 of one forward pass (convolutions, attention, dense layers)."""
    net = net or BraggNN()
    p = net.patch
    c1, c2, c3 = net.conv1.out_channels, net.conv2.out_channels, net.conv3.out_channels
    inter = getattr(net.nlb, "inter", 0)
    s1, s2, s3 = p - 2, p - 4, p - 6
    n1 = s1 * s1
    macs = n1 * c1 * 9 + 3 * n1 * c1 * inter + 2 * n1 * n1 * inter + n1 * inter * c1
    macs += s2 * s2 * c2 * c1 * 9 + s3 * s3 * c3 * c2 * 9
    macs += sum(m.in_features * m.out_features for m in net.dense if isinstance(m, nn.Linear))
    if getattr(net, "residual", False) or getattr(net, "blend", False):
        macs += 4 * p * p  # the thresholded centroid
    return 2 * macs


def scale_patches(patches) -> torch.Tensor:
    """Raw counts ``(N, 11, 11)`` of any numeric dtype → ``(N, 1, 11, 11)`` float32 in [0, 1]."""
    if isinstance(patches, torch.Tensor):
        x = patches.to(torch.float32)
    else:
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    if x.ndim != 3 or x.shape[1:] != (PATCH, PATCH):
        raise ValueError(f"expected patches of shape (N, {PATCH}, {PATCH}), got {tuple(x.shape)}")
    flat = x.reshape(len(x), PATCH * PATCH)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).unsqueeze(1)


class BraggNNEnsemble(nn.Module):
    """``members`` independently initialised BraggNNs (one for the default single network
    with a variance head), or the given ``nets`` (which may differ in architecture, e.g. an
    absolute and a residual one). ``forward`` returns ``(members, N, outputs)``."""

    def __init__(self, members: int = 5, seed: int = 0, nets=None, **arch):
        super().__init__()
        if nets is None:
            nets = []
            for i in range(members):
                torch.manual_seed(seed * 1000 + i)
                nets.append(BraggNN(**arch))
        self.members = nn.ModuleList(nets)

    @property
    def outputs(self) -> int:
        return self.members[0].outputs

    def forward(self, x):
        if len(self.members) == 1:
            return self.members[0](x).unsqueeze(0)
        return torch.stack([m(x) for m in self.members])


class BraggNNPredictor:
    """What ``load_model("braggnn")`` returns: one network (or an ensemble) behind ``predict``.

    ``predict(patches)``: ``(N, 11, 11)`` raw counts → ``(N, 2)`` float64 ``(row, col)`` in
    patch pixels, the centre of ``patch[0, 0]`` being ``(0, 0)``: the mean over members, or,
    for members with a variance head, their inverse-variance weighted mean (each peak
    taken mostly from the member that is surer of it). ``return_std=True`` adds a standard
    deviation ``(N, 2)``: the learned per-peak σ of the variance head combined with the
    members' spread, scaled by the card's ``std_scale`` (calibrated on held-out simulated
    patches so that it matches the error).
    """

    def __init__(self, ensemble: BraggNNEnsemble, card: dict | None = None,
                 device: str = "cpu", batch_size: int = 4096):
        self.card = dict(card or {})
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.ensemble = ensemble.to(self.device).eval()
        if self.device.type == "cpu":  # NHWC convolutions are ~1.5× faster with oneDNN here
            self.ensemble = self.ensemble.to(memory_format=torch.channels_last)
        self.std_scale = float(self.card.get("std_scale", 1.0))
        # on a GPU: half precision (AMP) and pinned host memory for the copies
        self.amp = self.device.type == "cuda"

    @property
    def name(self) -> str:
        return self.card.get("name", NAME)

    @property
    def uncertain_px(self) -> float:
        """Standard deviation (px) above which a centre is flagged ``uncertain``."""
        return float(self.card.get("uncertain_std_px", 0.25))

    def provenance(self) -> dict:
        return weights_io.provenance(self.card)

    def raw(self, patches) -> np.ndarray:
        """Each member's outputs, ``(members, N, outputs)`` float64: centre in patch pixels,
        then (variance head) log-variance of the centre / patch size."""
        x_all = scale_patches(patches)
        out = []
        members = len(self.ensemble.members)
        if self.device.type == "cuda":
            x_all = x_all.pin_memory()
        with torch.inference_mode():
            for start in range(0, len(x_all), self.batch_size):
                x = x_all[start:start + self.batch_size].to(self.device, non_blocking=True)
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, enabled=self.amp):
                    out.append(self.ensemble(x).float().cpu())
        if not out:
            return np.zeros((members, 0, self.ensemble.outputs))
        y = torch.cat(out, dim=1).double().numpy()
        y[..., :2] *= PATCH
        return y

    def members_predict(self, patches) -> np.ndarray:
        """Each member's centres, ``(members, N, 2)`` float64 in patch pixels."""
        return self.raw(patches)[..., :2]

    def predict(self, patches, return_std: bool = False):
        y = self.raw(patches)
        each = y[..., :2]
        if y.shape[-1] == 4:  # learned per-peak variance (of centre / patch size)
            member_var = np.exp(np.clip(y[..., 2:], -30, 10)) * PATCH**2
            weight = 1.0 / member_var
            centre = (weight * each).sum(axis=0) / weight.sum(axis=0)
            if not return_std:
                return centre
            # the combined variance, plus the members' weighted disagreement
            var = 1.0 / weight.sum(axis=0) + (weight * (each - centre) ** 2).sum(
                axis=0) / weight.sum(axis=0)
            return centre, np.sqrt(var) * self.std_scale
        centre = each.mean(axis=0)
        if not return_std:
            return centre
        var = each.var(axis=0, ddof=1) if len(each) > 1 else np.zeros_like(centre)
        return centre, np.sqrt(var) * self.std_scale


def tensors(ensemble: BraggNNEnsemble) -> dict:
    return {k: v for k, v in ensemble.state_dict().items()}


def arch_of(state: dict, card: dict, member: int = 0) -> dict:
    """The architecture of a member's saved tensors: read from their shapes (a card may lack
    it), and whether it is residual from its ``centroid_base`` buffer."""
    arch = dict(card.get("architecture", {}))
    if "members" in arch:  # members of different architectures
        arch = dict(arch["members"][member])
    w = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"members.{member}.")}
    dense = sorted((int(k.split(".")[1]), v.shape[0]) for k, v in w.items()
                   if k.startswith("dense.") and k.endswith(".weight"))
    blend = "centroid_blend" in w
    arch.update(channels=[int(w[f"conv{i}.weight"].shape[0]) for i in (1, 2, 3)],
                inter=int(w["nlb.theta.weight"].shape[0]) if "nlb.theta.weight" in w else 0,
                fc=[int(n) for _, n in dense[:-1]], outputs=4 if blend else int(dense[-1][1]),
                residual="centroid_base" in w, blend=blend)
    return arch


def from_tensors(state: dict, card: dict) -> BraggNNEnsemble:
    members = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("members."))
    ensemble = BraggNNEnsemble(nets=[BraggNN(**arch_kwargs(arch_of(state, card, i)))
                                     for i in range(members)])
    ensemble.load_state_dict(state)
    return ensemble


ENSEMBLE = weights_io.WEIGHTS_DIR / "braggnn-ensemble.safetensors"


def load(path: str | Path | None = None, device: str = "cpu") -> BraggNNPredictor:
    """The shipped network (``path=None``) or your own ``.safetensors`` (card beside it)."""
    state, card = weights_io.load(path or SHIPPED)
    if card.get("model", NAME) != NAME:
        raise ValueError(f"{path} holds a {card.get('model')!r} model, not {NAME!r}")
    return BraggNNPredictor(from_tensors(state, card), card, device=device)


def load_ensemble(path: str | Path | None = None, device: str = "cpu") -> BraggNNPredictor:
    """The shipped 5-member ensemble of reference networks (``load_model("braggnn-ensemble")``),
    slower, for when you want the ensemble's spread."""
    return load(path or ENSEMBLE, device=device)


def copy_ensemble(ensemble: BraggNNEnsemble) -> BraggNNEnsemble:
    return copy.deepcopy(ensemble)

"""Crystal system and space group from a powder pattern and, when measured, the
composition: the multi-modal classifier of Gong, Aguiar et al. (Microsc. Microanal.;
after Aguiar et al., Sci. Adv. 5, eaaw1949, 2019).

- **diffraction sub-network**: a 1D CNN on the pattern re-binned onto a fixed grid in
  Q = 4π sin θ / λ (so any wavelength and 2θ range works), with a second channel that
  marks which part of the grid was measured;
- **chemistry sub-network**: an MLP on element fractions, element presence and a flag
  that says whether a composition was given;
- the two feature vectors are concatenated and layer-normalised, then classified into
  the 230 space groups. Crystal-system and point-group probabilities are sums of the
  space-group probabilities, so the hierarchy is consistent by construction (a space
  group's probability never exceeds its crystal system's or point group's);
- training drops whole modalities at random (the chemistry, now and then the pattern);
- probabilities are calibrated by temperature scaling on held-out patterns, one
  temperature with chemistry and one without (``temperature`` in the card).

``load_model("structure").predict(patterns, two_theta, wavelength, composition=None)``
→ ``{"crystal_system": (N, 7), "point_group": (N, 32), "space_group": (N, 230),
"chemistry_used": (N,)}``. No Bluesky in here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..simulation.crystals import (
    CRYSTAL_SYSTEMS,
    ELEMENTS,
    Z,
    _normalise,
    crystal_system_index,
    q_grid,
    q_of,
)
from . import weights as weights_io

NAME = "structure"
SHIPPED = weights_io.WEIGHTS_DIR / "structure.safetensors"
N_SPACE_GROUPS = 230
N_RANKED = 6  # the largest element fractions, ranked
N_CHEM = 2 * len(ELEMENTS) + N_RANKED + 1

# the 32 crystallographic point groups and the first space group of each (contiguous)
POINT_GROUPS = ("1", "-1", "2", "m", "2/m", "222", "mm2", "mmm", "4", "-4", "4/m", "422",
                "4mm", "-42m", "4/mmm", "3", "-3", "32", "3m", "-3m", "6", "-6", "6/m",
                "622", "6mm", "-6m2", "6/mmm", "23", "m-3", "432", "-43m", "m-3m")
_PG_STARTS = (1, 2, 3, 6, 10, 16, 25, 47, 75, 81, 83, 89, 99, 111, 123, 143, 147, 149, 156,
              162, 168, 174, 175, 177, 183, 187, 191, 195, 200, 207, 215, 221)

DEFAULT_ARCH = {
    "q": [0.5, 7.0, 1024],  # Q grid: min, max (Å⁻¹), points
    "conv": [[16, 7], [32, 5], [48, 5], [64, 3], [64, 3]],  # (channels, kernel), each + pool 2
    "sqrt_channel": True,  # the network also sees √pattern (weak peaks: absences matter)
    "diffraction_features": 256,
    "chemistry_hidden": [128, 64],
    "hidden": 256,
}


def point_group_index(space_group) -> np.ndarray:
    """Index into ``POINT_GROUPS`` of space group number(s) 1-230."""
    return np.searchsorted(np.array(_PG_STARTS), np.asarray(space_group), side="right") - 1


def _membership(starts, n_groups) -> torch.Tensor:
    """(230, n_groups) 0/1 matrix: space group → its class."""
    idx = np.searchsorted(np.array(starts), np.arange(1, 231), side="right") - 1
    m = np.zeros((230, n_groups), np.float32)
    m[np.arange(230), idx] = 1
    return torch.from_numpy(m)


class StructureNet(nn.Module):
    """``forward(x, chem)``: x (N, 2, M) pattern + coverage mask on the Q grid, chem
    (N, N_CHEM) fractions, presence, ranked fractions, flag → (N, 230) space-group
    logits. With ``sqrt_channel`` the network adds √pattern as a third channel itself.

    ``drop_chemistry`` / ``drop_diffraction``: per-sample probabilities of zeroing a whole
    modality in training (modality drop-out)."""

    def __init__(self, arch: dict | None = None, drop_chemistry: float = 0.5,
                 drop_diffraction: float = 0.05):
        super().__init__()
        arch = {**DEFAULT_ARCH, **(arch or {})}
        self.arch = arch
        self.drop_chemistry, self.drop_diffraction = drop_chemistry, drop_diffraction
        layers, cin, length = [], 3 if arch["sqrt_channel"] else 2, int(arch["q"][2])
        for c, k in arch["conv"]:
            layers += [nn.Conv1d(cin, c, k, padding=k // 2), nn.MaxPool1d(2), nn.ReLU(True)]
            cin, length = c, length // 2
        self.diffraction = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(cin * length, arch["diffraction_features"]),
            nn.ReLU(True))
        chem, cin = [], N_CHEM
        for h in arch["chemistry_hidden"]:
            chem += [nn.Linear(cin, h), nn.ReLU(True)]
            cin = h
        self.chemistry = nn.Sequential(*chem)
        width = arch["diffraction_features"] + cin
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, arch["hidden"]), nn.ReLU(True),
                                  nn.Dropout(0.2), nn.Linear(arch["hidden"], N_SPACE_GROUPS))

    def forward(self, x: torch.Tensor, chem: torch.Tensor) -> torch.Tensor:
        if self.arch["sqrt_channel"]:
            x = torch.cat([x, torch.sqrt(x[:, :1].clamp_min(0))], dim=1)
        fd = self.diffraction(x)
        if self.training and self.drop_chemistry > 0:
            keep = (torch.rand(len(chem), 1, device=chem.device) >= self.drop_chemistry)
            chem = chem * keep
        fc = self.chemistry(chem)
        if self.training and self.drop_diffraction > 0:
            # only where chemistry is there to classify from
            has_chem = chem[:, -1:] > 0
            drop = (torch.rand(len(fd), 1, device=fd.device) < self.drop_diffraction) & has_chem
            fd = fd * (~drop)
        return self.head(self.norm(torch.cat([fd, fc], dim=1)))


# ------------------------------------------------------------------------------------
# inputs
class InputError(ValueError):
    """Patterns, 2θ axis, wavelength or composition a user gave that cannot be used."""


def rebin_matrix(two_theta: np.ndarray, wavelength: float, q: np.ndarray):
    """(W sparse (M, len(q)), measured (len(q),)): ``counts @ W`` re-bins patterns on
    ``two_theta`` (degrees) onto the Q grid ``q``: bins holding measured points get their
    mean, bins between measured points (a coarse scan) are interpolated linearly, bins
    outside the measured range are 0."""
    from scipy.sparse import csr_matrix

    qs = q_of(two_theta, wavelength)
    edges = np.concatenate([[1.5 * q[0] - 0.5 * q[1]], (q[1:] + q[:-1]) / 2,
                            [1.5 * q[-1] - 0.5 * q[-2]]])  # bin edges (any grid)
    idx = np.searchsorted(edges, qs, side="right") - 1
    inside = np.nonzero((idx >= 0) & (idx < len(q)))[0]
    counts = np.bincount(idx[inside], minlength=len(q)).astype(float)
    rows, cols, vals = [inside], [idx[inside]], [1.0 / counts[idx[inside]]]
    measured = (edges[1:] >= qs.min()) & (edges[:-1] <= qs.max())
    gaps = np.nonzero(measured & (counts == 0))[0]
    if gaps.size:
        order = np.argsort(qs)
        sq = qs[order]
        j = np.clip(np.searchsorted(sq, q[gaps]), 1, len(sq) - 1)
        t = np.clip((q[gaps] - sq[j - 1]) / np.maximum(sq[j] - sq[j - 1], 1e-12), 0, 1)
        rows += [order[j - 1], order[j]]
        cols += [gaps, gaps]
        vals += [1 - t, t]
    w = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(len(qs), len(q)))  # duplicates are summed
    return w, measured


def rebin(patterns: np.ndarray, two_theta: np.ndarray, wavelength: float,
          q: np.ndarray, matrix=None) -> tuple[np.ndarray, np.ndarray]:
    """Counts (N, M) on ``two_theta`` (degrees) → (normalised patterns, coverage mask) on
    the Q grid ``q`` (see ``rebin_matrix``; ``matrix``: its result, if already at hand)."""
    w, measured = matrix if matrix is not None else rebin_matrix(two_theta, wavelength, q)
    out = np.asarray((w.T @ np.asarray(patterns, float).T).T)
    mask = np.broadcast_to(measured.astype(np.float32), out.shape).copy()
    return _normalise(out, mask), mask


def encode_composition(composition, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``None``, one composition for all ``n`` patterns, or a list of ``n`` → (n, N_CHEM)
    chemistry inputs and (n,) whether each has a composition. A composition is a dict
    ``{"Mn": 1, "O": 1}`` (amounts or fractions), a formula string ``"MnO"`` or a pymatgen
    ``Composition``; an empty one counts as none."""
    if composition is None:
        return chemistry_features(np.zeros((n, len(ELEMENTS)), np.float32)), np.zeros(n, bool)
    items = list(composition) if isinstance(composition, (list, tuple)) else [composition] * n
    if len(items) != n:
        raise InputError(f"{len(items)} compositions for {n} patterns; give one, or one per "
                         "pattern")
    fractions = np.zeros((n, len(ELEMENTS)), np.float32)
    for i, comp in enumerate(items):
        if comp is not None:
            fractions[i] = composition_fractions(comp)
    chem = chemistry_features(fractions)
    return chem, chem[:, -1] > 0


def chemistry_features(fractions: np.ndarray) -> np.ndarray:
    """(N, N_CHEM) chemistry inputs from element-fraction rows (N, len(ELEMENTS)):
    fractions, presence, the ``N_RANKED`` largest fractions ranked, and a flag that says
    whether there is a composition (all zero: none)."""
    fractions = np.asarray(fractions, np.float32)
    n, e = fractions.shape
    chem = np.zeros((n, N_CHEM), np.float32)
    chem[:, :e] = fractions
    chem[:, e:2 * e] = fractions > 0
    chem[:, 2 * e:2 * e + N_RANKED] = -np.sort(-fractions, axis=1)[:, :N_RANKED]
    chem[:, -1] = fractions.sum(axis=1) > 0
    return chem


def composition_fractions(comp) -> np.ndarray:
    """Element fractions (len(ELEMENTS),) of a dict / formula / pymatgen Composition."""
    if isinstance(comp, str):
        from pymatgen.core import Composition

        try:
            comp = Composition(comp)
        except Exception as err:
            raise InputError(f"cannot read the formula {comp!r}: {err}") from None
    if hasattr(comp, "get_el_amt_dict"):
        comp = comp.get_el_amt_dict()
    if not isinstance(comp, dict):
        raise InputError(f"a composition is a dict like {{'Mn': 1, 'O': 1}} or a formula, "
                         f"not {type(comp).__name__}")
    v = np.zeros(len(ELEMENTS), np.float32)
    for el, amount in comp.items():
        el = str(el).strip()
        if el not in Z:
            raise InputError(f"unknown element {el!r} in the composition (known: H … Pu)")
        amount = float(amount)
        if not np.isfinite(amount) or amount < 0:
            raise InputError(f"amount of {el} is {amount}; amounts must be finite and ≥ 0")
        v[Z[el]] += amount
    total = v.sum()
    return v / total if total > 0 else v


# ------------------------------------------------------------------------------------
class StructurePredictor:
    """What ``load_model("structure")`` returns; see the module doc."""

    crystal_systems = CRYSTAL_SYSTEMS
    point_groups = POINT_GROUPS

    def __init__(self, net: StructureNet, card: dict, device: str = "cpu",
                 batch_size: int = 1024):
        self.card = dict(card)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size
        self.q = q_grid(int(net.arch["q"][2]), float(net.arch["q"][0]), float(net.arch["q"][1]))
        t = card.get("temperature", {})
        self.temperature = {"chemistry": float(t.get("chemistry", 1.0)),
                            "pattern_only": float(t.get("pattern_only", 1.0))}
        self._cs = _membership((1, 3, 16, 75, 143, 168, 195), 7)
        self._pg = _membership(_PG_STARTS, 32)
        self._rebin_key, self._rebin = None, None

    @property
    def name(self) -> str:
        return self.card.get("name", NAME)

    def provenance(self) -> dict:
        return weights_io.provenance(self.card)

    def prepare(self, patterns, two_theta, wavelength) -> tuple[np.ndarray, np.ndarray]:
        """Counts (N, M) or (M,) on ``two_theta`` → (patterns, masks) on the model's Q grid."""
        y = np.asarray(patterns, float)
        if y.ndim == 1:
            y = y[None]
        tt = np.asarray(two_theta, float).ravel()
        if y.ndim != 2 or y.shape[1] != tt.size:
            raise InputError(f"patterns of shape {np.shape(patterns)} do not match a 2θ axis "
                             f"of {tt.size} points; give (N, {tt.size}) or ({tt.size},)")
        if tt.size < 16:
            raise InputError(f"a 2θ axis of {tt.size} points is too short to classify")
        if not np.all(np.isfinite(tt)) or tt.min() < 0 or tt.max() >= 180:
            raise InputError("2θ must be finite degrees in [0, 180)")
        try:
            wl = float(wavelength)
        except (TypeError, ValueError):
            raise InputError(f"wavelength {wavelength!r} is not a number (Å)") from None
        if not np.isfinite(wl) or not 0.05 <= wl <= 5:
            raise InputError(f"wavelength {wl} Å is outside 0.05-5 Å; give it in Å")
        bad = ~np.all(np.isfinite(y), axis=1)
        if bad.any():
            raise InputError(f"pattern(s) {np.nonzero(bad)[0][:5].tolist()} hold NaN or inf")
        qs = q_of(tt, wl)
        overlap = min(qs.max(), self.q[-1]) - max(qs.min(), self.q[0])
        if overlap < 0.5:
            raise InputError(f"the pattern covers Q {qs.min():.2f}-{qs.max():.2f} Å⁻¹, the "
                             f"model {self.q[0]:.2f}-{self.q[-1]:.2f} Å⁻¹: too little overlap")
        key = (tt.tobytes(), wl)
        if self._rebin_key != key:  # live: the same axis every batch
            self._rebin = rebin_matrix(tt, wl, self.q)
            self._rebin_key = key
        return rebin(y, tt, wl, self.q, self._rebin)

    def logits(self, x: np.ndarray, mask: np.ndarray, chem: np.ndarray) -> torch.Tensor:
        """Raw space-group logits (N, 230) of prepared inputs (no temperature)."""
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), self.batch_size):
                xb = torch.from_numpy(np.stack([x[s:s + self.batch_size],
                                                mask[s:s + self.batch_size]], 1)).float()
                cb = torch.from_numpy(chem[s:s + self.batch_size]).float()
                out.append(self.net(xb.to(self.device), cb.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, N_SPACE_GROUPS)

    def probabilities(self, logits: torch.Tensor, has_chem: np.ndarray) -> dict:
        t = torch.where(torch.from_numpy(np.asarray(has_chem, bool)),
                        torch.tensor(self.temperature["chemistry"]),
                        torch.tensor(self.temperature["pattern_only"]))
        p = torch.softmax(logits / t[:, None], dim=1)
        return {"crystal_system": (p @ self._cs).numpy(),
                "point_group": (p @ self._pg).numpy(),
                "space_group": p.numpy()}

    def predict(self, patterns, two_theta, wavelength, composition=None) -> dict:
        """Counts (N, M) (or one pattern (M,)) on ``two_theta`` (degrees) at ``wavelength``
        (Å), ``composition`` None / one / N compositions → probabilities: crystal_system
        (N, 7: triclinic … cubic), point_group (N, 32), space_group (N, 230: numbers 1 …
        230) and chemistry_used (N,) bool."""
        x, mask = self.prepare(patterns, two_theta, wavelength)
        chem, has = encode_composition(composition, len(x))
        out = self.probabilities(self.logits(x, mask, chem), has)
        out["chemistry_used"] = has
        return out


def top_space_groups(p_space_group: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(numbers (N, k), probabilities (N, k)) of the ``k`` most probable space groups."""
    p = np.atleast_2d(p_space_group)
    idx = np.argsort(-p, axis=1)[:, :k]
    return idx + 1, np.take_along_axis(p, idx, axis=1)


def space_group_symbol(number: int) -> str:
    """Hermann-Mauguin symbol of space group ``number`` (pymatgen's tables)."""
    from pymatgen.symmetry.groups import SpaceGroup

    return SpaceGroup.from_int_number(int(number)).symbol


def from_tensors(state: dict, card: dict) -> StructureNet:
    arch = {"sqrt_channel": False, **card.get("architecture", {})}  # older cards: no √ channel
    net = StructureNet(arch)
    net.load_state_dict(state)
    return net


def load(path: str | Path | None = None, device: str = "cpu") -> StructurePredictor:
    """The shipped ``structure`` weights (``path=None``) or your own ``.safetensors``."""
    state, card = weights_io.load(path or SHIPPED)
    if card.get("model", NAME) != NAME:
        raise ValueError(f"{path} holds a {card.get('model')!r} model, not {NAME!r}")
    return StructurePredictor(from_tensors(state, card), card, device=device)


__all__ = ["CRYSTAL_SYSTEMS", "POINT_GROUPS", "InputError", "StructureNet",
           "StructurePredictor", "crystal_system_index", "encode_composition", "load",
           "point_group_index", "rebin", "space_group_symbol", "top_space_groups"]

"""Crystal structures in every space group, their peak lists, and patterns at any wavelength.

Training data for the structure classifier (``models.structure``), nothing downloaded:

- **random symmetric crystals** (``pyxtal``): a space group drawn uniformly from 1-230,
  1-3 elements with counts that fit the group's Wyckoff positions, the most numerous
  element an anion (O, S, F, Cl, N, Se, ...) and the others cations, or an intermetallic;
- **prototypes built in code** (``Structure.from_spacegroup``): rock salt, fluorite,
  perovskite, spinel, rutile, corundum, wurtzite, ... with substituted elements and a
  scaled cell.

Peak lists come from pymatgen's ``XRDCalculator`` once per structure (computed on the
primitive cell, which has the same reflections and fewer atoms) and are stored as
d-spacings with the Lorentz-polarisation factor divided out, so a pattern at any
wavelength follows from them (``render``). They are cached in chunks under
``~/.cache/bluesky-xrdml/crystals/`` (or ``$XRDML_CACHE`` / a directory you give);
structure ``i`` of seed ``s`` is the same on every machine (its own RNG, seeded from
``(s, i)``), so a set is reproducible and can be generated in parallel or resumed.

Every structure belongs to a **composition family**, its chemical system ("Ce-O");
``split`` puts whole families into train / validation / test, so test compositions are
never seen in training.

``render`` draws cheap augmentations per pattern: wavelength and 2θ range, zero shift,
isotropic strain, crystallite size and instrument width, preferred orientation
(March-Dollase along a random low-index axis), background, Poisson noise and impurity
peaks. ``measured_composition`` turns a true composition into what an XRF/EDS detector
reports: noisy fractions, and with a probability the light elements (Li, B, C, N, O)
missing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

logger = logging.getLogger(__name__)

# Element symbols by atomic number (1..94): the chemistry vector's order
ELEMENTS: tuple[str, ...] = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge "
    "As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm "
    "Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U "
    "Np Pu"
).split()
Z = {el: i for i, el in enumerate(ELEMENTS)}
LIGHT = ("Li", "B", "C", "N", "O")  # what XRF cannot see reliably

CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal",
                   "hexagonal", "cubic")
# first space-group number of each crystal system (the last is 230)
_SYSTEM_STARTS = (1, 3, 16, 75, 143, 168, 195, 231)


def crystal_system_index(space_group: int | np.ndarray) -> np.ndarray:
    """Index into ``CRYSTAL_SYSTEMS`` of space group number(s) 1-230."""
    return np.searchsorted(np.array(_SYSTEM_STARTS), np.asarray(space_group), side="right") - 1


ANIONS = {"O": 0.45, "S": 0.12, "F": 0.1, "Cl": 0.06, "N": 0.07, "Se": 0.05, "Br": 0.03,
          "C": 0.03, "P": 0.03, "Te": 0.02, "As": 0.02, "B": 0.02, "I": 0.02, "H": 0.0}
CATIONS = ("Li Be Na Mg Al Si K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge Rb Sr Y Zr Nb Mo Ru Rh "
           "Pd Ag Cd In Sn Sb Cs Ba La Ce Pr Nd Sm Eu Gd Tb Dy Ho Er Yb Lu Hf Ta W Re Os Ir Pt "
           "Au Hg Tl Pb Bi Th U").split()
METALS = ("Li Be Na Mg Al K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Rb Sr Y Zr Nb Mo Ru Rh Pd Ag "
          "Cd In Sn Cs Ba La Ce Nd Sm Gd Hf Ta W Re Os Ir Pt Au Tl Pb Bi Th U Si Ge Sb").split()

# Prototypes: name -> (space group, lattice (a, b, c, alpha, beta, gamma), site roles,
# fractional coordinates of the asymmetric unit). Roles: "A"/"B" cations, "X" anion, "M" metal.
PROTOTYPES: dict[str, tuple] = {
    "rocksalt": (225, (4.2, 4.2, 4.2, 90, 90, 90), "AX", [[0, 0, 0], [.5, .5, .5]]),
    "fluorite": (225, (5.4, 5.4, 5.4, 90, 90, 90), "AX", [[0, 0, 0], [.25, .25, .25]]),
    "zincblende": (216, (5.6, 5.6, 5.6, 90, 90, 90), "AX", [[0, 0, 0], [.25, .25, .25]]),
    "cscl": (221, (3.4, 3.4, 3.4, 90, 90, 90), "AX", [[0, 0, 0], [.5, .5, .5]]),
    "perovskite": (221, (3.9, 3.9, 3.9, 90, 90, 90), "ABX",
                   [[.5, .5, .5], [0, 0, 0], [.5, 0, 0]]),
    "spinel": (227, (8.1, 8.1, 8.1, 90, 90, 90), "ABX",
               [[.125, .125, .125], [.5, .5, .5], [.2625, .2625, .2625]]),
    "fcc": (225, (3.8, 3.8, 3.8, 90, 90, 90), "M", [[0, 0, 0]]),
    "bcc": (229, (3.1, 3.1, 3.1, 90, 90, 90), "M", [[0, 0, 0]]),
    "diamond": (227, (5.5, 5.5, 5.5, 90, 90, 90), "M", [[.125, .125, .125]]),
    "pyrite": (205, (5.4, 5.4, 5.4, 90, 90, 90), "AX", [[0, 0, 0], [.385, .385, .385]]),
    "rutile": (136, (4.6, 4.6, 3.0, 90, 90, 90), "AX", [[0, 0, 0], [.305, .305, 0]]),
    "anatase": (141, (3.8, 3.8, 9.5, 90, 90, 90), "AX", [[0, .75, .125], [0, .75, .333]]),
    "scheelite": (88, (5.2, 5.2, 11.4, 90, 90, 90), "ABX",
                  [[0, .25, .625], [0, .25, .125], [.15, .01, .21]]),
    "k2nif4": (139, (3.8, 3.8, 13.2, 90, 90, 90), "ABXX",
               [[0, 0, .355], [0, 0, 0], [0, .5, 0], [0, 0, .16]]),
    "hcp": (194, (3.0, 3.0, 4.9, 90, 90, 120), "M", [[1 / 3, 2 / 3, .25]]),
    "wurtzite": (186, (3.2, 3.2, 5.2, 90, 90, 120), "AX", [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, .38]]),
    "nias": (194, (3.6, 3.6, 5.0, 90, 90, 120), "AX", [[0, 0, 0], [1 / 3, 2 / 3, .25]]),
    "cdi2": (164, (4.0, 4.0, 6.5, 90, 90, 120), "AX", [[0, 0, 0], [1 / 3, 2 / 3, .25]]),
    "corundum": (167, (4.8, 4.8, 13.0, 90, 90, 120), "AX", [[0, 0, .352], [.306, 0, .25]]),
    "ilmenite": (148, (5.1, 5.1, 14.1, 90, 90, 120), "ABX",
                 [[0, 0, .355], [0, 0, .146], [.317, .02, .245]]),
    "quartz": (154, (4.9, 4.9, 5.4, 90, 90, 120), "AX", [[.47, 0, 2 / 3], [.414, .268, .786]]),
    "chalcopyrite": (122, (5.3, 5.3, 10.4, 90, 90, 90), "ABX",
                     [[0, 0, 0], [0, 0, .5], [.25, .25, .125]]),
    "gdfeo3": (62, (5.6, 7.7, 5.4, 90, 90, 90), "ABXX",
               [[.06, .25, .99], [0, 0, .5], [.47, .25, .09], [.3, .05, .7]]),
    "baddeleyite": (14, (5.15, 5.2, 5.3, 90, 99.2, 90), "AXX",
                    [[.276, .04, .208], [.07, .332, .345], [.449, .757, .479]]),
}


# --------------------------------------------------------------------------------------
# one structure
@dataclass
class Crystal:
    """One structure's record: space group, composition, peak list (LP factor removed)."""

    space_group: int
    composition: dict  # element -> atoms per formula unit (reduced)
    d: np.ndarray  # d-spacings, Å, descending
    intensity: np.ndarray  # |F|² × multiplicity, max 1
    hkl: np.ndarray  # (K, 3) representative Miller indices
    reciprocal: np.ndarray  # (3, 3) reciprocal lattice matrix (rows a*, b*, c*; 1/Å)
    source: str  # "pyxtal" or "prototype:<name>"

    @property
    def family(self) -> str:
        return "-".join(sorted(self.composition))


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _choose(rng, options, weights=None):
    if weights is None:
        return options[rng.integers(len(options))]
    w = np.asarray(weights, float)
    return options[rng.choice(len(options), p=w / w.sum())]


def _elements(rng, n: int, intermetallic: bool) -> list[str]:
    if intermetallic or n == 1:
        return [str(e) for e in rng.choice(METALS, size=n, replace=False)]
    anion = str(_choose(rng, list(ANIONS), list(ANIONS.values())))
    cations = [c for c in CATIONS if c != anion]
    return [anion] + [str(e) for e in rng.choice(cations, size=n - 1, replace=False)]


def _species_for(counts: list[int], rng: np.random.Generator, intermetallic: bool) -> list[str]:
    """Elements for species with these atom ``counts``: the most numerous an anion (unless
    ``intermetallic``), the others cations."""
    order = np.argsort(counts)[::-1]  # most numerous first: the anion
    species = _elements(rng, len(counts), intermetallic)
    return [species[int(np.where(order == i)[0][0])] for i in range(len(counts))]


def random_pyxtal(space_group: int, rng: np.random.Generator, max_atoms: int = 40):
    """A random pymatgen Structure in ``space_group`` with a plausible composition, or None."""
    from pyxtal import pyxtal
    from pyxtal.symmetry import Group

    group = Group(int(space_group))
    mults = sorted({w.multiplicity for w in group.Wyckoff_positions})
    n_species = int(_choose(rng, [1, 2, 3], [0.15, 0.55, 0.3]))
    intermetallic = rng.random() < 0.15
    for _ in range(20):
        small = [m for m in mults if m <= max(mults[0], max_atoms // (n_species + 1))]
        counts = []
        for _s in range(n_species):
            k = 1 if rng.random() < 0.7 else 2
            counts.append(int(sum(rng.choice(small, size=k))))
        if sum(counts) > max(max_atoms, mults[0] * n_species):
            continue
        ok, _free = group.check_compatible(counts)
        if not ok:
            continue
        species = _species_for(counts, rng, intermetallic)
        xtal = pyxtal()
        try:
            xtal.from_random(3, int(space_group), species, counts, factor=1.1,
                             random_state=int(rng.integers(2**31)))
        except Exception:  # pyxtal gives up on some combinations
            continue
        if xtal.valid:
            return xtal.to_pymatgen()
    return None


@lru_cache(maxsize=1)
def _mp_table(max_atoms: int = 40) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """(space groups, Wyckoff index lists, probabilities) of pyxtal's table of how often
    each space group and combination of Wyckoff positions occurs among Materials Project
    structures (``pyxtal/database/spg_num_wps_mp.csv``), cells of ≤ ``max_atoms`` atoms."""
    import csv
    from importlib.resources import files

    groups, sites, counts = [], [], []
    with files("pyxtal").joinpath("database/spg_num_wps_mp.csv").open() as f:
        for row in csv.DictReader(f):
            if int(row["n_atoms"]) <= max_atoms:
                groups.append(int(row["spg"]))
                sites.append([int(w) for w in row["wps"].split("-")])
                counts.append(float(row["count"]))
    p = np.array(counts)
    return np.array(groups), sites, p / p.sum()


def space_group_prior(prior: str = "mp") -> np.ndarray:
    """(230,) probability of space groups 1…230 under a prior: ``"uniform"``, or ``"mp"``
    (how often they occur among Materials Project structures of ≤ 40 atoms, from pyxtal's
    table)."""
    if prior == "uniform":
        return np.full(230, 1 / 230)
    groups, _, p = _mp_table()
    return np.bincount(groups - 1, p, minlength=230)


def random_pyxtal_mp(rng: np.random.Generator):
    """A random pymatgen Structure whose space group and Wyckoff positions are drawn as
    often as they occur among Materials Project structures (``_mp_table``), with
    plausible elements on them; (structure, space group) or (None, space group)."""
    from pyxtal import pyxtal
    from pyxtal.symmetry import Group

    groups, sites, p = _mp_table()
    k = int(rng.choice(len(p), p=p))
    sg, wps = int(groups[k]), sites[k]
    group = Group(sg)
    labels = [group.Wyckoff_positions[w].get_label() for w in wps]
    mult = [group.Wyckoff_positions[w].multiplicity for w in wps]
    n_species = min(len(wps), int(_choose(rng, [1, 2, 3], [0.15, 0.5, 0.35])))
    # every species gets at least one site, the rest at random
    owner = rng.permutation(np.concatenate([np.arange(n_species),
                                            rng.integers(0, n_species, len(wps) - n_species)]))
    counts = [int(sum(m for m, o in zip(mult, owner) if o == s)) for s in range(n_species)]
    species = _species_for(counts, rng, rng.random() < 0.15)
    site_lists = [[lab for lab, o in zip(labels, owner) if o == s] for s in range(n_species)]
    xtal = pyxtal()
    for _ in range(3):
        try:
            xtal.from_random(3, sg, species, counts, factor=1.1, sites=site_lists,
                             random_state=int(rng.integers(2**31)))
        except Exception:  # pyxtal gives up on some combinations
            continue
        if xtal.valid:
            return xtal.to_pymatgen(), sg
    return None, sg


def prototype(name: str, rng: np.random.Generator):
    """Prototype ``name`` with random elements in its roles and a scaled cell."""
    from pymatgen.core import Lattice, Structure

    sg, (a, b, c, al, be, ga), roles, coords = PROTOTYPES[name]
    pick: dict[str, str] = {}
    anion = _choose(rng, list(ANIONS), list(ANIONS.values()))
    for role in dict.fromkeys(roles):
        if role == "X":
            pick[role] = anion
        elif role == "M":
            pick[role] = str(rng.choice(METALS))
        else:
            taken = set(pick.values())
            pick[role] = str(rng.choice([c for c in CATIONS if c not in taken]))
    species = [pick[r] for r in roles]
    s = float(rng.uniform(0.88, 1.15))
    lattice = Lattice.from_parameters(a * s, b * s * rng.uniform(0.98, 1.02),
                                      c * s * rng.uniform(0.97, 1.03), al, be, ga)
    # the symmetry of a prototype holds for any value of its free parameters
    if sg in (225, 216, 221, 229, 227, 205):
        lattice = Lattice.cubic(a * s)
    elif sg >= 143 and sg <= 194:
        lattice = Lattice.hexagonal(a * s, c * s * rng.uniform(0.97, 1.03))
    elif sg >= 75:
        lattice = Lattice.tetragonal(a * s, c * s * rng.uniform(0.97, 1.03))
    return Structure.from_spacegroup(sg, lattice, species, coords, tol=1e-3)


def peaks(structure, q_max: float = 7.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, intensity without LP factor (max 1), representative hkl (K, 3)) of a structure,
    reflections with Q = 2π/d ≤ ``q_max`` (Å⁻¹), from pymatgen's ``XRDCalculator``."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    wavelength = 0.5
    tt_max = math.degrees(2 * math.asin(min(1.0, wavelength * q_max / (4 * math.pi))))
    pattern = XRDCalculator(wavelength=wavelength).get_pattern(
        structure, scaled=False, two_theta_range=(0.0, tt_max))
    theta = np.radians(np.asarray(pattern.x)) / 2
    lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
    inten = np.asarray(pattern.y) / lp
    hkl = np.array([_three(f[0]["hkl"]) for f in pattern.hkls], int).reshape(-1, 3)
    d = np.asarray(pattern.d_hkls, float)
    keep = inten > 1e-6 * inten.max() if inten.size else inten.astype(bool)
    inten = inten[keep] / max(inten[keep].max(), 1e-30) if keep.any() else inten[keep]
    return d[keep], inten, hkl[keep]


def _three(hkl) -> tuple[int, int, int]:
    hkl = tuple(int(i) for i in hkl)
    return (hkl[0], hkl[1], hkl[3]) if len(hkl) == 4 else hkl


def make_crystal(seed: int, index: int, prototype_share: float = 0.15,
                 prior: str = "uniform") -> Crystal | None:
    """Structure ``index`` of set ``seed``: a prototype (share ``prototype_share``) or a
    random pyxtal crystal, its space group drawn uniformly (``prior="uniform"``) or, with
    its Wyckoff positions, as often as among Materials Project structures (``"mp"``);
    None if generation failed."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    rng = _rng(seed, index)
    if rng.random() < prototype_share:
        name = str(rng.choice(sorted(PROTOTYPES)))
        structure, source, sg = prototype(name, rng), f"prototype:{name}", PROTOTYPES[name][0]
    else:
        if prior == "mp":
            structure, sg = random_pyxtal_mp(rng)
        else:
            sg = int(rng.integers(1, 231))
            structure = random_pyxtal(sg, rng)
        source = "pyxtal"
        if structure is None:
            return None
    try:
        # the symmetry actually found (a random cell may hold a higher symmetry by chance)
        found = SpacegroupAnalyzer(structure, symprec=1e-3).get_space_group_number()
        if found != sg:
            return None
        primitive = structure.get_primitive_structure(tolerance=1e-3)
        d, inten, hkl = peaks(primitive)
    except Exception as err:  # a failed structure is skipped, never fatal
        logger.debug("structure %s/%s failed: %s", seed, index, err)
        return None
    if d.size < 3:
        return None
    comp = structure.composition.reduced_composition.get_el_amt_dict()
    return Crystal(sg, {str(k): float(v) for k, v in comp.items()}, d, inten.astype(np.float32),
                   hkl, np.asarray(primitive.lattice.reciprocal_lattice_crystallographic.matrix),
                   source)


# --------------------------------------------------------------------------------------
# the cached set
def cache_dir(path: str | Path | None = None) -> Path:
    """Where structure sets are kept: ``path``, ``$XRDML_CACHE/crystals`` or
    ``~/.cache/bluesky-xrdml/crystals``."""
    if path is not None:
        return Path(path)
    root = os.environ.get("XRDML_CACHE") or Path.home() / ".cache" / "bluesky-xrdml"
    return Path(root) / "crystals"


@dataclass
class CrystalSet:
    """Many structures, flat arrays (peaks of structure i at ``offsets[i]:offsets[i+1]``)."""

    space_group: np.ndarray  # (S,)
    composition: np.ndarray  # (S, len(ELEMENTS)) atoms per formula unit
    d: np.ndarray
    intensity: np.ndarray
    hkl: np.ndarray
    offsets: np.ndarray  # (S + 1,)
    reciprocal: np.ndarray  # (S, 3, 3)
    family: np.ndarray  # (S,) str
    source: np.ndarray  # (S,) str

    def __len__(self) -> int:
        return len(self.space_group)

    @classmethod
    def from_crystals(cls, crystals: list[Crystal]) -> CrystalSet:
        comp = np.zeros((len(crystals), len(ELEMENTS)), np.float32)
        for i, c in enumerate(crystals):
            for el, n in c.composition.items():
                comp[i, Z[el]] = n
        counts = [len(c.d) for c in crystals]
        return cls(
            space_group=np.array([c.space_group for c in crystals], np.int16),
            composition=comp,
            d=np.concatenate([c.d for c in crystals]).astype(np.float32) if crystals
            else np.zeros(0, np.float32),
            intensity=np.concatenate([c.intensity for c in crystals]).astype(np.float32)
            if crystals else np.zeros(0, np.float32),
            hkl=np.concatenate([c.hkl for c in crystals]).astype(np.int16) if crystals
            else np.zeros((0, 3), np.int16),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            reciprocal=np.array([c.reciprocal for c in crystals], np.float32).reshape(-1, 3, 3),
            family=np.array([c.family for c in crystals]),
            source=np.array([c.source for c in crystals]),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CrystalSet:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})

    @classmethod
    def concatenate(cls, sets: list[CrystalSet]) -> CrystalSet:
        sets = [s for s in sets if len(s)]
        offsets, total = [np.zeros(1, np.int64)], 0
        for s in sets:
            offsets.append(s.offsets[1:] + total)
            total += s.offsets[-1]
        return cls(
            space_group=np.concatenate([s.space_group for s in sets]),
            composition=np.concatenate([s.composition for s in sets]),
            d=np.concatenate([s.d for s in sets]),
            intensity=np.concatenate([s.intensity for s in sets]),
            hkl=np.concatenate([s.hkl for s in sets]),
            offsets=np.concatenate(offsets),
            reciprocal=np.concatenate([s.reciprocal for s in sets]),
            family=np.concatenate([s.family for s in sets]),
            source=np.concatenate([s.source for s in sets]),
        )

    def subset(self, index) -> CrystalSet:
        index = np.asarray(index, int)
        parts = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in index]
        sel = np.concatenate(parts) if parts else np.zeros(0, int)
        counts = np.diff(self.offsets)[index]
        return CrystalSet(self.space_group[index], self.composition[index], self.d[sel],
                          self.intensity[sel], self.hkl[sel],
                          np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                          self.reciprocal[index], self.family[index], self.source[index])

    def split(self, test: float = 0.1, validation: float = 0.1) -> dict[str, np.ndarray]:
        """Indices of train / validation / test, whole composition families together
        (a family's place is fixed by a hash of its name, the same on every machine)."""
        u = np.array([int(hashlib.sha1(f.encode()).hexdigest()[:8], 16) / 2**32
                      for f in self.family])
        return {"test": np.nonzero(u < test)[0],
                "validation": np.nonzero((u >= test) & (u < test + validation))[0],
                "train": np.nonzero(u >= test + validation)[0]}


def set_dir(seed: int = 0, directory: str | Path | None = None, prior: str = "uniform") -> Path:
    """Where set ``seed`` of ``prior`` is cached (``seed<seed>`` for the uniform prior,
    ``<prior>-seed<seed>`` otherwise)."""
    name = f"seed{seed}" if prior == "uniform" else f"{prior}-seed{seed}"
    return cache_dir(directory) / name


def generate(n: int, seed: int = 0, directory: str | Path | None = None, chunk: int = 100,
             log=None, minutes: float | None = None, part: int = 0,
             parts: int = 1, timeout: float = 20.0, prior: str = "uniform") -> CrystalSet:
    """The first ``n`` structures of set ``seed`` (space groups drawn by ``prior``, see
    ``make_crystal``), generated or read from the cache.

    Chunks of ``chunk`` structures are written as they complete, so an interrupted run
    resumes where it stopped; ``minutes`` bounds the time spent generating (what exists
    then is returned). ``part``/``parts``: this process does every ``parts``-th chunk
    (run ``parts`` processes with ``part`` = 0 … parts-1 to generate in parallel).
    A structure that takes longer than ``timeout`` seconds (pyxtal sometimes searches a
    long time) is skipped, so the set depends on the machine only through such skips."""
    root = set_dir(seed, directory, prior)
    sets, t0 = [], time.time()
    for c0 in range(0, n, chunk):
        if (c0 // chunk) % parts != part:
            continue
        path = root / f"chunk{c0 // chunk:05d}-{chunk}.npz"
        if path.exists():
            sets.append(CrystalSet.load(path))
            continue
        if minutes is not None and time.time() - t0 > 60 * minutes:
            break
        crystals = [c for i in range(c0, min(c0 + chunk, n))
                    if (c := _bounded(make_crystal, seed, i, prior=prior,
                                      seconds=timeout)) is not None]
        block = CrystalSet.from_crystals(crystals)
        if c0 + chunk <= n:  # only whole chunks are cached
            block.save(path)
        sets.append(block)
        if log:
            done = min(c0 + chunk, n)
            log(f"structures {done}/{n}: {len(crystals)} of {min(chunk, n - c0)} kept, "
                f"{time.time() - t0:.0f} s")
    return CrystalSet.concatenate(sets) if sets else CrystalSet.from_crystals([])


class _Timeout(BaseException):  # not caught by the generators' `except Exception`
    pass


def _bounded(fn, *args, seconds: float = 20.0, **kwargs):
    """``fn(*args, **kwargs)``, or None after ``seconds`` (SIGALRM; no limit off the main
    thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not seconds:
        return fn(*args, **kwargs)

    def _raise(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args, **kwargs)
    except _Timeout:
        logger.info("structure %s skipped: longer than %s s", args, seconds)
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cached(seed: int = 0, directory: str | Path | None = None,
           prior: str = "uniform") -> CrystalSet:
    """Every chunk of set ``seed`` (of ``prior``) already in the cache."""
    root = set_dir(seed, directory, prior)
    paths = [p for p in (sorted(root.glob("chunk*.npz")) if root.exists() else [])
             if not p.name.endswith(".tmp.npz")]
    if not paths:
        return CrystalSet.from_crystals([])
    return CrystalSet.concatenate([CrystalSet.load(p) for p in paths])


# --------------------------------------------------------------------------------------
# patterns and compositions at training time
def q_grid(n: int = 1024, q_min: float = 0.5, q_max: float = 7.0) -> np.ndarray:
    """The model's fixed grid in Q = 4π sin θ / λ (Å⁻¹)."""
    return np.linspace(q_min, q_max, n)


def q_of(two_theta, wavelength: float) -> np.ndarray:
    return 4 * np.pi * np.sin(np.radians(np.asarray(two_theta, float)) / 2) / float(wavelength)


@dataclass(frozen=True)
class Augment:
    """Ranges of the per-pattern augmentations (recorded in the model card)."""

    wavelengths: tuple = (0.2, 0.3, 0.4066, 0.5, 0.6199, 0.7093, 1.5406)
    strain: float = 0.01  # isotropic, ± (uniform)
    lattice: float = 0.06  # symmetry-preserving lattice distortion, ± per strain component
    size_nm: tuple = (8.0, 300.0)  # log-uniform crystallite size
    instrument_deg: tuple = (0.005, 0.1)  # Gaussian FWHM in 2θ
    zero_shift_deg: float = 0.03
    march_dollase: tuple = (0.6, 1.0)  # r (1: none); applied to half of the patterns
    texture_jitter: float = 0.2  # log-normal per-peak intensity jitter
    background: float = 0.3  # up to this share of the strongest peak
    counts: tuple = (300.0, 1e5)  # log-uniform peak counts (Poisson)
    impurity: float = 0.3  # probability of impurity peaks (each up to 5 % of the strongest)
    q_low_cut: float = 1.0  # half of the patterns start up to this far above the grid's Q min
    q_max_min: float = 4.0  # the highest Q measured is uniform in q_max_min … grid max + 0.5


def lattice_strain(system: int, rng: np.random.Generator, amount: float) -> np.ndarray:
    """A deformation gradient F = 1 + ε (3×3, Cartesian) that keeps the symmetry of
    crystal system ``system`` (index into ``CRYSTAL_SYSTEMS``): each strain component the
    system allows is uniform in ±``amount``. Axes as pymatgen and pyxtal set up a standard
    cell: the unique axis along z (y for monoclinic, b unique), orthogonal axes along x, y, z.

    With the atoms' fractional coordinates fixed, the structure factors do not change, so
    a peak list's Miller indices on the strained reciprocal lattice ``R @ inv(F)`` give the
    peak positions of a new compound of the same structure type."""
    e = rng.uniform(-amount, amount, 6)
    if system == 6:  # cubic
        eps = np.diag([e[0]] * 3)
    elif system in (3, 4, 5):  # tetragonal, trigonal, hexagonal: c along z
        eps = np.diag([e[0], e[0], e[2]])
    elif system == 2:  # orthorhombic
        eps = np.diag(e[:3])
    elif system == 1:  # monoclinic, 2-fold axis along y
        eps = np.array([[e[0], 0, e[3]], [0, e[1], 0], [e[3], 0, e[2]]])
    else:  # triclinic
        eps = np.array([[e[0], e[3], e[4]], [e[3], e[1], e[5]], [e[4], e[5], e[2]]])
    return np.eye(3) + eps


def render(cs: CrystalSet, index: np.ndarray, rng: np.random.Generator, q: np.ndarray,
           aug: Augment | None = Augment()) -> tuple[np.ndarray, np.ndarray]:
    """Patterns (N, M) on the Q grid ``q`` and their coverage masks (N, M), normalised
    like ``models.structure.prepare`` does for measured patterns (max 1, 0 outside the
    measured range). ``aug=None``: clean patterns, full coverage, λ = 0.5 Å."""
    n, m = len(index), len(q)
    out = np.zeros((n, m), np.float32)
    mask = np.ones((n, m), np.float32)
    dq = q[1] - q[0]
    for row, i in enumerate(index):
        sl = slice(cs.offsets[i], cs.offsets[i + 1])
        d, inten, hkl = cs.d[sl].astype(float), cs.intensity[sl].astype(float), cs.hkl[sl]
        wl = 0.5 if aug is None else float(rng.choice(aug.wavelengths))
        if aug is not None:
            if aug.lattice > 0:
                system = int(crystal_system_index(cs.space_group[i]))
                g = hkl @ (cs.reciprocal[i] @ np.linalg.inv(lattice_strain(system, rng,
                                                                           aug.lattice)))
                d = 1 / np.linalg.norm(g, axis=1)
            d = d * (1 + rng.uniform(-aug.strain, aug.strain))
            if rng.random() < 0.5:  # March-Dollase preferred orientation
                r = rng.uniform(*aug.march_dollase)
                axis = np.array([(0, 0, 1), (1, 0, 0), (1, 1, 1), (1, 1, 0)][rng.integers(4)])
                g = hkl @ cs.reciprocal[i]
                ga = axis @ cs.reciprocal[i]
                cosa = np.abs(g @ ga) / (np.linalg.norm(g, axis=1) * np.linalg.norm(ga) + 1e-12)
                inten = inten * (r**2 * cosa**2 + (1 - cosa**2) / r) ** -1.5
            inten = inten * rng.lognormal(0, aug.texture_jitter, inten.size)
        s = wl / (2 * d)
        ok = s < 1
        d, inten, s = d[ok], inten[ok], s[ok]
        theta = np.arcsin(s)
        inten = inten * (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
        tt = 2 * theta
        if aug is not None:
            tt = tt + np.radians(rng.uniform(-aug.zero_shift_deg, aug.zero_shift_deg))
            size = math.exp(rng.uniform(*np.log(aug.size_nm))) * 10  # Å
            inst = np.radians(rng.uniform(*aug.instrument_deg))
            # FWHM in Q: size (2πK/L) and instrument (dQ/d2θ · width)
            w_size = 2 * np.pi * 0.9 / size
            w_inst = (2 * np.pi / wl) * np.cos(tt / 2) * inst
            fwhm = np.sqrt(w_size**2 + w_inst**2)
        else:
            fwhm = np.full(tt.shape, 0.02)
        qpk = 4 * np.pi * np.sin(tt / 2) / wl
        if aug is not None and rng.random() < aug.impurity:
            k = int(rng.integers(1, 4))
            qpk = np.concatenate([qpk, rng.uniform(q[0], q[-1], k)])
            inten = np.concatenate([inten, rng.uniform(0.005, 0.05, k) * inten.max()])
            fwhm = np.concatenate([fwhm, np.full(k, np.median(fwhm))])
        # sticks shared linearly between the two nearest bins, then one Gaussian per
        # pattern (width at the intensity-weighted mean peak; size broadening is constant
        # in Q, the instrument's varies slowly)
        pos = (qpk - q[0]) / dq
        sel = (pos >= 0) & (pos < m - 1)
        pos, a = pos[sel], inten[sel]
        lo = np.floor(pos).astype(int)
        frac = pos - lo
        y = np.bincount(lo, a * (1 - frac), minlength=m) + np.bincount(lo + 1, a * frac,
                                                                         minlength=m)
        if a.size:
            sigma = float(np.average(fwhm[sel], weights=a)) / 2.3548 / dq
            y = gaussian_filter1d(y, max(sigma, 0.6), mode="constant")
        top = y.max() if y.size and y.max() > 0 else 1.0
        y /= top
        if aug is not None:
            x = (q - q[0]) / (q[-1] - q[0])
            bg = rng.uniform(0, aug.background) * (
                rng.uniform(0, 1) * np.exp(-x * rng.uniform(1, 6))
                + rng.uniform(0, 0.5) * np.exp(-0.5 * ((x - rng.uniform(0.1, 0.5)) / 0.1) ** 2)
                + rng.uniform(0, 0.3))
            counts = math.exp(rng.uniform(*np.log(aug.counts)))
            y = rng.poisson((y + bg) * counts) / counts
            # measured Q range: from the low end (or a little above) up to a random Q max
            q_lo = q[0] if rng.random() < 0.5 else rng.uniform(q[0], q[0] + aug.q_low_cut)
            q_hi = rng.uniform(aug.q_max_min, q[-1] + 0.5)
            mask[row, (q < q_lo) | (q > q_hi)] = 0
        out[row] = y
    return _normalise(out, mask), mask


def _normalise(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Minimum inside the measured range subtracted, maximum 1, zero outside."""
    big = np.where(mask > 0, y, np.inf)
    lo = np.min(big, axis=1, keepdims=True)
    lo = np.where(np.isfinite(lo), lo, 0)
    y = np.where(mask > 0, y - lo, 0)
    top = np.max(y, axis=1, keepdims=True)
    return (y / np.where(top > 0, top, 1)).astype(np.float32)


def substitute_elements(composition: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Compositions (N, len(ELEMENTS)) with every element swapped for a random element of
    its kind (anion for anion, cation for cation; distinct within a row), amounts kept."""
    c = np.asarray(composition, np.float32)
    out = np.zeros_like(c)
    anions = [Z[a] for a, w in ANIONS.items() if w > 0]
    cations = [Z[e] for e in sorted(set(CATIONS) | set(METALS)) if Z[e] not in anions]
    anion_set = set(anions)
    for r in range(len(c)):
        present = np.nonzero(c[r] > 0)[0]
        pools = {True: list(rng.permutation(anions)), False: list(rng.permutation(cations))}
        for z in present:
            out[r, pools[int(z) in anion_set].pop()] += c[r, z]
    return out


def measured_composition(composition: np.ndarray, rng: np.random.Generator,
                         noise: float = 0.1, p_light_missing: float = 0.5) -> np.ndarray:
    """What an XRF/EDS detector reports for true compositions (N, len(ELEMENTS)): element
    fractions with relative noise ``noise``; with probability ``p_light_missing`` per
    pattern Li, B, C, N, O are not seen (an XRF measurement)."""
    c = np.asarray(composition, float).copy()
    c *= rng.lognormal(0, noise, c.shape)
    miss = rng.random(len(c)) < p_light_missing
    light = [Z[e] for e in LIGHT]
    c[np.ix_(miss, light)] = 0
    total = c.sum(axis=1, keepdims=True)
    return (c / np.where(total > 0, total, 1)).astype(np.float32)

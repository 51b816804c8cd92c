"""Space groups that a powder pattern cannot tell apart by its peak positions.

A powder pattern shows the lattice metric (which d-spacings exist) and the systematic
absences of the space group, summed over reflections that share one d-spacing. Space
groups with the same metric family and the same powder absences (their *powder
extinction class*, the powder analogue of the extinction symbol) give peaks at the same
places; only the intensities can separate them, and for random atom positions only
statistically. Trigonal and hexagonal groups share the hexagonal metric; in the
orthorhombic system the axes of a powder pattern carry no labels, so the classes are
taken up to a permutation of a, b, c (monoclinic: up to a ↔ c).

``powder_classes()`` groups the 230 space groups this way (pymatgen's symmetry tables,
standard settings, reflections up to |h|, |k|, |l| ≤ 6); ``ceiling(labels)`` is the best
top-1 / top-5 space-group and crystal-system accuracy any classifier that only reads
peak positions and absences can reach on a test set with these true space groups: it
picks the most frequent group of each class. The structure benchmark prints it beside the
network's figures.
"""

from __future__ import annotations

import itertools
from functools import cache, lru_cache

import numpy as np

from .crystals import crystal_system_index

# metric family of each crystal system (trigonal and hexagonal share one) and the space
# group whose point group is the family's holohedry
_FAMILY = {0: ("triclinic", 2), 1: ("monoclinic", 10), 2: ("orthorhombic", 47),
           3: ("tetragonal", 123), 4: ("hexagonal", 191), 5: ("hexagonal", 191),
           6: ("cubic", 221)}
_BOX = 6


def _ops(number: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from pymatgen.symmetry.groups import SpaceGroup

    return [(np.rint(op.rotation_matrix).astype(int), np.asarray(op.translation_vector, float))
            for op in SpaceGroup.from_int_number(int(number)).symmetry_ops]


@cache
def _hkl() -> np.ndarray:
    r = np.arange(-_BOX, _BOX + 1)
    h = np.array(list(itertools.product(r, r, r)))
    return h[np.any(h != 0, axis=1)]


def absent(number: int, hkl: np.ndarray | None = None) -> np.ndarray:
    """(K,) bool: reflections ``hkl`` (K, 3; default the box) systematically absent in
    space group ``number`` (standard setting): some operation (W, w) keeps h (h W = h)
    while h · w is not an integer."""
    hkl = _hkl() if hkl is None else np.asarray(hkl, int)
    out = np.zeros(len(hkl), bool)
    for w, t in _ops(number):
        fixed = np.all(hkl @ w == hkl, axis=1)
        phase = hkl @ t
        out |= fixed & (np.abs(phase - np.rint(phase)) > 1e-6)
    return out


@cache
def _index() -> dict:
    return {tuple(h): i for i, h in enumerate(_hkl().tolist())}


@cache
def _orbits(holohedry: int) -> np.ndarray:
    """(K,) orbit id of every reflection of the box under the holohedry's rotations
    (reflections of one orbit share their d-spacing in every lattice of the family)."""
    hkl, index = _hkl(), _index()
    rots = list({w.tobytes(): w for w, _ in _ops(holohedry)}.values())
    images = np.stack([hkl @ w for w in rots], 1).tolist()  # (K, ops, 3)
    orbit = -np.ones(len(hkl), int)
    for i in range(len(hkl)):
        if orbit[i] < 0:
            for h in images[i]:
                j = index.get(tuple(h))
                if j is not None:
                    orbit[j] = i
    return orbit


def _signature(number: int) -> tuple:
    system = int(crystal_system_index(number))
    family, holo = _FAMILY[system]
    hkl, orbit = _hkl(), _orbits(holo)
    present = ~absent(number)
    seen = frozenset(np.unique(orbit[present]).tolist())
    index, variants = _index(), []
    for perm in _relabel(family):
        moved = {int(orbit[index[tuple(hkl[o][list(perm)].tolist())]]) for o in seen}
        variants.append(tuple(sorted(moved)))
    return family, min(variants)


def _relabel(family: str):
    if family == "orthorhombic":
        return list(itertools.permutations(range(3)))
    if family == "monoclinic":
        return [(0, 1, 2), (2, 1, 0)]
    return [(0, 1, 2)]


@lru_cache(maxsize=1)
def powder_classes() -> np.ndarray:
    """(230,) class id of space groups 1…230: equal ids cannot be told apart by peak
    positions and absences."""
    sigs = [_signature(n) for n in range(1, 231)]
    ids: dict = {}
    return np.array([ids.setdefault(s, len(ids)) for s in sigs])


def ceiling(labels: np.ndarray) -> dict:
    """Best accuracies reachable from peak positions and absences alone on a test set with
    true space groups ``labels`` (numbers 1…230): per class, rank its groups by how often
    they occur in ``labels``."""
    labels = np.asarray(labels, int)
    cls = powder_classes()[labels - 1]
    top1 = top5 = system = 0
    systems = crystal_system_index(labels)
    for c in np.unique(cls):
        sel = cls == c
        counts = np.sort(np.bincount(labels[sel]))[::-1]
        top1 += counts[0]
        top5 += counts[:5].sum()
        system += np.bincount(systems[sel]).max()
    n = max(len(labels), 1)
    return {"space_group_top1": top1 / n, "space_group_top5": top5 / n,
            "crystal_system": system / n, "classes": int(len(np.unique(powder_classes())))}

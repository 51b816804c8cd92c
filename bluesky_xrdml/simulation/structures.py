"""Crystal structures built in code (pymatgen ships no CIFs).

The demo phase set is the contract of the shipped ``pqnet-demo`` model: four cubic
Fm-3m phases with their nominal lattice parameters in Å.
"""

from __future__ import annotations

from pymatgen.core import Lattice, Structure

# name -> (lattice parameter a in Å, species, fractional coordinates), all space group Fm-3m
DEMO_PHASES: dict[str, tuple[float, list[str], list[list[float]]]] = {
    "Ni": (3.524, ["Ni"], [[0, 0, 0]]),
    "NiO": (4.177, ["Ni", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),  # rock salt
    "CeO2": (5.411, ["Ce", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]]),  # fluorite
    "Pd": (3.890, ["Pd"], [[0, 0, 0]]),
}


def cubic_structure(a: float, species: list[str], coords: list[list[float]]) -> Structure:
    """An Fm-3m structure with lattice parameter ``a`` (Å) from its asymmetric unit."""
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), species, coords)


def demo_structures() -> dict[str, Structure]:
    """The four demo phases (Ni, NiO, CeO2, Pd) as pymatgen structures."""
    return {name: cubic_structure(*spec) for name, spec in DEMO_PHASES.items()}


# name -> (space group, lattice lengths a, b, c in Å, angles, species, fractional coordinates);
# literature room-temperature cells, built in code with ``Structure.from_spacegroup``
OXIDE_PHASES: dict[str, tuple] = {
    "CeO2": ("Fm-3m", (5.411, 5.411, 5.411), (90, 90, 90), ["Ce", "O"],
             [[0, 0, 0], [0.25, 0.25, 0.25]]),
    "NiO": ("Fm-3m", (4.177, 4.177, 4.177), (90, 90, 90), ["Ni", "O"],
            [[0, 0, 0], [0.5, 0.5, 0.5]]),
    "ZnO": ("P6_3mc", (3.2498, 3.2498, 5.2066), (90, 90, 120), ["Zn", "O"],
            [[1 / 3, 2 / 3, 0.0], [1 / 3, 2 / 3, 0.3819]]),
    "TiO2": ("P4_2/mnm", (4.5937, 4.5937, 2.9587), (90, 90, 90), ["Ti", "O"],
             [[0, 0, 0], [0.3053, 0.3053, 0]]),  # rutile
    "Al2O3": ("R-3c", (4.7589, 4.7589, 12.991), (90, 90, 120), ["Al", "O"],
              [[0, 0, 0.35216], [0.30624, 0, 0.25]]),  # corundum, hexagonal axes
}


def oxide_structures(names=None) -> dict[str, Structure]:
    """Oxides of different crystal systems (cubic CeO2 and NiO, hexagonal ZnO, tetragonal
    rutile TiO2, trigonal corundum Al2O3) as pymatgen structures, built in code."""
    out = {}
    for name in names or OXIDE_PHASES:
        sg, abc, angles, species, coords = OXIDE_PHASES[name]
        out[name] = Structure.from_spacegroup(sg, Lattice.from_parameters(*abc, *angles),
                                              species, coords)
    return out

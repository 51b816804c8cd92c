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

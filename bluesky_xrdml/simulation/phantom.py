"""A 2D sample phantom: where each phase is, for maps and XRD-CT.

Each phase has a fraction map on a square grid of side ``2 * radius`` (mm, centred on
the rotation axis) and one lattice parameter and crystallite size. A pencil beam at
stage position (x, y) sees the fractions there; in tomography mode the beam crosses the
whole sample and sees their line integral (scikit-image's ``radon`` at that angle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import map_coordinates
from skimage.transform import radon


@dataclass
class Phantom:
    fractions: dict[str, np.ndarray]  # phase -> (n, n) fraction map, rows = y, cols = x
    radius: float  # mm; the map spans [-radius, radius] in x and y
    lattice: dict[str, float]  # phase -> lattice parameter a (Å)
    size_nm: dict[str, float]  # phase -> crystallite size (nm)
    _sino_cache: dict = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.fractions)

    @property
    def n(self) -> int:
        return next(iter(self.fractions.values())).shape[0]

    @property
    def pixel(self) -> float:
        """Voxel edge length in mm."""
        return 2.0 * self.radius / self.n

    def _index(self, pos: float) -> float:
        return (pos + self.radius) / self.pixel - 0.5

    def at(self, x: float, y: float) -> np.ndarray:
        """Phase fractions (n_phases,) under a pencil beam at stage position (x, y) in mm."""
        coords = np.array([[self._index(y)], [self._index(x)]])
        return np.array(
            [float(map_coordinates(f, coords, order=1, mode="constant")[0])
             for f in self.fractions.values()]
        )

    def line_integral(self, translation: float, angle_deg: float) -> np.ndarray:
        """Fraction × path length (mm) per phase along the beam at (translation, angle)."""
        key = round(float(angle_deg), 6)
        if key not in self._sino_cache:
            self._sino_cache[key] = np.stack(
                [radon(f, theta=[key], circle=True)[:, 0] for f in self.fractions.values()]
            )
        proj = self._sino_cache[key]  # (n_phases, n)
        bins = np.arange(self.n)
        pos = translation / self.pixel + self.n // 2
        return np.array([np.interp(pos, bins, p, left=0.0, right=0.0) for p in proj]) * self.pixel


def demo_phantom(n: int = 64, radius: float = 1.0) -> Phantom:
    """Four demo phases in distinct regions of a round sample of radius 0.9 mm.

    Ni core with an NiO shell (an oxidised particle), a CeO2 block and a small Pd
    particle. Everything lies inside the inscribed circle, as ``radon(circle=True)`` needs.
    """
    c = (np.arange(n) + 0.5) * (2 * radius / n) - radius
    x, y = np.meshgrid(c, c)
    r_ni = np.hypot(x + 0.35, y - 0.2)
    ni = (r_ni < 0.3).astype(float)
    nio = ((r_ni >= 0.3) & (r_ni < 0.45)).astype(float) * 0.8
    ceo2 = ((np.abs(x - 0.3) < 0.22) & (np.abs(y + 0.3) < 0.22)).astype(float)
    pd = (np.hypot(x - 0.45, y - 0.4) < 0.15).astype(float)
    return Phantom(
        fractions={"Ni": ni, "NiO": nio, "CeO2": ceo2, "Pd": pd},
        radius=radius,
        lattice={"Ni": 3.5275, "NiO": 4.1728, "CeO2": 5.4164, "Pd": 3.8861},
        size_nm={"Ni": 40.0, "NiO": 15.0, "CeO2": 60.0, "Pd": 25.0},
    )

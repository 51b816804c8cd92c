"""Bragg-spot frames of a rotating single-crystal / grain sample (far-field HEDM style).

Spots are 2D pseudo-Voigt peaks with random widths, ellipticity and rotation (a fraction
``streaks`` smeared along a line, as rotation smears them). Each spot
lights up at its own rotation angle ω₀ with a Gaussian rocking curve, so a rotation scan
sees spots appear and fade. Some spots are placed near the detector edges and some in
overlapping pairs, because real frames have both. The true centres are kept by the
simulator (``truth``), never written into the frame.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ISOLATION_PX = 12.0  # "isolated": no other spot brighter than 20 counts this close
EDGE_PX = 6.0


def pseudo_voigt_2d(rows, cols, r0, c0, hw_r, hw_c, angle, eta, amplitude):
    """2D pseudo-Voigt of peak height ``amplitude``; ``hw_*`` are half widths at half maximum
    along the principal axes, rotated by ``angle`` (radians). Evaluated at pixel centres."""
    dr, dc = rows - r0, cols - c0
    ca, sa = np.cos(angle), np.sin(angle)
    u = (ca * dr + sa * dc) / hw_r
    v = (-sa * dr + ca * dc) / hw_c
    rho2 = u * u + v * v
    return amplitude * (eta / (1.0 + rho2) + (1.0 - eta) * np.exp(-np.log(2.0) * rho2))


class SpotSimulator:
    """Frames of shape ``shape`` at rotation angle ω (degrees), deterministic for a seed.

    ``density`` is spots per degree of rotation; ``rocking_sigma`` the rocking-curve width (°).
    """

    def __init__(
        self,
        shape: tuple[int, int] = (256, 256),
        density: float = 30.0,
        rocking_sigma: float = 0.15,
        background: float = 20.0,
        read_noise: float = 2.0,
        seed: int = 0,
        streaks: float = 0.0,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.density = density
        self.rocking_sigma = rocking_sigma
        self.background = background
        self.read_noise = read_noise
        self.seed = seed
        self.streaks = streaks
        self._bins: dict[int, pd.DataFrame] = {}

    def _spots_in_bin(self, b: int) -> pd.DataFrame:
        """Spots whose ω₀ lies in [b, b+1) degrees; generated once per bin from the seed."""
        if b not in self._bins:
            rng = np.random.default_rng([self.seed, b % 360])
            n = rng.poisson(self.density)
            nr, nc = self.shape
            row = rng.uniform(2, nr - 3, n)
            col = rng.uniform(2, nc - 3, n)
            # ~10 % of spots hug an edge (centre 0.5-4 px inside it)
            edge = rng.random(n) < 0.1
            side = rng.integers(0, 4, n)
            depth = rng.uniform(0.5, 4.0, n)
            row = np.where(edge & (side == 0), depth, row)
            row = np.where(edge & (side == 1), nr - 1 - depth, row)
            col = np.where(edge & (side == 2), depth, col)
            col = np.where(edge & (side == 3), nc - 1 - depth, col)
            spots = pd.DataFrame(
                {
                    "omega": b + rng.random(n),
                    "row": row,
                    "col": col,
                    "hw_r": rng.uniform(0.8, 1.8, n),
                    "hw_c": rng.uniform(0.8, 1.8, n),
                    "angle": rng.uniform(0, np.pi, n),
                    "eta": rng.uniform(0.0, 0.5, n),
                    "amplitude": np.exp(rng.uniform(np.log(150), np.log(20000), n)),
                }
            )
            # a fraction ``streaks`` is smeared by the rotation along a line 2-8 px long in
            # any direction (symmetric profile: the centre stays the intensity centroid)
            # (own random stream: frames without streaks stay as they were)
            rs = np.random.default_rng([self.seed, b % 360, 1])
            streak = rs.random(n) < self.streaks
            spots["streak_len"] = np.where(streak, rs.uniform(2.0, 8.0, n), 0.0)
            spots["streak_dir"] = rs.uniform(0, np.pi, n)
            # ~10 % get an overlapping partner 2.5-4 px away at nearly the same ω
            partners = spots[rng.random(n) < 0.1].copy()
            ang = rng.uniform(0, 2 * np.pi, len(partners))
            dist = rng.uniform(2.5, 4.0, len(partners))
            partners["row"] = np.clip(partners["row"] + dist * np.sin(ang), 0, nr - 1)
            partners["col"] = np.clip(partners["col"] + dist * np.cos(ang), 0, nc - 1)
            partners["omega"] += rng.normal(0, 0.02, len(partners))
            self._bins[b] = pd.concat([spots, partners], ignore_index=True)
        return self._bins[b]

    def visible(self, omega: float) -> pd.DataFrame:
        """Spots lit at ω with their peak height in this frame (``height``)."""
        reach = 4 * self.rocking_sigma
        bins = range(int(np.floor(omega - reach)), int(np.floor(omega + reach)) + 1)
        spots = pd.concat([self._spots_in_bin(b) for b in bins], ignore_index=True)
        d = spots["omega"] - omega
        spots = spots[np.abs(d) < reach].copy()
        spots["height"] = spots["amplitude"] * np.exp(
            -0.5 * (spots["omega"] - omega) ** 2 / self.rocking_sigma**2
        )
        return spots[spots["height"] > 1.0].reset_index(drop=True)

    def truth(self, omega: float) -> pd.DataFrame:
        """True spot centres in the frame at ω: row, col, height, and ``isolated``/``edge``."""
        spots = self.visible(omega)
        r, c = spots["row"].to_numpy(), spots["col"].to_numpy()
        dist = np.hypot(r[:, None] - r[None], c[:, None] - c[None])
        np.fill_diagonal(dist, np.inf)
        dist[:, spots["height"].to_numpy() < 20] = np.inf  # faint neighbours do not count
        nr, nc = self.shape
        margin = np.minimum.reduce([r, c, nr - 1 - r, nc - 1 - c])
        out = spots[["row", "col", "height", "streak_len"]].copy()
        out["edge"] = margin < EDGE_PX
        nearest = dist.min(axis=1) if len(spots) > 1 else np.full(len(spots), np.inf)
        out["isolated"] = (nearest > ISOLATION_PX) & ~out["edge"]
        return out

    def expected(self, omega: float) -> np.ndarray:
        """Noise-free frame (float) at ω."""
        nr, nc = self.shape
        rows, cols = np.mgrid[0:nr, 0:nc]
        frame = self.background * (1.0 + 0.3 * cols / nc + 0.2 * rows / nr)
        for s in self.visible(omega).itertuples():
            # render out to where the profile drops below 1/4 count (Lorentzian tails
            # reach far), at most 128 px, so no window edge shows in the noise
            rho2 = max(4 * s.eta * s.height, np.log(max(4 * (1 - s.eta) * s.height, 2)) / np.log(2))
            half = int(min(128, max(6, np.ceil(np.sqrt(rho2) * max(s.hw_r, s.hw_c)))))
            r0, r1 = max(int(s.row) - half, 0), min(int(s.row) + half + 1, nr)
            c0, c1 = max(int(s.col) - half, 0), min(int(s.col) + half + 1, nc)
            half += int(np.ceil(s.streak_len / 2))
            r0, r1 = max(int(s.row) - half, 0), min(int(s.row) + half + 1, nr)
            c0, c1 = max(int(s.col) - half, 0), min(int(s.col) + half + 1, nc)
            steps = np.linspace(-0.5, 0.5, 9) * s.streak_len if s.streak_len else [0.0]
            for t in steps:
                frame[r0:r1, c0:c1] += pseudo_voigt_2d(
                    rows[r0:r1, c0:c1], cols[r0:r1, c0:c1], s.row + t * np.sin(s.streak_dir),
                    s.col + t * np.cos(s.streak_dir), s.hw_r, s.hw_c, s.angle, s.eta,
                    s.height / len(steps) * (1.6 if s.streak_len else 1.0),
                )
        return frame

    def frame(self, omega: float, rng: np.random.Generator | None = None) -> np.ndarray:
        """A counted frame at ω: Poisson + Gaussian read noise, uint16, saturating."""
        rng = rng or np.random.default_rng()
        expected = self.expected(omega)
        counts = rng.poisson(expected) + rng.normal(0.0, self.read_noise, expected.shape)
        return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

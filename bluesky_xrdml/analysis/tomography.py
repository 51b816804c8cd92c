"""Tomographic reconstruction of sinograms (filtered back-projection).

Uses tomopy's gridrec when tomopy is installed, scikit-image's ``iradon`` otherwise.
``reconstruct_channels`` does every 2θ channel of an XRD-CT sinogram stack: FBP is linear,
so the channels are back-projected on a rank-``rank`` basis of the stack (a randomised SVD,
Halko et al.; scikit-learn's ``randomized_svd`` is the same algorithm, not a dependency here).
"""

from __future__ import annotations

import numpy as np
from skimage.transform import iradon


def reconstruct(sinogram: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """FBP of ``sinogram`` shaped (n_angles, n_translations) -> (n, n) image.

    Angles in degrees over [0, 180). The image has the translation axis's sampling:
    rows and columns are spaced like the translation positions, centred on the rotation axis.
    """
    sino = np.asarray(sinogram, dtype=float)
    try:
        import tomopy  # optional, much faster for big data
    except ImportError:
        return iradon(sino.T, theta=np.asarray(angles_deg, float), circle=True,
                      filter_name="ramp")
    rec = tomopy.recon(sino[:, None, :], np.radians(angles_deg), algorithm="gridrec")
    return np.asarray(rec[0])


def randomized_svd(mat: np.ndarray, rank: int, n_iter: int = 2, seed: int = 0):
    """Leading ``rank`` singular triplets of ``mat`` (Halko et al.): U (m, r), s (r,), Vt."""
    rng = np.random.default_rng(seed)
    m, n = mat.shape
    k = min(rank + 10, m, n)
    q, _ = np.linalg.qr(mat @ rng.standard_normal((n, k)))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(mat.T @ q)
        q, _ = np.linalg.qr(mat @ q)
    u_small, s, vt = np.linalg.svd(q.T @ mat, full_matrices=False)
    r = min(rank, len(s))
    return (q @ u_small)[:, :r], s[:r], vt[:r]


def reconstruct_channels(sinograms: np.ndarray, angles_deg, rank: int | None = 64) -> np.ndarray:
    """FBP of every channel: sinograms (n_angles, n_translations, C) → images (n, n, C)."""
    sino = np.asarray(sinograms, dtype=np.float64)
    n_a, n_t, c = sino.shape
    if rank is None or rank >= min(n_a * n_t, c):
        return np.stack([reconstruct(sino[:, :, k], angles_deg) for k in range(c)], axis=-1)
    u, s, vt = randomized_svd(sino.reshape(n_a * n_t, c), rank)
    comps = np.stack([reconstruct((u[:, i] * s[i]).reshape(n_a, n_t), angles_deg)
                      for i in range(len(s))], axis=-1)  # (n, n, r)
    return comps @ vt


def reconstruct_images(sinograms: dict, angles_deg, translations) -> dict:
    """FBP of each named sinogram (n_angles, n_translations): name -> (n, n) image in
    counts per mm of path (divided by the translation step); unmeasured points (NaN)
    count as 0."""
    t = np.asarray(translations, float)
    step = max(abs(t[1] - t[0]), 1e-12) if t.size > 1 else 1.0
    return {name: reconstruct(np.nan_to_num(s, nan=0.0), angles_deg) / step
            for name, s in sinograms.items()}


def quantify_voxels(predict, sinograms: np.ndarray, angles_deg, step: float,
                    rank: int | None = 64, min_intensity: float = 0.05):
    """XRD-CT phase quantification: ``(dataset, inside, n)``.

    Every 2θ channel of ``sinograms`` (n_angles, n_translations, C) is reconstructed
    (``reconstruct_channels``; counts per mm of path), negative FBP ripples are clipped
    to 0, and every voxel's pattern goes through ``predict`` ((N, C) counts -> an xarray
    Dataset with ``scale`` (pattern, phase), as PQ-Net's). Voxels whose diffracted signal
    (Σ scale) is below ``min_intensity`` of the brightest voxels' (99.5th percentile)
    hold no phase (background or air): ``inside`` (n·n,) is False there and ``dataset``
    has the inside voxels only, in row-major order of the (n, n) image.
    """
    volume = reconstruct_channels(sinograms, angles_deg, rank) / max(abs(step), 1e-12)
    n = volume.shape[0]
    flat = np.clip(volume.reshape(n * n, -1), 0.0, None)
    ds = predict(flat)
    signal = np.nansum(np.clip(ds["scale"].values, 0, None), axis=1)
    top = np.percentile(signal, 99.5) if signal.size else 0.0
    inside = (signal >= min_intensity * top) & (top > 0)
    return ds.isel(pattern=np.nonzero(inside)[0]), inside, n

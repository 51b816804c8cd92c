"""Tomographic reconstruction of sinograms (filtered back-projection).

Uses tomopy's gridrec when tomopy is installed, scikit-image's ``iradon`` otherwise.
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

"""The classical 2D pseudo-Voigt fit: baseline, labeller and fallback of BraggNN."""

import numpy as np

from bluesky_xrdml.analysis import fit_multi, fit_patches, fit_pseudo_voigt
from bluesky_xrdml.analysis.peaks import centroid
from bluesky_xrdml.simulation.spots import pseudo_voigt_2d

ROWS, COLS = np.mgrid[0:11, 0:11].astype(float)


def peak_patches(n, seed=0, height=(500, 5000), bg=20.0):
    rng = np.random.default_rng(seed)
    truth = 5 + rng.uniform(-1, 1, (n, 2))
    patches = []
    for r, c in truth:
        expected = bg + pseudo_voigt_2d(ROWS, COLS, r, c, rng.uniform(0.8, 1.8),
                                        rng.uniform(0.8, 1.8), rng.uniform(0, np.pi),
                                        rng.uniform(0, 0.5), rng.uniform(*height))
        patches.append(rng.poisson(expected) + rng.normal(0, 2, expected.shape))
    return np.clip(np.rint(patches), 0, 65535), truth


def test_fit_recovers_true_centres_with_honest_errors():
    patches, truth = peak_patches(80)
    centre, std, ok = fit_patches(patches)
    assert ok.all()
    err = centre - truth
    dist = np.hypot(*err.T)
    assert np.median(dist) < 0.04
    assert np.percentile(dist, 95) < 0.12
    # standard errors from the Jacobian: most errors within 2 σ, and σ not absurdly large
    assert np.mean(np.abs(err) < 2 * std) > 0.85
    assert np.median(std) < 0.05
    # better than the centroid on the same patches
    cen = centroid(patches)[0]
    assert np.median(np.hypot(*(cen - truth).T)) > 1.2 * np.median(dist)


def test_saturated_tops_are_left_out_of_the_fit():
    expected = 30 + pseudo_voigt_2d(ROWS, COLS, 5.3, 4.6, 1.6, 1.1, 0.4, 0.2, 200_000)
    patch = np.clip(np.random.default_rng(1).poisson(expected), 0, 65535).astype(float)
    assert (patch == 65535).sum() >= 4  # a flat top
    f = fit_pseudo_voigt(patch)
    assert f.success
    assert np.hypot(f.row - 5.3, f.col - 4.6) < 0.1


def test_multi_peak_fit_separates_a_neighbour_that_biases_a_single_fit():
    rng = np.random.default_rng(2)
    errs_multi, errs_single = [], []
    for _ in range(10):
        r, c = 5 + rng.uniform(-0.5, 0.5, 2)
        expected = (15 + pseudo_voigt_2d(ROWS, COLS, r, c, 1.3, 1.1, 0.2, 0.3, 3000)
                    + pseudo_voigt_2d(ROWS, COLS, r + 0.5, c + 3.4, 1.2, 1.4, 0.0, 0.3, 2500))
        patch = rng.poisson(expected).astype(float)
        main = fit_multi(patch, [(5, 5), (5.5, 8.5)])
        single = fit_pseudo_voigt(patch, start=(5, 5))
        errs_multi.append(np.hypot(main.row - r, main.col - c))
        errs_single.append(np.hypot(single.row - r, single.col - c))
    assert np.median(errs_multi) < 0.08
    assert np.median(errs_single) > 2 * np.median(errs_multi)

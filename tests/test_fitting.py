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


def test_whole_spot_fit_treats_cache_zeros_and_saturation_as_censored():
    """The labeller for real frames: a thresholded (frame-cache) and saturated spot, like the
    ruby frames, is centred to a few hundredths of a pixel; the plain centroid is not."""
    from bluesky_xrdml.analysis.fitting import fit_spot
    from bluesky_xrdml.simulation.spots import pseudo_voigt_2d

    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:25, 0:25].astype(float)
    err, err_centroid = [], []
    for _ in range(20):
        r0, c0 = 12 + rng.uniform(-1, 1, 2)
        expected = 80 + pseudo_voigt_2d(rows, cols, r0, c0, rng.uniform(0.8, 2),
                                        rng.uniform(0.8, 2), rng.uniform(0, np.pi), 0.4, 40000)
        window = np.clip(rng.poisson(expected), 0, 16050).astype(float)
        window[window < 150] = 0  # the cache threshold
        # cut the spot asymmetrically: the window holds it, but not centred
        window = window[2:, :22]
        fit = fit_spot(window, origin=(2, 0))
        assert fit.success and fit.chi2 < 3
        err.append(np.hypot(fit.row - r0, fit.col - c0))
        w = np.clip(window - 150, 0, None)
        r, c = np.mgrid[2:25, 0:22]
        err_centroid.append(np.hypot((w * r).sum() / w.sum() - r0, (w * c).sum() / w.sum() - c0))
    assert np.percentile(err, 95) < 0.06
    assert np.median(err) < 0.5 * np.median(err_centroid)

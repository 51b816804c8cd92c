import numpy as np
import pytest

from bluesky_xrdml.analysis import FrameError, extract_patches, locate_peaks
from bluesky_xrdml.simulation import SpotSimulator
from bluesky_xrdml.simulation.spots import pseudo_voigt_2d


def nearest(truth, table):
    d = np.hypot(truth["row"].to_numpy()[:, None] - table["row"].to_numpy()[None],
                 truth["col"].to_numpy()[:, None] - table["col"].to_numpy()[None])
    return d.min(axis=1)


def test_centroids_of_isolated_spots_within_a_pixel_of_truth():
    sim = SpotSimulator(seed=5)
    errors = []
    for omega in (0.4, 2.2, 6.9):
        table = locate_peaks(sim.frame(omega, np.random.default_rng(1)))
        truth = sim.truth(omega)
        iso = truth[truth["isolated"] & (truth["height"] > 500)]
        errors.append(nearest(iso, table))
    errors = np.concatenate(errors)
    assert len(errors) >= 15
    assert np.all(errors < 1.0)
    assert np.median(errors) < 0.15


def synthetic(peaks, shape=(64, 64), bg=10.0):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    frame = np.full(shape, bg)
    for r, c, h in peaks:
        frame += pseudo_voigt_2d(rows, cols, r, c, 1.2, 1.2, 0.0, 0.2, h)
    return np.random.default_rng(0).poisson(frame).astype(float)


def test_edge_and_overlapping_peaks_are_flagged():
    # a pair 5 px apart (closer pairs, dipping less than 40 % between them, count as one spot)
    frame = synthetic([(30.3, 30.6, 5000), (2.2, 40.0, 5000), (12.0, 12.0, 4000),
                       (12.0, 17.0, 3000)])
    table = locate_peaks(frame)
    by_pos = {(round(r), round(c)): f for r, c, f in zip(table["row"], table["col"], table["flag"])}
    assert by_pos[(30, 31)] == ""
    assert "edge" in by_pos[(2, 40)]
    assert any("multi" in f for (r, c), f in by_pos.items() if r == 12)


def test_patches_are_centred_even_at_the_border():
    frame = np.arange(100.0).reshape(10, 10) + 1000
    patches, edge = extract_patches(frame, [0, 5], [0, 5], size=11)
    assert patches.shape == (2, 11, 11)
    assert patches[0, 5, 5] == frame[0, 0]
    assert patches[1, 5, 5] == frame[5, 5]
    assert list(edge) == [True, True]  # 10×10 frame: every 11×11 patch needs padding


@pytest.mark.parametrize("bad, message", [
    (np.full((32, 32), np.nan), "NaN"),
    (np.ones(100), "2D frame"),
    (np.ones((5, 5)), "2D frame"),
])
def test_bad_frames_raise_a_clear_error(bad, message):
    with pytest.raises(FrameError, match=message):
        locate_peaks(bad)


def test_table_has_the_documented_columns():
    table = locate_peaks(synthetic([(30, 30, 3000)]), frame_index=7)
    assert list(table.columns) == ["frame", "row", "col", "row_std", "col_std", "intensity",
                                   "method", "flag"]
    assert table["frame"].tolist() == [7]
    assert 0 < table["row_std"].iloc[0] < 0.2


def test_component_finder_matches_labelling_the_whole_frame():
    from skimage.measure import label, regionprops

    from bluesky_xrdml.analysis.peaks import _components, threshold

    sim = SpotSimulator(shape=(300, 420), density=60, seed=8)
    frame = sim.frame(2.5, np.random.default_rng(0))
    mask = frame > threshold(frame)
    ours = _components(mask, block=16)
    ref = regionprops(label(mask, connectivity=2))
    assert len(ours) == len(ref) > 20
    for (rr, cc), region in zip(ours, ref):
        assert sorted(zip(rr, cc)) == sorted(map(tuple, region.coords))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="available"):
        locate_peaks(synthetic([(30, 30, 3000)]), method="magic")


def test_windows_fit_the_spot_and_streaks_are_centred_on_their_centroid():
    """A spot whose core is wider than 9 px gets a 22×22 window binned to 11×11; compact
    spots get 11×11 windows centred on the spot; frame coordinates come out right for both."""
    from bluesky_xrdml.analysis.peaks import prepare

    rows, cols = np.mgrid[0:80, 0:80]
    expected = np.full((80, 80), 10.0)
    expected += pseudo_voigt_2d(rows, cols, 20.3, 20.6, 1.2, 1.0, 0.3, 0.1, 5000)  # compact
    for t in np.linspace(-6, 6, 25):  # a 12 px streak along 30°, symmetric: centre 50.4, 55.2
        expected += pseudo_voigt_2d(rows, cols, 50.4 + t * np.sin(0.52), 55.2 + t * np.cos(0.52),
                                    1.0, 1.0, 0.0, 0.0, 400)
    frame = np.random.default_rng(0).poisson(expected)
    fp = prepare(frame)
    assert sorted(fp.scale.tolist()) == [1, 2]
    table = locate_peaks(frame, method="centroid")
    assert len(table) == 2
    compact = table.iloc[np.argmin(np.hypot(table["row"] - 20.3, table["col"] - 20.6))]
    assert np.hypot(compact["row"] - 20.3, compact["col"] - 20.6) < 0.1
    streak = table.iloc[np.argmin(np.hypot(table["row"] - 50.4, table["col"] - 55.2))]
    assert np.hypot(streak["row"] - 50.4, streak["col"] - 55.2) < 0.15
    # the reference 11×11 window on the brightest pixel cuts the streak: it cannot do better
    peak = locate_peaks(frame, method="centroid", window="peak")
    streak_peak = peak.iloc[np.argmin(np.hypot(peak["row"] - 50.4, peak["col"] - 55.2))]
    assert (np.hypot(streak_peak["row"] - 50.4, streak_peak["col"] - 55.2)
            >= np.hypot(streak["row"] - 50.4, streak["col"] - 55.2) - 0.02)

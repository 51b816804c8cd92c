import numpy as np
import pytest

from bluesky_xrdml.analysis import PatternError, Roi, integrate_rois, rois_from_phases
from bluesky_xrdml.simulation import PowderSimulator, demo_structures

WL, TT = 0.1771, np.linspace(1.0, 11.0, 2048)


@pytest.fixture(scope="module")
def sim():
    return PowderSimulator(demo_structures(), WL, TT)


@pytest.fixture(scope="module")
def rois(sim):
    lists = {n: (pk.two_theta(WL), pk.intensity, pk.hkl) for n, pk in sim.peaks.items()}
    return rois_from_phases(lists, TT)


def test_one_free_roi_per_phase(rois, sim):
    assert [r.phase for r in rois] == ["Ni", "NiO", "CeO2", "Pd"]
    every_peak = {n: pk.two_theta(WL) for n, pk in sim.peaks.items()}
    for roi in rois:
        for name, pos in every_peak.items():
            if name != roi.phase:
                assert not np.any((pos > roi.lo) & (pos < roi.hi)), (roi, name)


def test_roi_intensity_tracks_phase_content(sim, rois):
    rng = np.random.default_rng(0)
    scale = np.array([[1e5, 0, 0, 0], [0, 0, 1e5, 0], [5e4, 0, 5e4, 0]])
    y = sim.patterns(scale, np.tile(sim.nominal_a, (3, 1)), np.full((3, 4), 40.0)) + 50
    values, std = integrate_rois(rng.poisson(y), TT, rois)
    ni, ceo2 = 0, 2
    assert values[0, ni] > 20 * abs(values[0, ceo2])
    assert values[1, ceo2] > 20 * abs(values[1, ni])
    assert values[2, ni] == pytest.approx(values[0, ni] / 2, rel=0.1)
    assert np.all(std > 0)


@pytest.mark.parametrize("bad, message", [
    (np.ones(100), "2048 points"),
    (np.full(2048, np.nan), "NaN"),
    (-np.ones(2048), "negative"),
])
def test_bad_patterns_raise_a_clear_error(bad, message):
    with pytest.raises(PatternError, match=message):
        integrate_rois(bad, TT, [Roi("a", 5.0, 5.1)])

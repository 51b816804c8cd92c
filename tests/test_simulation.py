import numpy as np
import pytest

from bluesky_xrdml.simulation import (
    DEMO_PHASES,
    PowderSimulator,
    SpotSimulator,
    demo_phantom,
    demo_structures,
)

WL = 0.1771
TT = np.linspace(1.0, 11.0, 2048)


@pytest.fixture(scope="module")
def sim():
    return PowderSimulator(demo_structures(), WL, TT)


def bragg_two_theta(a, hkl, wavelength=WL):
    d = a / np.sqrt(sum(i * i for i in hkl))
    return np.degrees(2 * np.arcsin(wavelength / (2 * d)))


@pytest.mark.parametrize("name", list(DEMO_PHASES))
def test_peak_positions_follow_braggs_law(sim, name):
    pk = sim.peaks[name]
    a0 = DEMO_PHASES[name][0]
    for strain in (1.0, 1.01, 0.99):
        pos = pk.two_theta(WL, a0 * strain)
        for p, hkl in zip(pos[:4], pk.hkl[:4]):
            assert p == pytest.approx(bragg_two_theta(a0 * strain, hkl), abs=1e-6)


def test_fcc_metals_have_only_unmixed_reflections(sim):
    # Fm-3m: h, k, l all even or all odd -> (111), (200), (220), (311), (222)
    assert [tuple(sorted(h)) for h in sim.peaks["Ni"].hkl[:5]] == [
        (1, 1, 1), (0, 0, 2), (0, 2, 2), (1, 1, 3), (2, 2, 2)]


def test_patterns_have_unit_area_per_unit_scale(sim):
    y = sim.patterns(np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 3.0]]),
                     np.tile(sim.nominal_a, (2, 1)), np.full((2, 4), 30.0))
    assert y[0].sum() * sim.step == pytest.approx(1.0, rel=1e-9)
    assert y[1].sum() * sim.step == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("size_nm", [10.0, 40.0])
def test_size_broadening_follows_scherrer(size_nm):
    fine = np.linspace(4.8, 5.2, 40001)
    sim = PowderSimulator({"Ni": demo_structures()["Ni"]}, WL, fine, instrument_fwhm=1e-5)
    y = sim.phase_pattern("Ni", DEMO_PHASES["Ni"][0], size_nm)[0]
    above = fine[y >= y.max() / 2]
    fwhm = above[-1] - above[0]
    theta = np.radians(sim.peaks["Ni"].two_theta(WL)[0]) / 2
    expected = np.degrees(0.9 * WL / (size_nm * 10 * np.cos(theta)))
    assert fwhm == pytest.approx(expected, rel=0.02)


def test_spot_frames_are_bright_at_true_centres():
    sim = SpotSimulator(seed=2)
    frame = sim.frame(5.0, np.random.default_rng(0))
    truth = sim.truth(5.0)
    bright = truth[truth["height"] > 2000]
    assert len(bright) > 3
    r, c = np.rint(bright["row"]).astype(int), np.rint(bright["col"]).astype(int)
    assert np.all(frame[r, c] > np.median(frame) + 500)
    # the same angle renders the same spots: the simulation is deterministic for a seed
    assert np.allclose(sim.expected(5.0), SpotSimulator(seed=2).expected(5.0))


def test_phantom_line_integral_is_path_length_through_a_phase():
    ph = demo_phantom()
    # the CeO2 block spans 0.44 mm along y at x = 0.3: a vertical beam (angle 0)
    # crosses it for 0.44 mm
    assert ph.line_integral(0.3, 0.0)[ph.names.index("CeO2")] == pytest.approx(0.44, abs=0.04)
    assert ph.at(0.3, -0.3)[ph.names.index("CeO2")] == pytest.approx(1.0)
    assert ph.at(0.9, 0.9).sum() == 0.0

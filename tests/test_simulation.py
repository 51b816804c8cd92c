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


def test_fast_path_matches_every_peak_evaluated(sim):
    rng = np.random.default_rng(4)
    scale = rng.uniform(0, 2, (6, 4))
    a = sim.nominal_a * rng.uniform(0.99, 1.01, (6, 4))
    size = np.array([[5.0] * 4, [100.0] * 4, *rng.uniform(5, 100, (4, 4))])
    exact = sim.patterns(scale, a, size)
    fast = sim.patterns(scale, a, size, fast=True)
    err = np.abs(fast - exact).max(axis=1) / exact.max(axis=1)
    assert err.max() < 0.005, err
    assert fast.sum(axis=1) * sim.step == pytest.approx(scale.sum(axis=1), rel=5e-3)


def test_sample_draws_the_stated_ranges_with_poisson_counts(sim):
    from bluesky_xrdml.simulation.powder import Ranges

    s = sim.sample(400, np.random.default_rng(1), Ranges())
    assert s.counts.shape == (400, 2048) and s.counts.dtype == np.float32
    assert np.all(s.counts == np.round(s.counts)) and s.counts.min() >= 0
    assert s.present.any(axis=1).all() and not s.present.all()
    assert np.allclose(s.fraction.sum(axis=1), 1.0) and np.all(s.fraction[~s.present] == 0)
    rel = s.lattice_a / sim.nominal_a - 1
    assert np.abs(rel).max() <= 0.01 and np.abs(rel).max() > 0.009
    assert 5.0 <= s.size_nm.min() and s.size_nm.max() <= 100.0
    assert 1e4 <= s.total.min() and s.total.max() <= 1e6
    assert 0 <= s.background.min() and s.background.max() <= 0.5
    # total counts as drawn, within Poisson noise
    assert s.counts.sum(axis=1) == pytest.approx(s.total, rel=0.05)


def test_strained_tetragonal_cell_follows_its_two_lattice_parameters():
    from pymatgen.core import Lattice, Structure

    from bluesky_xrdml.simulation.powder import peak_list

    rutile = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959),
                                       ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]])
    pk = peak_list(rutile, WL, 12.0)
    assert pk.system == "tetragonal" and pk.free == ("a", "c")
    d = pk.d_spacings(np.array([[4.6, 2.95]]))[0]
    for (h, k, l_), dk in zip([tuple(x) for x in pk.hkl], d):
        assert dk == pytest.approx(1 / np.sqrt((h * h + k * k) / 4.6**2 + l_ * l_ / 2.95**2))


def test_centre_bound_of_a_bright_spot_is_sigma_squared_over_counts():
    """The Cramér-Rao bound of the benchmark: for a bright Gaussian spot without background
    or read noise, the textbook σ²/N per coordinate (the spot's variance over its counts)."""
    from bluesky_xrdml.training.patches import bound_errors, centre_bound

    hw, amp = 1.5, 20000.0
    one = {"r0": [5.2], "c0": [4.9], "hw_r": [hw], "hw_c": [hw], "angle": [0.3], "eta": [0.0],
           "amplitude": [amp], "b0": [1e-9], "slope_r": [0.0], "slope_c": [0.0],
           "read": [0.0], "saturation": [1e9]}
    one = {k: np.array(v) for k, v in one.items()}
    sigma2 = hw**2 / (2 * np.log(2))
    counts = amp * 2 * np.pi * sigma2
    known = centre_bound(one, nuisance=False)[0]
    assert np.allclose(np.diag(known), sigma2 / counts, rtol=0.02)
    # not knowing the spot's shape, height and background can only make it larger
    unknown = centre_bound(one)[0]
    assert np.all(np.diag(unknown) >= np.diag(known) * (1 - 1e-6))
    # a fainter spot on a background is harder to locate; saturated pixels tell nothing
    faint = {**one, "amplitude": np.array([200.0]), "b0": np.array([50.0])}
    assert np.trace(centre_bound(faint)[0]) > 10 * np.trace(unknown)
    saturated = {**one, "saturation": np.array([0.5 * amp])}
    assert np.trace(centre_bound(saturated)[0]) > np.trace(unknown)
    # the sampled errors of an efficient estimator follow the covariance
    err = bound_errors(np.repeat(known[None], 20000, 0), seed=1)
    assert np.isclose(np.mean(err**2), np.trace(known), rtol=0.05)

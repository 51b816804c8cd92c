"""PQ-Net + full-profile refinement (``analysis.refine``, ``PQNetPredictor.refine``):
lattice and size beyond what the network alone reaches, absent phases left alone, the
real CeO2 calibrant, and the callback option."""

import numpy as np
import pytest
import test_pqnet_measured
from test_pqnet import pattern_run

from bluesky_xrdml.analysis.calibrate import read_xy
from bluesky_xrdml.analysis.refine import Refinement
from bluesky_xrdml.callbacks.phases import PhaseQuantification
from bluesky_xrdml.callbacks.xrdml import XRDMLCallback
from bluesky_xrdml.simulation.instrument import Instrument
from bluesky_xrdml.simulation.powder import Effects, PowderSimulator, Ranges
from bluesky_xrdml.simulation.structures import oxide_structures

one_thread = test_pqnet_measured.one_thread  # fixtures: one torch thread, the shipped model
oxides = test_pqnet_measured.oxides
CERTIFIED_A = 5.4116  # Å, the CeO2 calibrant's lattice parameter
WL = 0.4066
INSTRUMENT = Instrument(wavelength=WL, U=0.002, V=-0.0005, W=0.0030, X=0.004, asym0=-0.003)


@pytest.fixture(scope="module")
def two_phases():
    return PowderSimulator(oxide_structures(["CeO2", "NiO"]), WL, np.linspace(3.0, 30.5, 1100),
                           instrument=INSTRUMENT)


def test_refinement_finds_lattice_size_and_zero_shift_from_a_rough_start(two_phases):
    sim = two_phases
    truth_a = {"CeO2": 5.4230, "NiO": 4.1650}
    truth_size = np.array([[25.0, 60.0]])
    eff = Effects(shift=np.array([0.008]))
    lattice = {n: np.array([[a]]) for n, a in truth_a.items()}
    y = sim.patterns(np.array([[2e5, 1e5]]) * sim.step, lattice, truth_size, effects=eff)
    y = sim.noisy(y + 200.0, np.random.default_rng(3))[0]
    ref = Refinement(sim)
    # a network-like start: 0.3 % off in lattice, sizes 40 % off, scales rough
    start = {"CeO2": np.array([5.4230 * 1.003]), "NiO": np.array([4.1650 * 0.997])}
    res = ref.refine_one(y, np.array([1e5, 1e5]) * sim.step, start, np.array([35.0, 40.0]),
                         np.array([True, True]))
    for name, a in truth_a.items():
        got, sd = res["phases"][name]["lattice"]
        assert got[0] == pytest.approx(a, abs=0.002)
        assert 0 < sd[0] < 0.002
    sizes = [res["phases"][n]["size_nm"][0] for n in ("CeO2", "NiO")]
    np.testing.assert_allclose(sizes, truth_size[0], rtol=0.1)
    assert res["zero"] == pytest.approx(0.008, abs=0.003)
    shares = np.array([res["phases"][n]["scale"][0] for n in ("CeO2", "NiO")])
    np.testing.assert_allclose(shares / shares.sum(), [2 / 3, 1 / 3], atol=0.02)
    assert res["rwp"] < 0.1


def test_refinement_leaves_phases_judged_absent_alone(two_phases):
    sim = two_phases
    y = sim.patterns(np.array([[3e5, 0.0]]) * sim.step, {"CeO2": [[5.41]], "NiO": [[4.177]]},
                     np.array([[40.0, 40.0]]))
    y = sim.noisy(y + 100.0, np.random.default_rng(4))
    ref = Refinement(sim)
    out = ref.refine(y, np.array([[3e5 * sim.step, 0.0]]),
                     {"CeO2": np.array([[5.405]]), "NiO": np.array([[4.177]])},
                     np.array([[30.0, 30.0]]), np.array([[True, False]]))
    assert np.isnan(out["scale"][0, 1]) and np.isnan(out["lattice"]["NiO"][0, 0])
    assert out["lattice"]["CeO2"][0, 0] == pytest.approx(5.41, abs=0.001)


def test_real_ceo2_refined_stays_ceo2_and_its_lattice_is_the_certified_one(oxides):
    from conftest import shared_data

    x, y = read_xy(shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.xy"))
    net = oxides.predict(y, two_theta=x)
    ds = oxides.predict(y, two_theta=x, refine=True)
    j = oxides.phases.index("CeO2")
    refined = ds["refined"].values[0]
    assert refined[j] and refined.sum() == 1  # only CeO2 was judged present
    frac = ds["fraction"].values[0]
    assert frac[j] >= 0.95 and np.delete(frac, j).max() < 0.03
    # a phase refined alone still carries the uncertainty of what the others leave it
    assert ds["fraction_std"].values[0, j] > 0
    np.testing.assert_array_equal(ds["presence"].values, net["presence"].values)
    a, sd = ds["lattice_a"].values[0, j], ds["lattice_a_std"].values[0, j]
    assert a == pytest.approx(CERTIFIED_A, abs=0.002)
    assert 0 < sd < net["lattice_a_std"].values[0, j]
    assert ds["rwp_refined"].values[0] < 0.3
    # the fitted pattern itself, on the model's grid: its Rwp is the one reported
    fit = oxides.refine(y, net, two_theta=x, implied=True)
    meas = oxides.resample(y, x)[0]
    model = fit["implied_refined"].values[0]
    w = 1 / np.maximum(meas, 1)
    rwp = np.sqrt((w * (meas - model) ** 2).sum() / (w * meas**2).sum())
    assert rwp == pytest.approx(ds["rwp_refined"].values[0], rel=1e-3)
    others = [i for i in range(len(oxides.phases)) if i != j]
    np.testing.assert_array_equal(ds["lattice_a"].values[0, others],
                                  net["lattice_a"].values[0, others])


def test_refined_is_closer_to_the_truth_than_the_network_alone(oxides):
    sim = oxides.simulator
    ranges = Ranges.from_dict(oxides.card["ranges"])
    test = sim.sample(24, np.random.default_rng(11), ranges, exact=True)
    net = oxides.predict(test.counts)
    ref = oxides.refine(test.counts, net)
    sel = test.present & (test.fraction >= 0.1) & ref["refined"].values
    a_true = test.lattice_a
    err_net = np.abs(net["lattice_a"].values - a_true)[sel].mean()
    err_ref = np.abs(ref["lattice_a"].values - a_true)[sel].mean()
    assert err_ref < 0.5 * err_net
    size_net = np.abs(net["size_nm"].values / test.size_nm - 1)[sel].mean()
    size_ref = np.abs(ref["size_nm"].values / test.size_nm - 1)[sel].mean()
    assert size_ref < size_net
    np.testing.assert_allclose(ref["fraction"].values.sum(axis=1), 1.0, atol=1e-6)


def test_callback_refines_when_asked_and_says_so(oxides, collector):
    from conftest import shared_data

    x, y = read_xy(shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.xy"))
    analysis = PhaseQuantification(model=oxides, refine=True)
    cb = XRDMLCallback(analyses=[analysis])
    cb.subscribe(collector)
    for name, doc in pattern_run((y,), x, WL, obj="det"):
        cb(name, doc)
    cb.wait(timeout=120)
    (start,) = collector.of("start")
    assert start["xrdml"]["config"]["pqnet"]["refine"] is True
    rows = collector.stream("phases")
    assert rows[0]["CeO2_lattice_a"] == pytest.approx(CERTIFIED_A, abs=0.002)
    assert rows[0]["CeO2_fraction"] >= 0.95


def test_march_dollase_plates_lift_00l_and_absorption_lifts_high_angles():
    from bluesky_xrdml.simulation.powder import capillary_absorption

    sim = PowderSimulator(oxide_structures(["ZnO"]), WL, np.linspace(3.0, 30.5, 1376),
                          instrument=INSTRUMENT)
    pk = sim.peaks["ZnO"]
    plain = sim.phase_pattern("ZnO", pk.nominal[None], 200.0)[0]
    plates = sim.phase_pattern("ZnO", pk.nominal[None], 200.0,
                               effects=Effects(march=np.array([[0.7]])))[0]
    np.testing.assert_allclose(plates.sum() * sim.step, 1.0, rtol=1e-6)  # still unit area
    k002 = pk.hkl.index((0, 0, 0, 2))
    k100 = pk.hkl.index((1, 0, -1, 0))
    pos = pk.two_theta(WL)
    at = {k: np.argmin(np.abs(sim.two_theta - pos[k])) for k in (k002, k100)}
    # (002) normal along the texture axis: r^-3 = 2.92 against the (100) whose normal is
    # perpendicular: r^1.5 = 0.586 (before the renormalisation to unit area)
    ratio = (plates[at[k002]] / plates[at[k100]]) / (plain[at[k002]] / plain[at[k100]])
    assert ratio == pytest.approx(0.7**-3 / 0.7**1.5, rel=0.03)
    t = capillary_absorption(np.array([5.0, 30.0, 90.0]), 1.0)
    assert 1.0 < t[0] < t[1] < t[2] and t[2] == pytest.approx(1.2286, rel=1e-3)
    s = sim.sample(8, np.random.default_rng(0), Ranges(preferred_orientation=0.3,
                                                        absorption=1.0), exact=True)
    assert np.isfinite(s.counts).all() and s.counts.sum() > 0


def test_refinement_follows_texture_when_asked():
    sim = PowderSimulator(oxide_structures(["CeO2", "ZnO"]), WL, np.linspace(3.0, 30.5, 1100),
                          instrument=INSTRUMENT)
    truth = {"CeO2": 5.4150, "ZnO": np.array([3.2530, 5.2000])}
    eff = Effects(march=np.array([[1.0, 0.75]]))
    lattice = {"CeO2": np.array([[5.4150]]), "ZnO": truth["ZnO"][None]}
    y = sim.patterns(np.array([[1.5e5, 1.5e5]]) * sim.step, lattice, np.array([[50.0, 40.0]]),
                     effects=eff)
    y = sim.noisy(y + 150.0, np.random.default_rng(8))[0]
    start = {"CeO2": np.array([5.4120]), "ZnO": truth["ZnO"] * 0.999}
    args = (y, np.array([1e5, 1e5]) * sim.step, start, np.array([40.0, 40.0]),
            np.array([True, True]))
    plain = Refinement(sim).refine_one(*args)
    textured = Refinement(sim, preferred_orientation=True).refine_one(*args)
    assert textured["phases"]["ZnO"]["march_r"][0] == pytest.approx(0.75, abs=0.05)
    assert textured["rwp"] < 0.8 * plain["rwp"]
    np.testing.assert_allclose(textured["phases"]["ZnO"]["lattice"][0], truth["ZnO"],
                               atol=0.002)


def test_a_failed_fit_keeps_the_network_values(oxides, monkeypatch, caplog):
    from bluesky_xrdml.analysis import refine as refine_module

    sim = oxides.simulator
    y = sim.noisy(sim.patterns(np.array([[3e5, 0, 0, 0, 0]]) * sim.step,
                               {n: sim.peaks[n].nominal[None] for n in sim.names},
                               np.full((1, 5), 40.0)) + 80, np.random.default_rng(2))
    y = np.vstack([y, y])
    net = oxides.predict(y)
    real = refine_module.Refinement.refine_one
    calls = []

    def fails_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("x0 is infeasible")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(refine_module.Refinement, "refine_one", fails_first)
    ds = oxides.refine(y, net)
    assert not ds["refined"].values[0].any() and ds["refined"].values[1].any()
    np.testing.assert_array_equal(ds["lattice_a"].values[0], net["lattice_a"].values[0])
    assert "refinement of pattern 0 failed" in caplog.text

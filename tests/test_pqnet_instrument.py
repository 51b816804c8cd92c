"""Instrument-aware powder simulation and the calibrant profile (``xrdml calibrate
profile``), checked against simulated truth and the real CeO2 pattern."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bluesky_xrdml.analysis.calibrate import CalibrationError, fit_profile
from bluesky_xrdml.cli import app
from bluesky_xrdml.simulation.instrument import Instrument, pseudo_voigt_asym
from bluesky_xrdml.simulation.powder import PowderSimulator, Ranges, tch
from bluesky_xrdml.simulation.structures import demo_structures, oxide_structures

WL = 0.4066
GRID = np.linspace(3.0, 30.5, 1376)
SYNCHROTRON = Instrument(wavelength=WL, U=0.002, V=-0.0005, W=0.0030, X=0.004,
                         asym0=-0.003, asym1=0.004, zero=0.006)


def test_kalpha2_doublet_puts_a_half_height_twin_where_bragg_says():
    tt = np.linspace(40.0, 50.0, 5001)
    inst = Instrument.lab("Cu", W=0.02**2)
    sim = PowderSimulator({"Ni": demo_structures()["Ni"]}, inst.wavelength, tt, instrument=inst)
    y = sim.phase_pattern("Ni", 3.524, 500.0)[0]
    d111 = 3.524 / np.sqrt(3)
    k1, k2 = (np.degrees(2 * np.arcsin(lam / (2 * d111))) for lam in inst.lines_wavelengths)
    h1, h2 = y[np.argmin(np.abs(tt - k1))], y[np.argmin(np.abs(tt - k2))]
    # dispersion: Δ2θ = 2 tan θ Δλ/λ (radians) for Cu Kα1/Kα2 at 2θ = 44.5°
    assert k2 - k1 == pytest.approx(np.degrees(2 * np.tan(np.radians(44.5 / 2)) * 0.003834
                                               / 1.540593), rel=0.01)
    assert tt[np.argmax(y)] == pytest.approx(k1, abs=0.004)
    assert h2 / h1 == pytest.approx(0.5, rel=0.05)


def test_fast_path_follows_the_exact_path_with_a_calibrated_instrument():
    sim = PowderSimulator(oxide_structures(["CeO2", "ZnO", "TiO2"]), WL, GRID,
                          instrument=SYNCHROTRON)
    rng = np.random.default_rng(0)
    lattice = {n: sim.peaks[n].nominal[None] * np.ones((4, 1)) for n in sim.names}
    size = rng.uniform(10, 100, (4, 3))
    exact = sim.patterns(np.ones((4, 3)), lattice, size)
    fast = sim.patterns(np.ones((4, 3)), lattice, size, fast=True)
    assert np.abs(exact - fast).max() / exact.max() < 0.04
    np.testing.assert_allclose(fast.sum(axis=1) * sim.step, 3.0, rtol=2e-3)  # unit areas


def test_measured_effects_add_humps_and_impurities_but_keep_the_truth():
    sim = PowderSimulator(oxide_structures(["CeO2", "NiO"]), WL, GRID, instrument=SYNCHROTRON)
    s = sim.sample(64, np.random.default_rng(1), Ranges.measured(impurity=0.3, p_impurity=1.0))
    assert s.impurity is not None and (s.impurity > 0).mean() > 0.9
    np.testing.assert_allclose(s.fraction.sum(axis=1), 1.0)
    # the phases' integrated counts leave room for background, humps and impurities
    phase_counts = s.scale.sum(axis=1) / sim.step
    assert np.all(phase_counts <= s.counts.sum(axis=1) * 1.05)


LAB = Instrument.lab("Cu", U=0.004, V=-0.002, W=0.0025, X=0.01, asym0=0.0, asym1=0.01,
                     zero=-0.01)


@pytest.mark.parametrize("true", [SYNCHROTRON, LAB], ids=["synchrotron", "lab-Cu"])
def test_calibration_recovers_a_known_instrument(true):
    grid = GRID if true is SYNCHROTRON else np.linspace(20.0, 90.0, 3501)
    sim = PowderSimulator({"CeO2": demo_structures()["CeO2"]}, true.wavelength, grid,
                          instrument=true)
    y = sim.phase_pattern("CeO2", 5.4116, 5000.0)[0] * 2e5 * sim.step + 80.0
    y = np.random.default_rng(3).poisson(y).astype(float)
    cal = fit_profile(grid, y, true.wavelength, calibrant="CeO2", wavelength2=true.wavelength2)
    inst = cal.instrument
    SYNC = true
    assert len(cal.peaks) >= 8
    # the fitted instrument draws the same peaks: shape, width, asymmetry and position
    # (zero shift and a constant asymmetry trade off; the peaks they draw must not)
    for tt in ((8.0, 15.0, 25.0) if true is SYNCHROTRON else (30.0, 50.0, 80.0)):
        x = np.linspace(tt - 0.5, tt + 0.5, 2001)
        want, got = (pseudo_voigt_asym(x, tt + i.zero, float(i.fwhm_g(tt)),
                                       float(i.fwhm_l(tt)), float(i.tau(tt)))
                     for i in (SYNC, inst))
        assert np.abs(got - want).max() < 0.05 * want.max()
        assert x[np.argmax(got)] == pytest.approx(x[np.argmax(want)], abs=0.003)


def test_calibration_says_what_is_wrong():
    with pytest.raises(CalibrationError, match="wavelength"):
        fit_profile(GRID, np.full(GRID.size, 100.0), 5.0)  # no CeO2 line below 30.5°
    with pytest.raises(CalibrationError, match="calibrant"):
        fit_profile(GRID, np.full(GRID.size, 100.0), WL, calibrant="unobtainium")


def test_calibrate_profile_command_on_the_real_ceo2_pattern(tmp_path):
    from conftest import shared_data

    xy = shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.xy")
    out = tmp_path / "ceo2.profile.json"
    res = CliRunner().invoke(app, ["calibrate", "profile", str(xy), "--wavelength", "0.4066",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and out.with_suffix(".png").exists()
    data = json.loads(out.read_text())
    inst = Instrument.load(out, wavelength=0.4066)
    assert data["calibrant"] == "CeO2" and len(data["peaks"]) >= 8
    # every isolated CeO2 peak sits where the PONI's wavelength puts it, ~0.065° wide
    for pk in data["peaks"]:
        assert pk["two_theta"] - pk["expected"] == pytest.approx(inst.zero, abs=0.006)
        assert pk["fwhm"] == pytest.approx(pk["fwhm_model"], rel=0.15)
    assert abs(inst.zero) < 0.01
    assert 0.05 < tch(inst.fwhm_g(15.0), inst.fwhm_l(15.0))[0] < 0.08
    assert data["rwp"] < 0.1
    with pytest.raises(ValueError, match="calibrated at"):
        Instrument.load(out, wavelength=1.5406)

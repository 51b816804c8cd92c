"""PQ-Net on measured patterns: the shipped ``pqnet-oxides`` model (CeO2, NiO, ZnO, TiO2,
Al2O3 at λ = 0.4066 Å, instrument profile calibrated on the CeO2 Pilatus pattern) on the
real CeO2 pattern, phases outside the model, residual + flags in the analysis run, and
fine-tuning on reference measurements."""

import numpy as np
import pytest
import torch
from test_pqnet import pattern_run

from bluesky_xrdml.analysis.calibrate import read_xy
from bluesky_xrdml.callbacks.phases import PhaseQuantification
from bluesky_xrdml.callbacks.xrdml import XRDMLCallback
from bluesky_xrdml.models import pqnet
from bluesky_xrdml.simulation.structures import demo_structures
from bluesky_xrdml.training import pqnet as training

CERTIFIED_A = 5.4116  # Å, the CeO2 calibrant's lattice parameter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def oxides():
    return pqnet.load("pqnet-oxides")


@pytest.fixture(scope="module")
def ceo2_xy():
    from conftest import shared_data

    return read_xy(shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.xy"))


def test_real_ceo2_pattern_is_ceo2_and_nothing_else(oxides, ceo2_xy):
    x, y = ceo2_xy
    assert len(oxides.phases) >= 5 and oxides.wavelength == 0.4066
    ds = oxides.predict(y, two_theta=x)  # 1512 points 0.01-30.8° → the model's grid
    frac = dict(zip(oxides.phases, ds["fraction"].values[0]))
    assert frac["CeO2"] >= 0.95
    assert all(f < 0.03 for p, f in frac.items() if p != "CeO2")
    presence = dict(zip(oxides.phases, ds["presence"].values[0]))
    assert presence["CeO2"] > 0.5
    assert all(v < 0.5 for p, v in presence.items() if p != "CeO2")
    j = oxides.phases.index("CeO2")
    assert ds["lattice_a"].values[0, j] == pytest.approx(CERTIFIED_A, abs=0.002)
    ex = oxides.explain(y, ds=ds, two_theta=x)
    assert not ex["poor"][0] and ex["unexplained"][0] < 0.2


def _with_outsider(oxides, share):
    """Simulated CeO2 patterns on the model's instrument, ``share`` of the phase counts from
    Pd (a phase the model does not know)."""
    from bluesky_xrdml.simulation.powder import PowderSimulator

    s = demo_structures()
    sim = PowderSimulator({"CeO2": s["CeO2"], "Pd": s["Pd"]}, oxides.wavelength,
                          oxides.two_theta, instrument=oxides.simulator.instrument)
    n = len(share)
    scale = np.array([[1 - f, f] for f in share]) * 3e5 * sim.step
    y = sim.patterns(scale, np.tile([5.4116, 3.890], (n, 1)), np.full((n, 2), 60))
    return sim.noisy(y + 100.0, np.random.default_rng(5))


def test_a_phase_outside_the_model_is_flagged_and_not_forced_into_known_ones(oxides):
    y = _with_outsider(oxides, [0.0, 0.6])
    ds = oxides.predict(y)
    ex = oxides.explain(y, ds=ds)
    assert not ex["poor"][0] and ex["poor"][1]
    assert ex["unexplained"][1] > 2 * ex["unexplained"][0]
    j = oxides.phases.index("CeO2")
    assert ds["presence"].values[1, j] > 0.5  # CeO2 is still there


def test_residual_and_flags_land_in_the_analysis_run(oxides, ceo2_xy, collector):
    x, y = ceo2_xy
    outsider = _with_outsider(oxides, [0.6])[0]
    on_grid = np.interp(x, oxides.two_theta, outsider, left=50.0, right=50.0)
    cb = XRDMLCallback(analyses=[PhaseQuantification(model=oxides)])
    cb.subscribe(collector)
    docs = pattern_run((y, on_grid), x, 0.4066, obj="det")
    for name, doc in docs:
        cb(name, doc)
    cb.wait(timeout=120)
    rows = collector.stream("phases")
    assert [r["point"] for r in rows] == [1, 2]
    assert rows[0]["CeO2_fraction"] >= 0.95
    residuals = collector.stream("residuals")
    assert [r["point"] for r in residuals] == [1, 2]
    assert len(residuals[0]["residual"]) == oxides.two_theta.size
    assert rows[0]["unexplained"] < 0.2 < rows[1]["unexplained"]
    flags = collector.stream("flags")
    assert [f["point"] for f in flags] == [2] and "poorly explained" in flags[0]["flag"]
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success"  # a flag is not an error


def test_reference_measurements_fine_tune_and_are_recorded(tmp_path):
    """A tiny 2-phase model; the 'measured' NiO reference is simulated on another instrument
    (broader, asymmetric peaks) so the model has something to learn from it."""
    from bluesky_xrdml.simulation.instrument import Instrument
    from bluesky_xrdml.simulation.powder import PowderSimulator

    s = demo_structures()
    phases = {"NiO": s["NiO"], "CeO2": s["CeO2"]}
    tt = (1.0, 11.0, 1024)
    grid = np.linspace(*tt)
    other = Instrument(wavelength=0.1771, W=0.05**2, asym0=0.01)
    ref_sim = PowderSimulator({"NiO": s["NiO"]}, 0.1771, grid, instrument=other)
    ref = ref_sim.noisy(ref_sim.patterns([[2e5 * ref_sim.step]], [[4.177]], [[40.0]]) + 30,
                        np.random.default_rng(0))[0]
    path = tmp_path / "nio.xy"
    np.savetxt(path, np.c_[grid, ref])
    refs = training.parse_references([f"NiO={path}"])
    out = tmp_path / "tiny.safetensors"
    arch = {"stem": [8, 8, 4], "pattern_block": [[12, 5], [16, 3]], "phase_block": [[8, 3]],
            "hidden": 32}
    card = training.train(phases, out, wavelength=0.1771, two_theta=tt, members=2, steps=60,
                          batch=64, pool=512, arch=arch, n_validation=100, references=refs,
                          reference_steps=60, progress=False, log=lambda *a: None)
    assert card["training"]["references"]["phases"] == ["NiO"]
    model = pqnet.load(out)
    ds = model.predict(ref)
    assert ds["fraction"].sel(phase="NiO").item() > 0.8
    assert ds["presence"].sel(phase="NiO").item() > 0.5 > ds["presence"].sel(phase="CeO2").item()
    with pytest.raises(ValueError, match="PHASE=FILE"):
        training.parse_references(["nio.xy"])
    with pytest.raises(ValueError, match="not phases of the model"):
        training.finetune_references(None, model.simulator, None, None, {"Ni": (grid, ref)})

"""PQ-Net: training a tiny ensemble, the shipped model's contract, bad input, and the
live callback on simulated maps and XRD-CT scans."""

import json

import numpy as np
import pytest
import torch
import typer
from event_model import compose_run
from typer.testing import CliRunner

from bluesky_xrdml.analysis.tomography import reconstruct_channels
from bluesky_xrdml.callbacks.phases import PhaseQuantification
from bluesky_xrdml.callbacks.xrdml import XRDMLCallback
from bluesky_xrdml.models import pqnet
from bluesky_xrdml.plans import xrd_map, xrdct
from bluesky_xrdml.simulation import PowderSimulator, demo_structures
from bluesky_xrdml.simulation.powder import Ranges
from bluesky_xrdml.training import pqnet as training

WL = 0.1771
TT = np.linspace(1.0, 11.0, 2048)
TINY_ARCH = {"stem": [8, 8, 4], "pattern_block": [[12, 5], [16, 3]], "phase_block": [[8, 3]],
             "hidden": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is shared; 2 threads contend badly
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-member ensemble for Ni + CeO2 trained for a few seconds."""
    s = demo_structures()
    out = tmp_path_factory.mktemp("pqnet") / "tiny.safetensors"
    card = training.train({"Ni": s["Ni"], "CeO2": s["CeO2"]}, out, wavelength=WL,
                          two_theta=(1.0, 11.0, 2048), members=2, steps=120, batch=64,
                          pool=1024, arch=TINY_ARCH, n_validation=200, progress=False,
                          log=lambda *a: None)
    return out, card


@pytest.fixture(scope="module")
def demo_model():
    return pqnet.load()


def test_tiny_ensemble_beats_chance(tiny):
    out, card = tiny
    model = pqnet.load(out)
    assert model.phases == ["Ni", "CeO2"] and model.wavelength == WL
    assert np.array_equal(model.two_theta, TT)
    sim = PowderSimulator({k: v for k, v in demo_structures().items() if k in model.phases},
                          WL, TT)
    test = sim.sample(300, np.random.default_rng(123), Ranges(), exact=True)
    ds = model.predict(test.counts)
    assert ds["fraction"].dims == ("pattern", "phase") and ds.sizes["pattern"] == 300
    for var in ("scale", "fraction", "size_nm", "lattice_a"):
        assert f"{var}_std" in ds and np.all(ds[f"{var}_std"].values >= 0)
    # chance: the best constant guess (mean fraction, nominal lattice, mean size)
    sel = test.present & (test.fraction >= 0.1)
    frac_mae = np.abs(ds["fraction"].values - test.fraction).mean()
    frac_chance = np.abs(test.fraction.mean() - test.fraction).mean()
    assert frac_mae < 0.5 * frac_chance, (frac_mae, frac_chance)
    a = test.lattice_a
    lat_mae = np.abs(ds["lattice_a"].values - a)[sel].mean()
    lat_chance = np.abs(sim.nominal_a - a)[sel].mean()
    assert lat_mae < 0.6 * lat_chance, (lat_mae, lat_chance)
    # the card: phases, instrument, ranges, seed, metrics, sha256; the loss curve beside it
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sha256"] == card["sha256"] and len(saved["sha256"]) == 64
    assert saved["phases"] == ["Ni", "CeO2"] and saved["wavelength"] == WL
    assert saved["ranges"]["lattice_rel"] == 0.01 and saved["seed"] == 0
    assert {"fraction_mae", "lattice_mae_A", "size_mape_pct"} <= set(saved["metrics"])
    assert out.with_suffix(".png").stat().st_size > 1000


def test_shipped_model_honours_its_contract(demo_model):
    card = demo_model.card
    assert demo_model.phases == ["Ni", "NiO", "CeO2", "Pd"]
    assert demo_model.wavelength == 0.1771
    assert np.array_equal(demo_model.two_theta, np.linspace(1.0, 11.0, 2048))
    assert card["nominal"] == {"Ni": [3.524], "NiO": [4.177], "CeO2": [5.411], "Pd": [3.89]}
    assert card["ranges"]["size_nm"] == [5.0, 100.0] and card["members"] == 5
    assert card["sha256"] and demo_model.provenance()["sha256"] == card["sha256"]
    # an independently simulated pattern (exact path) of known composition
    sim = PowderSimulator(demo_structures(), WL, TT)
    scale = np.array([[0.6, 0.0, 0.4, 0.0]]) * 4e5 * sim.step
    a = sim.nominal_a * np.array([1.004, 1, 0.995, 1])
    y = sim.patterns(scale, a, np.array([[20.0, 30, 60, 30]]))
    y = sim.noisy(y + 40.0, np.random.default_rng(1))
    ds = demo_model.predict(y)
    assert ds["fraction"].values[0] == pytest.approx([0.6, 0.0, 0.4, 0.0], abs=0.05)
    assert ds["lattice_a"].values[0, [0, 2]] == pytest.approx(a[[0, 2]], abs=0.004)
    assert ds["size_nm"].values[0, 0] == pytest.approx(20.0, rel=0.25)


@pytest.mark.parametrize("bad, message", [
    (np.ones((2, 100)), "2048 points"),
    (np.full(2048, np.nan), "NaN"),
    (-np.ones(2048), "negative counts"),
])
def test_bad_input_gives_a_clear_error(tiny, bad, message):
    model = pqnet.load(tiny[0])
    with pytest.raises(pqnet.PatternError, match=message):
        model.predict(bad)


def test_train_command_from_cif_with_typer(tmp_path):
    from pymatgen.io.cif import CifWriter

    cif = tmp_path / "Pd.cif"
    CifWriter(demo_structures()["Pd"]).write_file(str(cif))
    app = typer.Typer()

    @app.callback()
    def main():
        """throwaway app"""

    app.command("pqnet")(training.train_pqnet_command)
    out = tmp_path / "pd.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["pqnet", "--cif", str(cif), "--wavelength", "0.1771",
                                 "--two-theta", "1:11:512", "--out", str(out), "--members", "1",
                                 "--steps", "3", "--validation", "40", "--threads", "1"])
    assert result.exit_code == 0, result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["phases"] == ["Pd"] and card["two_theta"] == [1.0, 11.0, 512]
    assert card["free"] == {"Pd": ["a"]} and card["nominal"]["Pd"] == [pytest.approx(3.89)]
    assert pqnet.load(out).predict(np.ones((3, 512))).sizes["pattern"] == 3
    bad = runner.invoke(app, ["pqnet", "--demo-phases", "--two-theta", "1-11"])
    assert bad.exit_code == 2 and "START:STOP:N" in bad.output
    none = runner.invoke(app, ["pqnet"])
    assert none.exit_code == 2 and "--cif" in none.output


def test_fbp_of_every_channel_on_a_low_rank_basis_matches_per_channel_fbp():
    rng = np.random.default_rng(0)
    ph = np.zeros((17, 17))
    ph[5:9, 6:12] = 1.0
    from skimage.transform import radon

    angles = np.arange(0, 180, 180 / 20)
    sino = radon(ph, angles, circle=True).T  # (angles, translations)
    stack = sino[:, :, None] * rng.uniform(0.5, 1.5, 30)[None, None, :]  # rank 1
    exact = reconstruct_channels(stack, angles, rank=None)
    low = reconstruct_channels(stack, angles, rank=4)
    assert exact.shape == (17, 17, 30)
    assert np.abs(low - exact).max() < 1e-8 * np.abs(exact).max() + 1e-9


def attach(RE, collector, analysis):
    cb = XRDMLCallback(analyses=[analysis])
    cb.subscribe(collector)
    RE.subscribe(cb)
    return cb


def test_xrdct_phase_maps_follow_the_phantom(RE, beamline, collector, demo_model):
    cb = attach(RE, collector, PhaseQuantification(model=demo_model))
    beamline.powder.mode.put("tomo")
    n_t, n_angles = 21, 24
    RE(xrdct([beamline.powder], beamline.x, -0.95, 0.95, n_t, beamline.rot, n_angles))
    assert cb.wait(timeout=180)
    (start,) = collector.of("start")
    assert start["xrdml"]["routes"] == {"powder_pattern": ["pqnet"]}
    assert start["xrdml"]["models"][0]["sha256"] == demo_model.card["sha256"]
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    assert len(collector.stream("phases")) == n_t * n_angles  # live preview of the sinogram
    (maps,) = collector.stream("maps")
    ph = beamline.powder.phantom
    rows, cols = np.asarray(maps["row"]), np.asarray(maps["col"])
    for j, name in enumerate(ph.names):
        image = np.asarray(maps[f"{name}_fraction"], float)
        assert image.shape == (n_t, n_t)
        ok = np.isfinite(image)
        image = np.where(ok, image, 0.0)  # NaN: no phase in that voxel
        assert np.asarray(maps[f"{name}_fraction_std"]).shape == (n_t, n_t)
        truth = np.array([[ph.at(x, y)[j] / max(sum(ph.at(x, y)), 1e-9) for x in cols]
                          for y in rows])
        r = np.corrcoef(image.ravel(), truth.ravel())[0, 1]
        assert r > 0.7, (name, r)
        # where the phase dominates, its lattice parameter is the phantom's
        dominant = ok & (truth > 0.9) & (image > 0.5)
        if dominant.sum() >= 3:
            lat = np.nanmedian(np.asarray(maps[f"{name}_lattice_a"], float)[dominant])
            assert lat == pytest.approx(ph.lattice[name], abs=0.01), name
    outside = ~np.isfinite(np.asarray(maps["Ni_fraction"], float))
    assert outside.sum() > 0  # voxels outside the sample are left out


def pattern_run(patterns, two_theta, wavelength, obj="powder"):
    """The documents of a raw run whose detector ``obj`` recorded ``patterns`` on the 2θ
    grid ``two_theta`` (configuration) at ``wavelength``, one event each."""
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": [len(two_theta)], "dtype_numpy": "<f4",
           "object_name": obj}
    conf = {obj: {"data": {f"{obj}_two_theta": list(map(float, two_theta)),
                           f"{obj}_wavelength": wavelength},
                  "timestamps": {f"{obj}_two_theta": 0, f"{obj}_wavelength": 0},
                  "data_keys": {}}}
    desc = run.compose_descriptor(name="primary", data_keys={f"{obj}_pattern": key},
                                  configuration=conf, object_keys={obj: [f"{obj}_pattern"]})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for y in patterns:
        docs.append(("event", desc.compose_event(data={f"{obj}_pattern": list(map(float, y))},
                                                 timestamps={f"{obj}_pattern": 0.0},
                                                 validate=False)))
    docs.append(("stop", run.compose_stop()))
    return docs


def test_map_rows_are_live_and_bad_patterns_are_recorded(collector, demo_model):
    cb = XRDMLCallback(analyses=[PhaseQuantification(model=demo_model)])
    cb.subscribe(collector)
    sim = PowderSimulator(demo_structures(), WL, TT)
    good = sim.noisy(sim.patterns(np.array([[0, 300.0, 0, 0]]), sim.nominal_a,
                                  np.full((1, 4), 30.0)) + 30, np.random.default_rng(0))[0]
    nan = good.copy()
    nan[5] = np.nan
    for name, doc in pattern_run((good, nan, -good, good), TT, WL):
        cb(name, doc)
    cb.wait(timeout=60)
    rows = collector.stream("phases")
    assert [r["point"] for r in rows] == [1, 4]
    assert rows[0]["NiO_fraction"] > 0.9 and rows[0]["NiO_fraction_std"] > 0
    assert rows[0]["NiO_lattice_a"] == pytest.approx(4.177, abs=0.004)
    errors = collector.stream("errors")
    assert [e["point"] for e in errors] == [2, 3]
    assert "NaN" in errors[0]["error"] and "negative" in errors[1]["error"]
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail" and "2 error(s)" in stop["reason"]


def test_patterns_on_another_grid_are_not_routed_and_say_why(RE, collector, demo_model):
    analysis = PhaseQuantification(model=demo_model)
    key = {"shape": [1024], "object_name": "det"}
    desc = {"configuration": {"det": {"data": {"det_two_theta": np.linspace(1, 11, 1024),
                                                "det_wavelength": WL}}}}
    assert "2048" in analysis.match("det_pattern", key, desc)
    desc["configuration"]["det"]["data"]["det_two_theta"] = np.linspace(1, 11, 2048)
    desc["configuration"]["det"]["data"]["det_wavelength"] = 0.5
    assert "wavelength" in analysis.match("det_pattern", {**key, "shape": [2048]}, desc)


def test_map_scan_gives_phase_maps(RE, beamline, collector, demo_model):
    cb = attach(RE, collector, PhaseQuantification(model=demo_model))
    RE(xrd_map([beamline.powder], beamline.x, -0.6, 0.6, 5, beamline.y, -0.6, 0.6, 4))
    cb.wait(timeout=60)
    (maps,) = collector.stream("maps")
    assert np.asarray(maps["CeO2_fraction"]).shape == (4, 5)
    assert np.asarray(maps["x"]).shape == (5,)
    rows = collector.stream("phases")
    assert len(rows) == 20 and "Pd_size_nm_std" in rows[0]

"""Operando attention model: the simulated cell and plan on a real RunEngine, a tiny model
trained by cycle, the public predict API, the live callback, training from archived runs."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bluesky_xrdml import catalog
from bluesky_xrdml.callbacks import OperandoAttention, XRDMLCallback
from bluesky_xrdml.cli import app
from bluesky_xrdml.devices import BatteryCell, OperandoDetector
from bluesky_xrdml.models import attention as am
from bluesky_xrdml.models import load_model
from bluesky_xrdml.plans import operando
from bluesky_xrdml.simulation.operando import (
    CellModel,
    moving_peaks,
    ocv,
    simulate_run,
    two_theta_for_q,
)
from bluesky_xrdml.training import attention as training

TINY = {"channels": 8, "hidden": 16, "head_channels": 2, "query_gate": True}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is shared
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A narrow model trained for a few epochs on 4 coarse simulated cycles."""
    data, run, q = training.simulated_dataset(4, [1.0, 0.2], interval=400.0, seed=1)
    out = tmp_path_factory.mktemp("attention") / "tiny.safetensors"
    card = training.train(data, out, q_range=q, wavelength=run.wavelength,
                          two_theta=run.two_theta, epochs=4, batch=32, arch=TINY,
                          augment=0.3, vaw_penalty=0.1, query_penalty=0.3,
                          progress=False, log=lambda *a: None)
    return out, card, data


def test_cell_model_hysteresis_polarisation_and_cutoffs():
    cell = CellModel()
    cell.set_current("charge", 1.0)
    while not cell.at_cutoff:
        cell.step(60.0)
    top_fast = cell.soc
    assert cell.voltage() == pytest.approx(4.2, abs=1e-6)
    cell.set_current("discharge", 1.0)
    v_dis = cell.voltage()
    # charge and discharge at the same state differ by 2 (h + R·C)
    assert cell.voltage(mode="charge") - v_dis == pytest.approx(2 * (0.01 + 0.08), abs=1e-9)
    cell.step(600.0)
    assert cell.soc_graphite > cell.soc  # staging lags behind on discharge
    slow = CellModel()
    slow.set_current("charge", 0.2)
    while not slow.at_cutoff:
        slow.step(600.0)
    assert slow.soc > top_fast  # a slower charge reaches a higher state of charge
    assert np.all(np.diff(ocv(np.linspace(0, 1, 50))) > 0)


def test_operando_plan_records_pattern_and_cell_in_one_stream(RE):
    cell = BatteryCell(name="cell", seed=2)
    det = OperandoDetector(name="operando", cell=cell, seed=2)
    docs = []
    (uid,) = RE(operando(cell, det, 1, [(1.0, 0.2)], interval=400), lambda n, d: docs.append(
        (n, d)))
    descriptors = [d for n, d in docs if n == "descriptor"]
    assert [d["name"] for d in descriptors] == ["primary"]
    cfg = descriptors[0]["configuration"]["operando"]["data"]
    assert cfg["operando_wavelength"] == pytest.approx(1.5406)
    events = [d for n, d in docs if n == "event"]
    data = {k: [e["data"][k] for e in events] for k in events[0]["data"]}
    assert len(data["operando_pattern"][0]) == len(cfg["operando_two_theta"])
    modes = data["cell_mode"]
    first_dis = modes.index("discharge")
    assert set(modes[:first_dis]) == {"charge"} and set(modes[first_dis:]) == {"discharge"}
    assert set(data["cell_rate"][:first_dis]) == {1.0}
    assert set(data["cell_rate"][first_dis:]) == {0.2}
    v = np.array(data["cell_voltage"])
    # charge ends at 4.2 V; a slow discharge empties the cell (s = 0) just above 3.0 V
    assert v.max() == pytest.approx(4.2, abs=1e-6) and 3.0 - 1e-9 <= v.min() < 3.1
    assert np.all(np.diff(data["cell_time"]) > 0)
    # the carbon peak moves from graphite (26.5°) towards LiC6 (24°) while charging
    tt = np.asarray(cfg["operando_two_theta"])
    win = (tt > 23) & (tt < 27.2)
    top = np.argmax(data["cell_voltage"][:first_dis])
    first_c = tt[win][np.argmax(np.asarray(data["operando_pattern"][0])[win])]
    top_c = tt[win][np.argmax(np.asarray(data["operando_pattern"][top])[win])]
    assert first_c > 26 and top_c < 25
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "success"


def test_split_by_cycle_holds_out_whole_cycles(tiny):
    _, card, data = tiny
    train, val = training.split_by_cycle(data, 2, seed=0)
    assert not set(train.cycle) & set(val.cycle)
    assert len(set(val.cycle)) == 2 and set(val.rate) == {0, 1}  # one cycle per rate
    assert card["training"]["validation_cycles"] == sorted(map(int, set(
        training.split_by_cycle(data, 2, seed=0)[1].cycle)))


def test_predict_api_shapes_and_card(tiny):
    out, card, _ = tiny
    model = load_model(str(out))
    assert isinstance(model, am.AttentionPredictor)
    run = simulate_run(1, [1.0], interval=900.0, seed=5)
    pred = model.predict(run.patterns, run.two_theta, run.wavelength)
    n = len(run.patterns)
    assert set(pred) == {"voltage", "voltage_std", "mode", "rate", "vaw", "vaw_two_theta"}
    assert pred["voltage"].shape == (n,) and pred["voltage_std"].shape == (n,)
    assert pred["mode"].shape == (n, 2) and pred["rate"].shape == (n, 2)
    assert pred["vaw"].shape == (n, 256) and pred["vaw_two_theta"].shape == (256,)
    assert np.allclose(pred["mode"].sum(1), 1) and np.allclose(pred["rate"].sum(1), 1)
    assert np.all(pred["voltage_std"] > 0)
    assert model.rate_labels == ["1C", "0.2C"]
    # the VAW's 2θ are the model's Q bins at the caller's wavelength
    q = am.q_of(pred["vaw_two_theta"], run.wavelength)
    assert q[0] > card["q_range"][0] and q[-1] < card["q_range"][1]
    assert np.all(np.diff(pred["vaw_two_theta"]) > 0)
    # one pattern alone works too
    assert model.predict(run.patterns[0], run.two_theta, run.wavelength)["vaw"].shape == (1, 256)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sha256"] == card["sha256"] and saved["rates"] == [1.0, 0.2]
    assert "Q" in saved["input"] and saved["modes"] == ["charge", "discharge"]
    assert out.with_suffix(".png").stat().st_size > 1000
    # the training recipe is in the card, and the learned query gate came back with the weights
    tr = saved["training"]
    assert (tr["augment_tilt"], tr["vaw_penalty"], tr["query_penalty"]) == (0.3, 0.1, 0.3)
    assert model.net.arch["query_gate"]
    gate = model.net.gate_logit.detach()
    assert gate.shape == (256,) and gate.abs().max() > 0  # trained away from its start (0)


def test_input_is_in_q_so_another_wavelength_reads_the_same(tiny):
    from bluesky_xrdml.simulation.operando import PatternSettings

    out, card, _ = tiny
    model = load_model(str(out))
    assert card["resolution_q_fwhm"] == training.DEFAULT_RESOLUTION
    assert card["instrument_fwhm_deg"] == 0.08  # the simulator's default detector
    x, raw = {}, {}
    # Cu Kα, then Mo Kα with the same Q resolution and with the same 2θ resolution (0.08°)
    for wl, fwhm in ((1.5406, 0.08), (0.7093, 0.08 * 0.7093 / 1.5406), (0.7093, 0.08)):
        tt = two_theta_for_q(card["q_range"], wl, 1301)
        s = PatternSettings(wavelength=wl, two_theta=(tt[0], tt[-1], tt.size),
                            counts=1e8, instrument_fwhm=fwhm)
        run = simulate_run(1, [1.0], interval=1200.0, seed=3, settings=s)
        x[wl, fwhm] = model.prepare(run.patterns, run.two_theta, wl, instrument_fwhm=fwhm)
        raw[wl, fwhm] = am.resample(run.patterns, run.two_theta, wl, card["q_range"])
    cu, mo_q, mo_2th = x.values()
    # same states, nearly noise-free: the network's inputs agree across wavelengths and
    # instruments once both are brought to the model's Q resolution ...
    assert np.abs(cu - mo_q).max() < 0.08
    assert np.abs(cu - mo_2th).max() < 0.08
    # ... which the same 2θ resolution alone does not give (peaks 2.2× wider in Q at Mo Kα)
    raw_cu, _, raw_mo = raw.values()
    assert np.abs(raw_cu - raw_mo).max() > 0.15
    # without an instrument FWHM, predict takes the card's (0.08°): the same-2θ case
    assert np.array_equal(model.prepare(run.patterns, run.two_theta, 0.7093), mo_2th)
    # and Al 111 sits where moving_peaks puts it at this wavelength
    pk = moving_peaks(run.soc[:1], 0.7093)["Al 111"][0]
    tt = model.vaw_two_theta(0.7093)
    assert tt[np.argmax(mo_2th[0] * (np.abs(tt - pk) < 0.5))] == pytest.approx(pk, abs=0.1)
    # an instrument coarser than the model's resolution is said, not hidden
    with pytest.warns(am.ResolutionWarning, match="coarser than the model"):
        model.prepare(run.patterns[:1], run.two_theta, 0.7093, instrument_fwhm=0.3)


def test_bad_patterns_say_what_is_wrong(tiny):
    model = load_model(str(tiny[0]))
    run = simulate_run(1, [1.0], interval=1800.0, seed=4)
    y = run.patterns.copy()
    y[1, 10] = np.nan
    with pytest.raises(am.PatternError, match="NaN"):
        model.predict(y, run.two_theta, run.wavelength)
    with pytest.raises(am.PatternError, match="points"):
        model.predict(y[:, :-1], run.two_theta, run.wavelength)
    with pytest.raises(am.PatternError, match="covers Q"):
        model.predict(run.patterns, run.two_theta, 3.0)  # Q range not measured
    with pytest.raises(am.PatternError, match="wavelength"):
        model.predict(run.patterns, run.two_theta, -1)


def test_live_callback_streams_predictions_and_saves_figures(tiny, RE, tmp_path):
    out, card, _ = tiny
    analysis = OperandoAttention(weights=str(out), figures=tmp_path / "figs")
    cb = XRDMLCallback(analyses=[analysis])
    docs = []
    cb.subscribe(lambda n, d: docs.append((n, d)))
    RE.subscribe(cb)
    cell = BatteryCell(name="cell", seed=6)
    det = OperandoDetector(name="operando", cell=cell, seed=6)
    (uid,) = RE(operando(cell, det, 1, [1.0], interval=500))
    assert cb.wait(60)
    start = [d for n, d in docs if n == "start"][0]
    assert start["xrdml"]["raw_uid"] == uid
    assert start["xrdml"]["models"][0]["sha256"] == card["sha256"]
    assert start["xrdml"]["routes"]["operando_pattern"] == ["attention"]
    desc = {d["uid"]: d for n, d in docs if n == "descriptor"}
    (op,) = [d for d in desc.values() if d["name"] == "operando"]
    assert op["data_keys"]["vaw"]["dims"] == ["vaw_two_theta"]
    rows = [p for n, p in docs if n == "event_page" and p["descriptor"] == op["uid"]]
    data = {k: sum((p["data"][k] for p in rows), []) for k in rows[0]["data"]}
    n = len(cell.truth)
    assert len(data["voltage"]) == n and sorted(data["point"]) == list(range(1, n + 1))
    assert all(len(v) == 256 for v in data["vaw"]) and len(data["vaw_two_theta"][0]) == 256
    assert set(data["mode"]) <= {"charge", "discharge"} and set(data["rate"]) <= {"1C", "0.2C"}
    p = np.array(data["p_charge"]) + np.array(data["p_discharge"])
    assert np.allclose(p, 1) and np.allclose(
        np.array(data["p_rate_1C"]) + np.array(data["p_rate_0p2C"]), 1)
    assert [d for n, d in docs if n == "stop"][0]["exit_status"] == "success"
    # the cell's voltage and time readings support the patterns; they are not counted
    assert cb.summaries()[-1]["analysed"] == {"attention": n}
    assert len(analysis.saved) == 2 and all((tmp_path / "figs").glob("operando_*.png"))
    for path in analysis.saved:
        assert (tmp_path / "figs" / path.split("/")[-1]).stat().st_size > 5000


def test_patterns_without_a_cell_are_not_routed(tiny, RE, beamline):
    import bluesky.plans as bp

    analysis = OperandoAttention(weights=str(tiny[0]), figures=False)
    cb = XRDMLCallback(analyses=[analysis])
    RE.subscribe(cb)
    RE(bp.count([beamline.powder], 2))
    assert cb.wait(30)
    assert cb.summaries()[-1]["analysed"] == {}


def test_train_from_archived_runs_through_the_cli(tiled_client, RE, tmp_path, monkeypatch):
    writer = catalog.raw_writer(tiled_client)
    RE.subscribe(writer)
    cell = BatteryCell(name="cell", seed=8)
    det = OperandoDetector(name="operando", cell=cell, seed=8)
    (uid,) = RE(operando(cell, det, 2, [1.0, 0.2], interval=700))
    (uid2,) = RE(operando(cell, det, 1, [1.0], interval=700))
    assert writer.join(60)
    monkeypatch.setenv("TILED_API_KEY", tiled_client.context.api_key or "")
    out = tmp_path / "mine.safetensors"
    args = ["train", "attention", "--from-runs", uid, uid2, "--catalog", tiled_client.uri,
            "--pattern", "operando_pattern", "--voltage", "cell_voltage", "--mode",
            "cell_mode", "--rate", "cell_rate", "--out", str(out), "--epochs", "1",
            "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out cycles" in result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["source"]["runs"] == [uid, uid2]
    assert card["rates"] == [1.0, 0.2] and card["wavelength"] == pytest.approx(1.5406)
    assert len(card["training"]["validation_cycles"]) == 2
    assert load_model(str(out)).predict(np.ones((2, 1301)), np.linspace(16, 42, 1301),
                                        1.5406)["vaw"].shape == (2, 256)
    bad = CliRunner().invoke(app, [*args[:-4], "--pattern", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_shipped_demo_model_follows_a_fresh_cycle():
    model = load_model("attention-demo")
    assert model.card["name"] == "attention-demo" and model.rate_labels == ["1C", "0.2C"]
    assert (am.SHIPPED.stat().st_size + am.SHIPPED.with_suffix(".json").stat().st_size) < 5e6
    run = simulate_run(1, [(1.0, 0.2)], interval=300.0, seed=77)  # a rate mix never trained on
    pred = model.predict(run.patterns, run.two_theta, run.wavelength)
    err = np.abs(pred["voltage"] - run.voltage)
    chance = np.abs(run.voltage - run.voltage.mean()).mean()
    assert err.mean() < 0.1 * chance, (err.mean(), chance)
    assert np.mean(pred["mode"].argmax(1) == (run.mode == "discharge")) > 0.9
    assert np.mean(pred["rate"].argmax(1) == (run.rate == 0.2)) > 0.9
    assert 0.6 < np.mean(err <= 2 * pred["voltage_std"]) <= 1.0


def test_shipped_model_attends_to_the_moving_peaks_and_reads_mo_kalpha():
    from bluesky_xrdml.simulation.operando import PatternSettings

    model = load_model("attention-demo")
    run = simulate_run(1, [1.0], interval=300.0, seed=78)
    pred = model.predict(run.patterns, run.two_theta, run.wavelength)
    vaw = pred["vaw"] / pred["vaw"].sum(1, keepdims=True)
    peaks = moving_peaks(run.soc, run.wavelength)

    def share(name):
        inside = np.abs(pred["vaw_two_theta"][None, :] - peaks[name][:, None]) <= 0.3
        return (vaw * inside).sum(1), inside

    (nmc3, w1), (nmc101, w2), (carbon, w3) = (share(k) for k in ("NMC 003", "NMC 101", "C 00l"))
    moving = (vaw * (w1 | w2 | w3)).sum(1).mean()
    assert moving > 0.5, moving  # 8 % for a uniform VAW; the benchmark's figure is 79 %
    al = share("Al 111")[0].mean()
    assert al < min(nmc3.mean(), nmc101.mean(), carbon.mean()), (al, nmc3.mean(), carbon.mean())
    # the same states at Mo Kα through a detector of the same 2θ resolution (0.08°)
    tt = two_theta_for_q(model.q_range, 0.7093, 1301)
    mo = simulate_run(1, [1.0], interval=300.0, seed=78, settings=PatternSettings(
        wavelength=0.7093, two_theta=(tt[0], tt[-1], tt.size), instrument_fwhm=0.08))
    mae_cu = np.abs(pred["voltage"] - run.voltage).mean()
    mae_mo = np.abs(model.predict(mo.patterns, mo.two_theta, 0.7093)["voltage"]
                    - mo.voltage).mean()
    assert mae_mo < 2 * mae_cu + 0.005, (mae_mo, mae_cu)


def test_operando_figures_keep_a_bounded_history_spread_over_the_whole_run():
    from bluesky_xrdml.callbacks.operando import FigureHistory

    history = FigureHistory(capacity=100)
    for point in range(1, 10_001):  # days of cycling, one pattern per point
        history.measured("voltage", point, 3.0 + point * 1e-4)
        history.add({"point": point, "voltage": 3.0}, np.full(256, point, np.float32))
    points = [r["point"] for r in history.rows]
    assert 50 <= len(points) <= 100 and points[0] == 1 and points[-1] > 9_800
    steps = set(np.diff(points))
    assert len(steps) == 1  # evenly spread
    assert [int(x[0]) for x in history.x] == points  # patterns stay with their rows
    assert sorted(history.values["voltage"]) == points

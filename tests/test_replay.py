"""The catalog round trip: archived run -> replay -> analysis run -> queried back."""

import json

import numpy as np
import pytest
from conftest import shared_data
from typer.testing import CliRunner

from bluesky_xrdml import catalog
from bluesky_xrdml.archive import ArchivedRun
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.cli import app
from bluesky_xrdml.plans import replay, xrd_map


@pytest.fixture(scope="module", params=["embedded", "server"])
def archived(request):
    """A small map with both detectors, scanned live with the callback and filed, once
    in the embedded catalog and once in a real server with an API key."""
    from bluesky import RunEngine

    from bluesky_xrdml.devices import sim_beamline

    if request.param == "embedded":
        client = request.getfixturevalue("tiled_client")
        uri, key = client.uri, client.context.api_key
    else:
        uri, key = request.getfixturevalue("tiled_server")
        client = catalog.connect(uri, api_key=key)
    RE, beamline = RunEngine({}), sim_beamline(seed=3)
    raw = catalog.raw_writer(client)
    RE.subscribe(raw)
    cb = XRDMLCallback()
    cb.subscribe(catalog.analysis_writer(client))
    RE.subscribe(cb)
    (uid,) = RE(xrd_map([beamline.powder, beamline.area], beamline.x, -0.6, 0.6, 4,
                        beamline.y, -0.4, 0.4, 3, md={"sample": "phantom", "operator": "test"}))
    cb.wait(timeout=120)
    raw.join(timeout=120)
    return client, uri, key, uid


def same_results(live_run, peaks, maps):
    live_peaks = catalog.peaks(live_run)
    # centres come from a float32 network whose results change in the last bits with the
    # batch they were computed in (live and replay batch differently): 1e-3 px is far
    # below any centring error, far above float32 rounding; intensities are float64 sums
    np.testing.assert_allclose(live_peaks[["row", "col"]].to_numpy(),
                               peaks[["row", "col"]].to_numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(live_peaks["intensity"].to_numpy(),
                               peaks["intensity"].to_numpy(), rtol=1e-9)
    assert list(live_peaks["flag"]) == list(peaks["flag"])
    live_maps = catalog.maps(live_run)
    for name in ("Ni_111", "CeO2_111", "n_peaks"):
        np.testing.assert_allclose(live_maps[name].values, maps[name].values, equal_nan=True)


def test_replay_plan_reproduces_the_live_analysis(archived):
    from bluesky import RunEngine

    client, _, _, uid = archived
    RE = RunEngine({})
    live = catalog.analyses(client, uid)[-1]  # the oldest: made during the scan
    before = len(catalog.analyses(client, uid))
    cb = XRDMLCallback()
    cb.subscribe(catalog.analysis_writer(client))
    RE.subscribe(cb)
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    (replay_uid,) = RE(replay(client[uid]))
    cb.wait(timeout=120)
    start = docs[0][1]
    assert start["replay_of"] == uid
    assert start["plan_name"] == "xrdml_replay" and start["replay_of_plan"] == "xrd_map"
    assert start["sample"] == "phantom" and start["operator"] == "test"
    assert start["shape"] == [3, 4] and start["motors"] == ["y", "x"]
    runs = catalog.analyses(client, uid)  # the replay's analysis links to the original run
    assert len(runs) == before + 1
    newest = runs[0]
    assert runs[-1].metadata["start"]["uid"] == live.metadata["start"]["uid"]
    assert newest.metadata["start"]["xrdml"]["replay_uid"] == replay_uid
    assert newest.metadata["start"]["xrdml"]["raw_plan_name"] == "xrd_map"
    assert catalog.verify(newest) == {}
    same_results(live, catalog.peaks(newest), catalog.maps(newest))


def test_bulk_path_gives_the_same_results_without_a_runengine(archived, collector):
    client, _, _, uid = archived
    live = catalog.analyses(client, uid)[-1]
    cb = XRDMLCallback()
    cb.subscribe(collector)
    archived_run = ArchivedRun(client[uid])
    reads = []  # (data key, slice) of every array read from the catalog

    class Counted:
        def __init__(self, key, node):
            self.key, self.node = key, node

        def __getitem__(self, index):
            reads.append((self.key, index))
            return self.node[index]

    for s in archived_run.streams:
        s.arrays = {k: Counted(k, v) for k, v in s.arrays.items()}
    (primary,) = [s for s in archived_run.streams if s.name == "primary"]
    docs = archived_run.documents(chunk=5)
    for name, doc in docs:
        cb(name, doc)
        if name == "event_page" and doc["descriptor"] == primary.descriptor["uid"]:
            # read page by page, not the whole run up front
            assert len(reads) == len(primary.arrays) > 0 and len(doc["seq_num"]) == 5
            break
    for name, doc in docs:
        cb(name, doc)
    assert sorted({(i.start, i.stop) for _, i in reads}) == [(0, 5), (5, 10), (10, 15)]
    cb.wait(timeout=120)
    import pandas as pd

    peaks = pd.DataFrame(collector.stream("peaks"))
    (maps,) = collector.stream("maps")
    maps = {k: type("V", (), {"values": np.asarray(v)}) for k, v in maps.items()}
    same_results(live, peaks, maps)


def test_cli_replay_and_results(archived, tmp_path, monkeypatch):
    client, uri, key, uid = archived
    monkeypatch.setenv("TILED_API_KEY", key)
    runner = CliRunner()
    before = len(catalog.analyses(client, uid))
    out = runner.invoke(app, ["replay", uid, "--catalog", uri, "--bulk"])
    assert out.exit_code == 0, out.output
    assert "1 run(s) replayed, 0 with errors" in out.output
    runs = catalog.analyses(client, uid)
    assert len(runs) == before + 1
    assert runs[0].metadata["start"]["uid"] in out.output
    out = runner.invoke(app, ["results", uid, "--catalog", uri, "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    for run in runs:
        assert run.metadata["start"]["uid"] in out.output
    kinds = sorted(p.name.split("_")[0] for p in tmp_path.glob("*.png"))
    assert kinds == ["maps"] * len(runs) + ["peaks"] * len(runs) + ["phases"] * len(runs)
    assert key not in out.output


def test_replay_with_your_own_model_records_its_provenance(archived, tmp_path):
    from bluesky_xrdml.models import weights
    from bluesky_xrdml.models.weights import WEIGHTS_DIR

    client, uri, key, uid = archived
    tensors, card = weights.load(WEIGHTS_DIR / "braggnn.safetensors")
    first = next(iter(tensors))
    tensors[first] = tensors[first] * 1.001  # "retrained": other weights, other sha256
    mine = weights.save(tmp_path / "mine.safetensors", tensors, {**card, "version": "mine"})
    out = CliRunner().invoke(app, ["replay", uid, "--catalog", uri, "--bulk",
                                   "--model", f"braggnn={tmp_path / 'mine.safetensors'}"],
                             env={"TILED_API_KEY": key})
    assert out.exit_code == 0, out.output
    newest = catalog.analyses(client, uid)[0]
    (used,) = [m for m in newest.metadata["start"]["xrdml"]["models"] if m["name"] == "braggnn"]
    assert used["sha256"] == mine["sha256"] != card["sha256"]
    assert used["version"] == "mine"


def test_wrong_key_says_what_to_check_and_never_shows_the_key(tiled_server):
    uri, key = tiled_server
    with pytest.raises(catalog.CatalogError) as err:
        catalog.connect(uri, api_key="not-" + key)
    assert uri in str(err.value) and "TILED_API_KEY" in str(err.value)
    assert key not in str(err.value)


def test_real_usaxs_runs_load_into_tiled_and_replay_with_nothing_to_analyse(
        tiled_client, RE, collector):
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    runs = json.loads(shared_data("bluesky_documents", "usaxs_docs.json").read_text())
    writer = TiledWriter(tiled_client)
    uids = []
    for docs in runs.values():
        for name, doc in docs:
            writer(name, doc)
        uids.append(docs[0][1]["uid"])
    cb = XRDMLCallback()
    cb.subscribe(collector)
    RE.subscribe(cb)
    for uid in uids:
        RE(replay(tiled_client[uid]))
    cb.wait(timeout=120)
    assert cb.dispatch_errors == 0
    stops = collector.of("stop")
    assert len(stops) == len(uids)
    assert all(s["reason"].startswith("nothing to analyse") for s in stops)
    assert {d["xrdml"]["raw_uid"] for d in collector.of("start")} == set(uids)

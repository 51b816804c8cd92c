"""A catalog outage during a scan loses nothing: runs wait in the spool, ``sync`` files
them exactly once."""

import shutil

import bluesky.plans as bp
import pandas as pd
import pytest
from bluesky import RunEngine
from typer.testing import CliRunner

from bluesky_xrdml import catalog
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.cli import app
from bluesky_xrdml.devices import sim_beamline


@pytest.fixture
def fast_failures(monkeypatch):
    """The tiled client retries for up to 45 s; fail at once so the test stays short."""
    import tiled.client.utils as utils

    monkeypatch.setattr(utils, "TILED_RETRY_ATTEMPTS", 1)
    monkeypatch.setattr(utils, "TILED_RETRY_TIMEOUT", 1.0)


def test_server_stopped_mid_scan_then_synced_exactly_once(tmp_path, fast_failures, collector):
    directory, spool = tmp_path / "catalog", tmp_path / "spool"
    beamline, RE = sim_beamline(seed=4), RunEngine({})
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))

    server = catalog.embedded(directory)
    _, client = server.__enter__()
    stopped = []
    try:
        raw = catalog.raw_writer(client, batch_size=1, spool=spool)
        RE.subscribe(raw)
        cb = XRDMLCallback()
        cb.subscribe(catalog.analysis_writer(client, batch_size=1, spool=spool))
        RE.subscribe(cb)

        def outage(name, doc):  # the server goes down after the third frame has landed
            if name == "event" and doc["seq_num"] == 3 and not stopped:
                cb.wait(timeout=60)
                raw.join(timeout=60)
                server.__exit__(None, None, None)
                stopped.append(True)

        RE.subscribe(outage)
        (uid,) = RE(bp.count([beamline.area], num=6))
    finally:
        if not stopped:
            server.__exit__(None, None, None)
    assert cb.wait(timeout=60) and raw.join(timeout=60)
    assert stopped and docs[-1][1]["exit_status"] == "success"  # the scan was not aborted
    assert sorted(p.parent.name for p in spool.rglob("*.msgpack")) == ["analysis", "raw"]

    # the same raw documents analysed without an outage, for comparison
    reference = XRDMLCallback()
    reference.subscribe(collector)
    for name, doc in docs:
        reference(name, doc)
    reference.wait(timeout=60)
    expected = pd.DataFrame(collector.stream("peaks"))

    with catalog.embedded(directory) as (_, client):
        assert uid in client and not client[uid].metadata.get("stop")  # a partial copy
        done = dict(catalog.sync(client, spool))
        assert done[uid] == "replaced a partial copy"
        (run,) = catalog.analyses(client, uid)
        assert done[run.metadata["start"]["uid"]] in ("uploaded", "replaced a partial copy")
        assert catalog.verify(run) == {}
        assert client[uid]["primary"]["area_image"].shape[0] == 6
        got = catalog.peaks(run)
        pd.testing.assert_frame_equal(got[["frame", "row", "col", "intensity", "flag"]],
                                      expected[["frame", "row", "col", "intensity", "flag"]],
                                      check_dtype=False)

        # idempotent: nothing left to do, and a file put back is recognised as filed
        assert catalog.sync(client, spool) == []
        for synced in spool.rglob("*.msgpack.synced"):
            shutil.copy(synced, synced.with_name(synced.name.removesuffix(".synced")))
        assert set(dict(catalog.sync(client, spool)).values()) == {"already in the catalog"}
        assert len(catalog.analyses(client, uid)) == 1
        assert len([u for u in client if u == uid]) == 1


def test_sync_command_against_an_unreachable_catalog(tmp_path):
    out = CliRunner().invoke(app, ["sync", "--catalog", "http://127.0.0.1:9/api",
                                   "--spool", str(tmp_path)])
    assert out.exit_code == 2
    assert "no Tiled server answers at http://127.0.0.1:9" in out.output

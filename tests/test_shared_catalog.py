"""The embedded catalog takes concurrent writes from independent clients: a facility's
plain TiledWriter on the RunEngine beside a plain TiledWriter on our callback."""

import logging

from bluesky import RunEngine
from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

from bluesky_xrdml import catalog
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.devices import sim_beamline
from bluesky_xrdml.plans import replay, xrd_map


def test_plain_tiled_writers_share_the_embedded_catalog_through_a_scan_and_a_replay(
        tiled_client, caplog):
    caplog.set_level(logging.WARNING, logger="bluesky_tiled_plugins")
    RE, beamline = RunEngine({}), sim_beamline(seed=5)
    RE.subscribe(TiledWriter(tiled_client, batch_size=1))  # files every raw event at once
    cb = XRDMLCallback()
    cb.subscribe(TiledWriter(tiled_client, batch_size=1, max_array_size=0))
    RE.subscribe(cb)

    (uid,) = RE(xrd_map([beamline.powder], beamline.x, -0.6, 0.6, 5,
                        beamline.y, -0.4, 0.4, 4))
    (replay_uid,) = RE(replay(tiled_client[uid]))
    assert cb.wait(timeout=300)

    assert cb.sink_failures == 0 and cb.dispatch_errors == 0
    for raw in (uid, replay_uid):
        assert tiled_client[raw]["primary"]["powder_pattern"].shape[0] == 20
        assert tiled_client[raw].metadata["stop"]["num_events"]["primary"] == 20
    runs = catalog.analyses(tiled_client, uid)
    assert {r.metadata["start"]["xrdml"]["replay_uid"] for r in runs} == {None, replay_uid}
    for run in runs:
        assert run.metadata["stop"]["exit_status"] == "success"
        assert catalog.verify(run) == {}  # every row of every stream arrived
        assert len(catalog.table(run, "patterns")) == 20
    # no write had to be retried: the server took every append as it came
    retried = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert retried == []

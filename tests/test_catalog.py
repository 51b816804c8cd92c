"""Raw and analysis runs in a real (embedded) Tiled catalog, read back with the helpers."""

import bluesky.plans as bp
import numpy as np
import pytest
from tiled.client import from_uri
from tiled.queries import Key

from bluesky_xrdml import catalog
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.plans import xrd_map


@pytest.fixture
def live(RE, tiled_client):
    raw = catalog.raw_writer(tiled_client)
    RE.subscribe(raw)
    cb = XRDMLCallback()
    cb.subscribe(catalog.analysis_writer(tiled_client))
    RE.subscribe(cb)
    cb.raw = raw
    return cb


def test_map_lands_in_tiled_and_reads_back_as_xarray(RE, beamline, live, tiled_client):
    (raw_uid,) = RE(xrd_map([beamline.powder], beamline.x, -0.9, 0.9, 6, beamline.y, -0.6, 0.6, 4))
    live.wait(timeout=60)
    (run,) = catalog.analyses(tiled_client, raw_uid)
    assert run.metadata["start"]["xrdml"]["raw_uid"] == raw_uid
    assert run.metadata["stop"]["exit_status"] == "success"
    ds = catalog.maps(run)
    assert dict(ds.sizes) == {"y": 4, "x": 6}
    np.testing.assert_allclose(ds["x"], np.linspace(-0.9, 0.9, 6), atol=1e-9)
    np.testing.assert_allclose(ds["y"], np.linspace(-0.6, 0.6, 4), atol=1e-9)
    assert {"Ni_111", "Ni_111_std", "CeO2_111"} <= set(ds.data_vars)
    assert ds.attrs["raw_uid"] == raw_uid
    # the map in Tiled equals what the per-pattern table says, point by point
    table = catalog.table(run, "patterns")
    assert len(table) == 24
    np.testing.assert_allclose(ds["Ni_111"].values.ravel(), table["Ni_111"].to_numpy())


def test_peak_table_reads_back_as_dataframe(RE, beamline, live, tiled_client):
    (raw_uid,) = RE(bp.scan([beamline.area], beamline.rot, 0.0, 1.0, 3))
    live.wait(timeout=60)
    (run,) = catalog.analyses(tiled_client, raw_uid)
    table = catalog.peaks(run)
    assert list(table.columns[:8]) == ["frame", "row", "col", "row_std", "col_std",
                                       "intensity", "method", "flag"]
    assert len(table) == run.metadata["stop"]["num_events"]["peaks"] > 20
    assert set(table["frame"]) == {1, 2, 3}
    assert catalog.verify(run) == {}


def test_a_plain_tiled_client_finds_analysis_runs(RE, beamline, live, tiled_client):
    (raw_uid,) = RE(bp.count([beamline.area], num=1))
    live.wait(timeout=60)
    live.raw.join(timeout=60)
    (analysis_uid,) = [s["analysis_uid"] for s in live.summaries() if s["raw_uid"] == raw_uid]
    plain = from_uri(tiled_client.uri, api_key=tiled_client.context.api_key)
    found = plain.search(Key("start.xrdml.raw_uid") == raw_uid)
    assert list(found) == [analysis_uid]
    routes = plain[analysis_uid].metadata["start"]["xrdml"]["routes"]
    assert routes == {"area_image": ["bragg-peaks"]}
    assert raw_uid in plain


def test_newest_analysis_first(RE, beamline, tiled_client):
    docs = []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    (raw_uid,) = RE(bp.count([beamline.area], num=1))
    uids = []
    for _ in range(2):  # analyse the same raw run twice, e.g. with a newer model
        cb = XRDMLCallback()
        cb.subscribe(catalog.analysis_writer(tiled_client))
        for name, doc in docs:
            cb(name, doc)
        cb.wait(timeout=60)
        uids.append(cb.summaries()[-1]["analysis_uid"])
    found = [r.metadata["start"]["uid"] for r in catalog.analyses(tiled_client, raw_uid)]
    assert found == uids[::-1]


def test_unreachable_catalog_gives_one_clear_message():
    with pytest.raises(catalog.CatalogError, match="127.0.0.1:9.*TILED_API_KEY"):
        catalog.connect("http://127.0.0.1:9/api")

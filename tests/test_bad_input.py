"""Every bad input is answered: recorded per item with a message that says what to do,
the run ends with exit_status="fail", and nothing a detector emits breaks the raw writer."""

import logging

import bluesky.plans as bp
import numpy as np
import pytest
from ophyd.sim import SynSignalWithRegistry

from bluesky_xrdml import catalog, spool
from bluesky_xrdml.callbacks import BraggPeaks, XRDMLCallback
from bluesky_xrdml.devices import PowderDetector
from bluesky_xrdml.spool import SpooledWriter


def attach(RE, collector, analyses):
    cb = XRDMLCallback(analyses=analyses)
    cb.subscribe(collector)
    RE.subscribe(cb)
    return cb


def test_bad_frames_are_each_recorded_with_what_to_do(RE, beamline, collector):
    cb = attach(RE, collector, [BraggPeaks(method="centroid")])
    good = beamline.area.simulator.frame(0.0)
    negative = -good.astype(np.int32) - 5
    beamline.area.inject = [
        good,
        good[:100, :100],  # too small for the declared 256×256
        good.astype(np.float64),  # float where <u2 counts were declared
        np.full(good.shape, 0, np.uint16),  # shutter closed
        negative,  # background-subtracted
        np.full(good.shape, "x"),  # not numbers
        good,
    ]
    RE(bp.count([beamline.area], num=7))
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert "5 error(s)" in stop["reason"]
    errors = {e["point"]: e["error"] for e in collector.stream("errors")}
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert "declares (256, 256)" in errors[2]
    assert "float64" in errors[3] and "raw counts" in errors[3]
    assert "constant" in errors[4] and "shutter" in errors[4]
    assert "negative" in errors[5]
    assert "not numbers" in errors[6]
    assert [f["frame"] for f in collector.stream("frames")] == [1, 7]


def test_a_frame_smaller_than_a_patch_is_recorded_not_ignored(RE, collector, tmp_path):
    img = SynSignalWithRegistry(name="img", func=lambda: np.ones((10, 10)),
                                save_path=str(tmp_path))  # as ophyd.sim's img
    cb = attach(RE, collector, ["bragg-peaks"])
    RE(bp.count([img], num=2))
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    errors = collector.stream("errors")
    assert [e["point"] for e in errors] == [1, 2]
    assert "smaller than the 11×11 patch" in errors[0]["error"]


class InjectedPowder(PowderDetector):
    """The powder detector, with some patterns replaced by bad ones (None: keep)."""

    def __init__(self, *args, inject=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.inject = list(inject)

    def trigger(self):
        status = super().trigger()
        value = self.inject.pop(0) if self.inject else None
        if value is not None:
            self.pattern.put(value)
        return status


def test_bad_patterns_are_each_recorded(RE, beamline, collector):
    b = beamline
    det = InjectedPowder(name="powder", x=b.x, y=b.y, rotation=b.rot, seed=1, inject=[
        None, np.ones(1000), np.zeros(2048), np.full(2048, -5.0), None])
    cb = attach(RE, collector, ["roi"])
    RE(bp.count([det], num=5))
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    errors = {e["point"]: e["error"] for e in collector.stream("errors")}
    assert sorted(errors) == [2, 3, 4]
    assert "2048 points" in errors[2] and "resample" in errors[2]
    assert "constant" in errors[3]
    assert "negative" in errors[4]
    assert [r["point"] for r in collector.stream("patterns")] == [1, 5]


def test_analyses_by_name_are_accepted_and_unknown_names_refused():
    cb = XRDMLCallback(analyses=["roi", "bragg-peaks"])
    assert [a.name for a in cb.analyses] == ["roi", "bragg-peaks"]
    with pytest.raises(ValueError, match="unknown analysis 'rois'; available: bragg-peaks, roi"):
        XRDMLCallback(analyses=["rois"])
    with pytest.raises(TypeError, match="is not an analysis"):
        XRDMLCallback(analyses=[object()])


def test_a_frame_of_another_shape_does_not_break_the_raw_writer(
        RE, beamline, tiled_client, caplog):
    raw = catalog.raw_writer(tiled_client)
    RE.subscribe(raw)
    good = beamline.area.simulator.frame(0.0)
    beamline.area.inject = [good, good[:100, :100], good]
    with caplog.at_level(logging.WARNING, logger="bluesky_xrdml.catalog"):
        (uid,) = RE(bp.count([beamline.area], num=3))
        assert raw.join(timeout=60)
    run = tiled_client[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    frames = np.asarray(run["primary"]["area_image"].read())
    assert frames.shape == (3, 256, 256)
    assert np.array_equal(frames[0], good) and (frames[1] == 0).all()
    assert "does not have its declared shape (256, 256)" in caplog.text


def test_the_user_is_told_where_a_spooled_run_went(tmp_path, caplog):
    def failing_writer(name, doc):  # the catalog refuses the first event
        if name == "event_page":
            raise ConnectionError("catalog unreachable")

    writer = SpooledWriter(lambda: failing_writer, tmp_path / "raw")
    uid = "0123abcd-0000-0000-0000-000000000000"
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    docs = [("start", {"uid": uid, "time": 0.0}),
            ("descriptor", {"uid": "d", "run_start": uid, "time": 0.1, "name": "primary",
                            "data_keys": {"img": {"source": "sim", "dtype": "array",
                                                  "shape": [3, 4]}}}),
            ("event", {"uid": "e", "descriptor": "d", "seq_num": 1, "time": 0.2,
                       "data": {"img": frame}, "timestamps": {"img": 0.2}}),
            ("stop", {"uid": "s", "run_start": uid, "time": 1.0, "exit_status": "success"})]
    with caplog.at_level(logging.WARNING, logger="bluesky_xrdml.spool"):
        for name, doc in docs:
            writer(name, doc)
    path = tmp_path / "raw" / "0123abcd.msgpack"
    assert writer.spooled == [(uid, path)]
    assert "0123abcd.msgpack" in caplog.text and "xrdml sync" in caplog.text
    assert "ConnectionError: catalog unreachable" in caplog.text
    # every document is in the file, the frame as an array of its own dtype
    back = list(spool.documents(path))
    assert [d["name"] for d in back] == ["start", "descriptor", "event_page", "stop"]
    (img,) = back[2]["doc"]["data"]["img"]
    assert img.dtype == np.uint16 and np.array_equal(img, frame)


def test_a_run_filed_without_trouble_leaves_no_spool_file(tmp_path):
    got = []
    writer = SpooledWriter(lambda: lambda name, doc: got.append(name), tmp_path)
    uid = "4567ef00-0000-0000-0000-000000000000"
    writer("start", {"uid": uid, "time": 0.0})
    assert list(tmp_path.glob("*")) == [tmp_path / "4567ef00.msgpack.open"]
    writer("stop", {"uid": "s", "run_start": uid, "time": 1.0, "exit_status": "success"})
    assert got == ["start", "stop"] and list(tmp_path.glob("*")) == []


def test_a_frame_with_too_many_peaks_is_not_centred_for_minutes(RE, beamline, collector):
    # a powder calibrant frame gives thousands of candidates; here the limit is lowered
    cb = attach(RE, collector, [BraggPeaks(method="centroid", max_peaks=3)])
    RE(bp.count([beamline.area], num=1))
    assert cb.wait(timeout=60)
    (error,) = collector.stream("errors")
    assert "more than max_peaks=3" in error["error"] and "calibrations" in error["error"]

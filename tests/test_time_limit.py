"""A frame whose analysis exceeds the time bound is cut off with a recorded error, and the
run says so (exit_status="fail"), rather than stalling the scan behind it."""

import time

import bluesky.plans as bp
import numpy as np
from event_model import compose_run

from bluesky_xrdml import layout
from bluesky_xrdml.callbacks import BraggPeaks, XRDMLCallback
from bluesky_xrdml.devices import ArraySignal


def spot_frame(shape=(48, 48)) -> np.ndarray:
    rng = np.random.default_rng(0)
    frame = rng.poisson(5.0, shape).astype(np.uint16)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    frame += (400 * np.exp(-((rr - 20.3) ** 2 + (cc - 25.6) ** 2) / 3.0)).astype(np.uint16)
    return frame


def test_a_frame_over_the_time_limit_is_cut_off_and_recorded(RE, collector):
    det = ArraySignal(name="spots", shape=(48, 48), dtype="<u2", value=spot_frame())
    # a limit no frame's peak finding can meet: each is cut off after it
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")], frame_time_limit=1e-7)
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.count([det], num=3))
    assert cb.wait(timeout=60)
    (start,) = collector.of("start")
    assert start["xrdml"]["config"]["frame_time_limit"] == 1e-7
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert "3 error(s)" in stop["reason"]
    errors = collector.stream("errors")
    assert [e["point"] for e in errors] == [1, 2, 3]
    # the first frame of a batch is cut after its peak finding; frames the worker handed
    # over with it are cut before theirs (the batch's budget is spent)
    assert "peak finding" in errors[0]["error"] and "calibrations" in errors[0]["error"]
    for e in errors:
        assert "exceeded 1e-07 s" in e["error"] and "frame_time_limit" in e["error"]
    assert collector.stream("frames") == []  # nothing was centred


def test_the_same_frames_within_the_limit_are_analysed(RE, collector):
    det = ArraySignal(name="spots", shape=(48, 48), dtype="<u2", value=spot_frame())
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")], frame_time_limit=60)
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.count([det], num=3))
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    assert [f["n_peaks"] for f in collector.stream("frames")] == [1, 1, 1]


class SlowSums:
    """A user's own analysis, which knows nothing of the budget: it is cut between the
    chunks of a batch."""

    name = "slow-sums"
    base_streams = ("sums",)
    config: dict = {}

    def match(self, key, data_key, descriptor):
        return {} if len(data_key.get("shape") or []) == 2 else None

    def streams(self, route, motors):
        return {route.stream("sums"): {"point": layout.integer(), "total": layout.number()}}

    def analyze(self, route, items):
        time.sleep(0.05 * len(items))
        rows = [{"point": it.point, "total": float(np.sum(it.value))} for it in items]
        return {route.stream("sums"): rows}, []

    def finish(self, route, geometry):
        return {}


def test_a_slow_batch_has_its_remaining_frames_recorded_not_analysed(collector):
    # 40 frames in one event page: one batch, handed to the analysis 16 at a time
    cb = XRDMLCallback(analyses=[SlowSums()], frame_time_limit=0.001)
    cb.subscribe(collector)
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": [48, 48], "dtype_numpy": "<u2"}
    desc = run.compose_descriptor(name="primary", data_keys={"spots": key})
    frame = spot_frame()
    page = desc.compose_event_page(data={"spots": [frame] * 40}, timestamps={"spots": [0.0] * 40},
                                   seq_num=list(range(1, 41)), time=[0.0] * 40, validate=False)
    for name, doc in [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("event_page", page), ("stop", run.compose_stop())]:
        cb(name, doc)
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    # the first chunk (0.8 s asleep) used the whole batch's budget (40 ms)
    assert [r["point"] for r in collector.stream("sums")] == list(range(1, 17))
    errors = collector.stream("errors")
    assert [e["point"] for e in errors] == list(range(17, 41))
    assert "exceeded 0.001 s per frame" in errors[0]["error"]
    assert "16 of the 40 frames" in errors[0]["error"]
    assert "24 error(s)" in stop["reason"] and "Analysed: 16 slow-sums" in stop["reason"]


def test_rings_sent_to_the_bragg_peak_analysis_are_refused_with_what_to_do(RE, collector):
    """The real CeO2 calibrant frame without its PONI: thousands of candidate peaks along
    the rings. Refused in about a second, not centred for minutes."""
    import fabio
    from conftest import shared_data

    frame = fabio.open(shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.tif")).data
    det = ArraySignal(name="pilatus_image", shape=frame.shape, dtype="<i4", value=frame)
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")])
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.count([det], num=1))
    assert cb.wait(timeout=120)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    (error,) = collector.stream("errors")
    assert "candidate peaks" in error["error"] and "powder rings" in error["error"]
    assert "calibrations={key: 'file.poni'}" in error["error"]

"""The callback on a real RunEngine with the simulated beamline."""

import re
import time

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
from event_model import compose_run
from ophyd.sim import det, motor

from bluesky_xrdml import layout
from bluesky_xrdml.callbacks import BraggPeaks, XRDMLCallback
from bluesky_xrdml.plans import xrd_map, xrdct


def attach(RE, collector, **kwargs):
    cb = XRDMLCallback(**kwargs)
    cb.subscribe(collector)
    RE.subscribe(cb)
    return cb


def test_map_scan_gives_an_analysis_run_linked_to_the_raw_run(RE, beamline, collector):
    cb = attach(RE, collector)
    (raw_uid,) = RE(xrd_map([beamline.powder], beamline.x, -0.9, 0.9, 10,
                            beamline.y, -0.9, 0.9, 8))
    assert cb.wait(timeout=60)
    (start,) = collector.of("start")
    assert start["plan_name"] == layout.PLAN_NAME
    assert start["xrdml"]["raw_uid"] == raw_uid
    assert start["xrdml"]["routes"] == {"powder_pattern": ["roi", "pqnet"]}
    assert start["xrdml"]["version"]
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    assert stop["num_events"]["patterns"] == 80
    assert stop["num_events"]["maps"] == 1
    # per-pattern rows carry the motor positions of their point
    rows = collector.stream("patterns")
    assert [r["point"] for r in rows] == list(range(1, 81))
    assert rows[0]["x"] == pytest.approx(-0.9) and rows[0]["y"] == pytest.approx(-0.9)


def test_roi_maps_follow_the_phantom(RE, beamline, collector):
    cb = attach(RE, collector)
    n = 16
    RE(xrd_map([beamline.powder], beamline.x, -0.95, 0.95, n, beamline.y, -0.95, 0.95, n))
    cb.wait(timeout=60)
    (maps,) = collector.stream("maps")
    ph = beamline.powder.phantom
    xs, ys = np.asarray(maps["x"]), np.asarray(maps["y"])
    assert xs.shape == (n,) and ys.shape == (n,)
    for j, name in enumerate(ph.names):
        truth = np.array([[ph.at(x, y)[j] for x in xs] for y in ys])
        # the ROI map (e.g. Ni_111) and PQ-Net's scale map of the same phase
        (roi,) = [k for k in maps if re.fullmatch(rf"{name}_\d+", k)]
        for key in (roi, f"{name}_scale"):
            measured = np.asarray(maps[key], float)
            assert measured.shape == (n, n)  # (y, x): outer motor first
            ok = np.isfinite(measured)
            r = np.corrcoef(measured[ok], truth[ok])[0, 1]
            assert r > 0.9, (key, r)


def test_peaks_match_the_true_spot_centres(RE, beamline, collector):
    cb = attach(RE, collector)
    RE(bp.scan([beamline.area], beamline.rot, 0.0, 4.0, 5))
    cb.wait(timeout=60)
    peaks = collector.stream("peaks")
    assert {p["frame"] for p in peaks} == {1, 2, 3, 4, 5}
    errors = []
    for i, truth in enumerate(beamline.area.truth, start=1):
        iso = truth[truth["isolated"] & (truth["height"] > 500)]
        found = np.array([(p["row"], p["col"]) for p in peaks if p["frame"] == i])
        for r, c in zip(iso["row"], iso["col"]):
            errors.append(np.min(np.hypot(found[:, 0] - r, found[:, 1] - c)))
    assert len(errors) >= 10
    assert max(errors) < 1.0
    frames = collector.stream("frames")
    assert [f["n_peaks"] for f in frames] == [
        sum(p["frame"] == i for p in peaks) for i in range(1, 6)]


def test_bad_frames_are_recorded_and_the_scan_completes(RE, beamline, collector):
    cb = attach(RE, collector)
    good = beamline.area.simulator.frame(0.0)
    nan_frame = good.astype(float)
    nan_frame[10:20, 10:20] = np.nan
    beamline.area.inject = [good, nan_frame, np.ones((4, 4), np.uint16), good]
    (raw_uid,) = RE(bp.count([beamline.area], num=4))
    cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert "2 error(s)" in stop["reason"] and "NaN" in stop["reason"]
    errors = collector.stream("errors")
    assert [(e["point"], e["detector"]) for e in errors] == [(2, "area_image"), (3, "area_image")]
    assert "shape (4, 4)" in errors[1]["error"]
    assert {f["frame"] for f in collector.stream("frames")} == {1, 4}


def test_a_missing_data_key_is_recorded(collector):
    cb = XRDMLCallback()
    cb.subscribe(collector)
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": [64, 64], "dtype_numpy": "<u2"}
    desc = run.compose_descriptor(name="primary", data_keys={"img": key, "m": {
        "source": "sim", "dtype": "number", "shape": []}})
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
            ("event", desc.compose_event(data={"m": 1.0}, timestamps={"m": 0.0},
                                         validate=False)),
            ("stop", run.compose_stop())]
    for name, doc in docs:
        cb(name, doc)
    cb.wait(timeout=30)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert "no data for 'img'" in stop["reason"]


class SlowPeaks(BraggPeaks):
    def analyze(self, route, items):
        time.sleep(0.05 * len(items))
        return super().analyze(route, items)


def test_a_full_queue_makes_the_scan_wait_and_loses_nothing(RE, beamline, collector):
    cb = attach(RE, collector, analyses=[SlowPeaks()], queue_size=2, batch_size=4)
    RE(bp.count([beamline.area], num=20))
    cb.wait(timeout=60)
    assert cb.stats.stalls > 0
    assert cb.stats.max_batch > 1  # the worker batched what piled up
    assert [f["frame"] for f in collector.stream("frames")] == list(range(1, 21))


def test_a_failing_sink_does_not_stop_the_scan_or_other_sinks(RE, beamline, collector):
    cb = attach(RE, collector)

    def broken(name, doc):
        raise ConnectionError("catalog down")

    cb.subscribe(broken)
    (uid,) = RE(bp.count([beamline.area], num=2))
    cb.wait(timeout=30)
    assert cb.sink_failures > 0  # counted on the sink's own thread
    assert collector.of("stop")[0]["exit_status"] == "success"


def test_non_diffraction_runs_have_nothing_to_analyse(RE, collector):
    cb = attach(RE, collector)
    RE(bp.scan([det], motor, -1, 1, 5))
    cb.wait(timeout=30)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success"
    assert stop["reason"].startswith("nothing to analyse")
    assert "det" in stop["reason"]
    assert not collector.of("event_page")


def test_xrdct_reconstructs_phase_images(RE, beamline, collector):
    cb = attach(RE, collector)
    beamline.powder.mode.put("tomo")
    n_t, n_angles = 21, 24
    RE(xrdct([beamline.powder], beamline.x, -0.95, 0.95, n_t, beamline.rot, n_angles))
    cb.wait(timeout=120)
    (sino,) = collector.stream("sinograms")
    (maps,) = collector.stream("maps")
    assert np.asarray(sino["Ni_111"]).shape == (n_angles, n_t)
    ph = beamline.powder.phantom
    rows, cols = np.asarray(maps["row"]), np.asarray(maps["col"])
    for j, name in enumerate(ph.names):
        (key,) = [k for k in maps if re.fullmatch(rf"{name}_\d+", k)]  # the ROI image
        image = np.asarray(maps[key])
        assert image.shape == (n_t, n_t)
        # image rows run along y, columns along x (skimage's radon/iradon convention)
        truth = np.array([[ph.at(x, y)[j] for x in cols] for y in rows])
        r = np.corrcoef(image.ravel(), truth.ravel())[0, 1]
        assert r > 0.7, (name, r)


def test_external_hdf5_frames_arrive_through_stream_datum(tmp_path, beamline, collector):
    cb = XRDMLCallback()
    cb.subscribe(collector)
    frames = np.stack([beamline.area.simulator.frame(w) for w in (0.5, 1.0, 1.5)])
    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f["/entry/data/data"] = frames
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": list(frames.shape[1:]),
           "dtype_numpy": "<u2", "external": "STREAM:"}
    desc = run.compose_descriptor(name="primary", data_keys={"det_image": key})
    res = run.compose_stream_resource(
        mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key="det_image",
        parameters={"dataset": "/entry/data/data"})
    datum = res.compose_stream_datum(indices={"start": 0, "stop": 3},
                                     seq_nums={"start": 1, "stop": 4},
                                     descriptor=desc.descriptor_doc)
    for name, doc in [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
                      ("stream_resource", res.stream_resource_doc), ("stream_datum", datum),
                      ("stop", run.compose_stop())]:
        cb(name, doc)
    cb.wait(timeout=30)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    assert [f["frame"] for f in collector.stream("frames")] == [1, 2, 3]
    assert len(collector.stream("peaks")) > 10

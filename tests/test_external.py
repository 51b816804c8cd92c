"""Frames in files: resource/datum (AreaDetector HDF5/TIFF, ophyd's NPY_SEQ) and
stream_resource/stream_datum, read on the worker; anything unreadable is recorded."""

import bluesky.plans as bp
import numpy as np
import pytest
import tifffile
from bluesky import RunEngine
from event_model import compose_resource, compose_run
from ophyd.sim import SynSignalWithRegistry

from bluesky_xrdml.callbacks import BraggPeaks, XRDMLCallback
from bluesky_xrdml.devices.files import HDF5AreaDetector
from bluesky_xrdml.external import ExternalDataError, ExternalReader


def attach(RE, collector, **kwargs):
    kwargs.setdefault("analyses", [BraggPeaks(method="centroid")])
    cb = XRDMLCallback(**kwargs)
    cb.subscribe(collector)
    RE.subscribe(cb)
    return cb


@pytest.mark.parametrize("spec", ["AD_HDF5", "AD_HDF5_SWMR"])
def test_an_area_detector_writing_hdf5_is_analysed_like_inline_frames(
        RE, beamline, collector, tmp_path, spec):
    det = HDF5AreaDetector(name="area", rotation=beamline.rot, seed=3, directory=tmp_path,
                           spec=spec)
    raw = []
    RE.subscribe(lambda name, doc: raw.append((name, doc)))
    cb = attach(RE, collector)
    RE(bp.scan([det], beamline.rot, 0.0, 3.0, 6))
    assert cb.wait(timeout=60)
    # the raw run is what an AreaDetector emits: one resource, a datum per frame
    assert [d["spec"] for n, d in raw if n == "resource"] == [spec]
    assert sum(n == "datum" for n, _ in raw) == 6
    (desc,) = [d for n, d in raw if n == "descriptor"]
    assert desc["data_keys"]["area_image"]["external"] == "FILESTORE:"
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    frames = collector.stream("frames")
    assert [f["frame"] for f in frames] == [1, 2, 3, 4, 5, 6]

    # the same frames inline (same simulator, same seed) give the same peak counts
    inline = []
    cb2 = XRDMLCallback(analyses=[BraggPeaks(method="centroid")])
    cb2.subscribe(lambda n, d: inline.append((n, d)))
    RE2 = RunEngine({})
    RE2.subscribe(cb2)
    RE2(bp.scan([beamline.area], beamline.rot, 0.0, 3.0, 6))
    assert cb2.wait(timeout=60)
    (uid,) = [d["uid"] for n, d in inline if n == "descriptor" and d["name"] == "frames"]
    n_inline = [k for n, p in inline if n == "event_page" and p["descriptor"] == uid
                for k in p["data"]["n_peaks"]]
    assert [f["n_peaks"] for f in frames] == n_inline
    assert min(n_inline) > 5


def test_ophyd_sim_npy_seq_frames_are_read(RE, beamline, collector, tmp_path):
    frame = beamline.area.simulator.frame(0.0)
    img = SynSignalWithRegistry(name="img", func=lambda: frame, save_path=str(tmp_path))
    cb = attach(RE, collector)
    RE(bp.count([img], num=3))
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    frames = collector.stream("frames")
    assert [f["frame"] for f in frames] == [1, 2, 3]
    assert frames[0]["n_peaks"] > 5


def _filestore_run(resource_kwargs, spec, root, resource_path, n, shape=(64, 64)):
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": list(shape), "dtype_numpy": "<u2",
           "external": "FILESTORE:"}
    desc = run.compose_descriptor(name="primary", data_keys={"det_image": key})
    res = compose_resource(spec=spec, root=str(root), resource_path=resource_path,
                           resource_kwargs=resource_kwargs, start=run.start_doc)
    datums = [res.compose_datum(datum_kwargs={"point_number": i}) for i in range(n)]
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
            ("resource", res.resource_doc)]
    for i, d in enumerate(datums):
        docs.append(("datum", d))
        docs.append(("event", desc.compose_event(
            data={"det_image": d["datum_id"]}, timestamps={"det_image": 0.0},
            seq_num=i + 1, validate=False)))
    docs.append(("stop", run.compose_stop()))
    return docs


def feed(cb, docs):
    for name, doc in docs:
        cb(name, doc)
    assert cb.wait(timeout=60)


def test_ad_tiff_frames_are_read(beamline, collector, tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"scan_{i:06d}.tiff",
                         beamline.area.simulator.frame(0.5 * i))
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")])
    cb.subscribe(collector)
    feed(cb, _filestore_run({"template": "%s%s_%6.6d.tiff", "filename": "scan",
                             "frame_per_point": 1}, "AD_TIFF", tmp_path, "", 3,
                            shape=beamline.area.simulator.shape))
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    assert [f["frame"] for f in collector.stream("frames")] == [1, 2, 3]


def test_a_missing_file_is_recorded_per_frame_and_the_run_fails(collector, tmp_path):
    cb = XRDMLCallback(analyses=["bragg-peaks"], external_timeout=0.3)
    cb.subscribe(collector)
    feed(cb, _filestore_run({"frame_per_point": 1}, "AD_HDF5", tmp_path, "gone.h5", 4))
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert "4 error(s)" in stop["reason"] and "gone.h5" in stop["reason"]
    errors = collector.stream("errors")
    assert [e["point"] for e in errors] == [1, 2, 3, 4]
    assert "root_map" in errors[0]["error"]
    assert not collector.stream("frames")


def test_an_unknown_spec_is_recorded_and_a_user_handler_fills_it(collector, tmp_path):
    docs = _filestore_run({}, "MY_DETECTOR", tmp_path, "x.bin", 2)
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")])
    cb.subscribe(collector)
    feed(cb, docs)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert "no handler for spec 'MY_DETECTOR'" in stop["reason"]
    assert "handler_registry" in stop["reason"]

    class MyHandler:
        def __init__(self, path):
            self.path = path

        def __call__(self, point_number):
            r, c = np.mgrid[:64, :64]
            spot = 3000 * np.exp(-((r - 20 - point_number) ** 2 + (c - 30) ** 2) / 4.0)
            noise = np.random.default_rng(point_number).poisson(10, (64, 64))
            return (spot + noise).astype(np.uint16)

    collector.clear()
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")],
                       handler_registry={"MY_DETECTOR": MyHandler})
    cb.subscribe(collector)
    feed(cb, docs)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    peaks = collector.stream("peaks")
    assert [round(p["row"]) for p in peaks] == [20, 21]


def test_stream_resource_of_unknown_mimetype_is_recorded(collector, tmp_path):
    run = compose_run()
    key = {"source": "sim", "dtype": "array", "shape": [64, 64], "dtype_numpy": "<u2",
           "external": "STREAM:"}
    desc = run.compose_descriptor(name="primary", data_keys={"det_image": key})
    res = run.compose_stream_resource(mimetype="application/x-weird", uri=f"file://{tmp_path}/a",
                                      data_key="det_image", parameters={})
    datum = res.compose_stream_datum(indices={"start": 0, "stop": 2},
                                     seq_nums={"start": 1, "stop": 3},
                                     descriptor=desc.descriptor_doc)
    cb = XRDMLCallback(analyses=[BraggPeaks(method="centroid")])
    cb.subscribe(collector)
    feed(cb, [("start", run.start_doc), ("descriptor", desc.descriptor_doc),
              ("stream_resource", res.stream_resource_doc), ("stream_datum", datum),
              ("stop", run.compose_stop())])
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "fail"
    assert [e["point"] for e in collector.stream("errors")] == [1, 2]
    assert "register_mimetype" in stop["reason"]


def test_the_reader_waits_for_a_frame_still_being_written(tmp_path):
    import threading

    import h5py

    path = tmp_path / "growing.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("/entry/data/data", data=np.ones((1, 8, 8), np.uint16),
                         maxshape=(None, 8, 8), chunks=(1, 8, 8))
    reader = ExternalReader(timeout=5.0)
    reader.consume("resource", {"uid": "r", "spec": "AD_HDF5", "root": str(tmp_path),
                                "resource_path": "growing.h5", "resource_kwargs": {}})
    for i in range(2):
        reader.consume("datum", {"datum_id": f"r/{i}", "resource": "r",
                                 "datum_kwargs": {"point_number": i}})
    assert reader.fill("r/0").shape == (8, 8)

    def append():
        with h5py.File(path, "a") as f:
            ds = f["/entry/data/data"]
            ds.resize(2, axis=0)
            ds[1] = 7

    timer = threading.Timer(0.4, append)
    timer.start()
    try:
        assert reader.fill("r/1")[0, 0] == 7
    finally:
        timer.join()
    with pytest.raises(ExternalDataError, match="unknown datum"):
        reader.fill("r/9")


@pytest.mark.parametrize("engine", [True, False])
def test_an_archived_run_of_file_frames_replays(tmp_path, beamline, engine):
    """Frames in HDF5 files, registered in Tiled by the raw writer, come back for a replay
    (RunEngine) and for bulk reprocessing (documents) and are analysed again."""
    from bluesky_xrdml import catalog
    from bluesky_xrdml.reprocess import reprocess

    RE = RunEngine({})
    det = HDF5AreaDetector(name="area", rotation=beamline.rot, seed=3,
                           directory=tmp_path / "frames")
    with catalog.embedded(tmp_path) as (_, client):  # the server may read tmp_path
        raw = catalog.raw_writer(client)
        RE.subscribe(raw)
        (uid,) = RE(bp.scan([det], beamline.rot, 0.0, 2.0, 3))
        assert raw.join(timeout=60)
        frames = np.asarray(client[uid]["primary"]["area_image"].read())
        assert frames.reshape(3, 256, 256).max() > 1000
        summary = reprocess(client, uid, analyses=[BraggPeaks(method="centroid")],
                            engine=engine, spool=tmp_path / "spool")
    assert summary["exit_status"] == "success", summary["reason"]
    assert summary["analysed"] == {"bragg-peaks": 3}


def test_an_ophyd_async_style_detector_writing_hdf5_is_analysed(RE, beamline, collector,
                                                                tmp_path):
    from bluesky_xrdml.devices.files import StreamHDF5Detector

    sim = beamline.area.simulator
    angles = iter([0.0, 0.5, 1.0, 1.5])
    det = StreamHDF5Detector("sdet", lambda: sim.frame(next(angles)), sim.shape, tmp_path)
    raw = []
    RE.subscribe(lambda name, doc: raw.append(name))
    cb = attach(RE, collector)
    RE(bp.count([det], num=4))
    assert cb.wait(timeout=60)
    assert raw.count("stream_resource") == 1 and raw.count("stream_datum") == 4
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    frames = collector.stream("frames")
    assert [f["frame"] for f in frames] == [1, 2, 3, 4]
    assert min(f["n_peaks"] for f in frames) > 5

"""Analysis in another process: RunEngine + Publisher here, bluesky's 0MQ proxy and
``xrdml worker`` as real subprocesses on 127.0.0.1, results in the embedded catalog."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import bluesky.plans as bp
import numpy as np
import pytest
import zmq
from bluesky import RunEngine
from conftest import _free_port
from typer.testing import CliRunner

from bluesky_xrdml import catalog, remote
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.cli import app
from bluesky_xrdml.cluster import reprocess_many
from bluesky_xrdml.devices import sim_beamline
from bluesky_xrdml.plans import xrd_map

SETTLE = 1.5  # s for a fresh 0MQ subscription to reach the proxy (slow joiner)
ACQ = "/xrdml-acquisition-host/data"  # where detector files are on the acquisition side


class Services:
    """bluesky's proxy and one ``xrdml worker`` at a time, each a real subprocess."""

    def __init__(self, tmp: Path, uri: str, api_key: str):
        self.tmp, self.uri, self.api_key = tmp, uri, api_key
        self.shared = tmp / "shared"  # ACQ as mounted on the worker's machine
        self.shared.mkdir()
        self.port_in, self.port_out = _free_port(), _free_port()
        self.proxy_command = proxy_command(self.port_in, self.port_out)
        self.start_proxy()
        self.worker, self.logs = None, []

    def start_proxy(self):
        self.proxy = subprocess.Popen(self.proxy_command, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)

    def start_worker(self):
        log = self.tmp / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TILED_API_KEY": self.api_key}
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "bluesky_xrdml.cli", "worker", "--zmq",
             f"127.0.0.1:{self.port_out}", "--catalog", self.uri, "--report-every", "5",
             "--root-map", f"{ACQ}={self.shared}"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        self.wait_log("listening on", timeout=180)
        time.sleep(SETTLE)

    def stop_worker(self, sig=signal.SIGTERM) -> int:
        self.worker.send_signal(sig)
        return self.worker.wait(timeout=120)

    def log(self, i=-1) -> str:
        return self.logs[i].read_text()

    def wait_log(self, text, timeout=120.0, count=1):
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.worker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker log lacks {text!r}:\n{self.log()}")
            time.sleep(0.2)

    def close(self):
        for proc in (self.worker, self.proxy):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiled_client):
    s = Services(tmp_path_factory.mktemp("remote"), tiled_client.uri,
                 tiled_client.context.api_key)
    try:
        s.start_worker()
        yield s
    finally:
        s.close()


@pytest.fixture
def RE_pub(services):
    pub = remote.publisher(f"127.0.0.1:{services.port_in}")
    RE = RunEngine({})
    time.sleep(SETTLE)
    yield RE, pub
    pub.close()


def worker_analysis(client, uid, timeout=120.0):
    """The worker's analysis run of raw run ``uid`` once its stop is filed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in catalog.analyses(client, uid):
            start = run.metadata["start"]
            if start["xrdml"]["config"].get("source", "").startswith("0MQ") and \
                    run.metadata.get("stop"):
                return run
        time.sleep(0.5)
    pytest.fail(f"the worker filed no analysis run of {uid}")


def test_wire_format_round_trips_arrays_and_never_unpickles():
    doc = {"data": {"frame": np.arange(12, dtype="<u2").reshape(3, 4), "x": np.float32(1.5)},
           "seq_num": [1, 2], "nested": {"a": [np.int64(3)]}}
    back = remote.unpack(remote.pack(doc))
    np.testing.assert_array_equal(back["data"]["frame"], doc["data"]["frame"])
    assert back["data"]["frame"].dtype == np.dtype("<u2")
    assert back["data"]["x"] == 1.5 and back["nested"]["a"] == [3]
    with pytest.raises(remote.DecodeError):
        remote.unpack(pickle.dumps({"a": 1}))
    with pytest.raises(TypeError):
        remote.pack({"a": np.array([object()])})
    # 0-d and non-contiguous arrays keep their shape and values
    odd = {"scalar": np.array(2.5), "strided": np.arange(12.0).reshape(3, 4)[:, ::2]}
    back = remote.unpack(remote.pack(odd))
    assert back["scalar"].shape == () and back["scalar"] == 2.5
    np.testing.assert_array_equal(back["strided"], odd["strided"])
    # the publisher's fast path frames the same bytes as bluesky's Publisher would
    pub = remote.publisher(f"127.0.0.1:{_free_port()}", prefix=b"xrd")
    try:
        assert pub.message("event", doc) == b"xrd event " + remote.pack(doc)
    finally:
        pub.close()


def proxy_command(port_in: int, port_out: int) -> list[str]:
    proxy = shutil.which("bluesky-0MQ-proxy", path=str(Path(sys.executable).parent))
    return [proxy, "--in-address", f"127.0.0.1:{port_in}",
            "--out-address", f"127.0.0.1:{port_out}"]


def test_the_publisher_batches_sends_and_delivers_every_document_in_order():
    """What a RunEngine emits arrives through bluesky's proxy whole and in order, in
    bluesky's framing, the stop document without delay; outside an event loop a
    document is sent at once."""
    from ophyd.sim import det

    port_in, port_out = _free_port(), _free_port()
    proxy = subprocess.Popen(proxy_command(port_in, port_out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port_out}")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub = remote.publisher(f"127.0.0.1:{port_in}", batch_interval=60.0)
    try:
        time.sleep(SETTLE)
        pub("start", {"uid": "outside-the-loop", "time": 0.0})
        assert sub.poll(30_000), "a document sent outside an event loop did not arrive"
        assert sub.recv().startswith(b" start ")
        emitted = []
        RE = RunEngine({})
        RE.subscribe(lambda name, doc: emitted.append((name, doc["uid"] if "uid" in doc
                                                       else doc.get("datum_id"))))
        RE.subscribe(pub)
        sent = []  # messages handed to 0MQ as each document passed the publisher
        RE.subscribe(lambda name, doc: sent.append(pub.sent))
        RE(bp.count([det], num=5))
        # batch_interval 60 s: held until the stop document sent the whole run
        assert sent == [1] * (len(emitted) - 1) + [1 + len(emitted)]
        received = []
        while len(received) < len(emitted) and sub.poll(30_000):
            prefix, name, body = sub.recv().split(b" ", 2)
            doc = remote.unpack(body)
            received.append((name.decode(), doc["uid"]))
        assert received == emitted and pub.sent == len(emitted) + 1
    finally:
        pub.close()
        sub.close()
        ctx.term()
        proxy.terminate()
        proxy.wait(timeout=60)


def test_tracker_passes_seen_runs_and_names_the_missed_ones(caplog):
    from ophyd.sim import det

    docs, passed = [], []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    missed, seen = RE(bp.count([det], num=3)), RE(bp.count([det], num=2))
    tracker = remote.RunTracker(lambda name, doc: passed.append((name, doc)),
                                " --catalog http://tiled")
    for name, doc in docs[1:]:  # the first run's start never arrives
        tracker(name, doc)
    assert {d.get("run_start", d.get("uid")) for n, d in passed if n in ("start", "stop")} \
        == {seen[0]}
    assert f"xrdml reprocess {missed[0]} --catalog http://tiled" in caplog.text
    assert list(tracker.missed_runs) == [missed[0]] and not tracker.open
    # a run still open when the worker stops is closed as interrupted
    tracker(*docs[0])
    tracker.interrupt("the xrdml worker was stopped (SIGTERM)")
    name, stop = passed[-1]
    assert name == "stop" and stop["run_start"] == missed[0]
    assert stop["exit_status"] == "abort" and stop["reason"].startswith("interrupted: ")


def test_worker_files_the_same_analysis_as_in_process(services, RE_pub, tiled_client):
    RE, pub = RE_pub
    client, beamline = tiled_client, sim_beamline(seed=3)
    raw = catalog.raw_writer(client)
    cb = XRDMLCallback()
    cb.subscribe(catalog.analysis_writer(client))
    for sub in (raw, cb, pub):
        RE.subscribe(sub)
    (uid,) = RE(xrd_map([beamline.powder, beamline.area], beamline.x, -0.6, 0.6, 4,
                        beamline.y, -0.4, 0.4, 3))
    cb.wait(timeout=120)
    raw.join(timeout=120)
    assert_same_analysis(client, uid, streams=("peaks", "patterns"), maps=True)


def assert_same_analysis(client, uid, streams, maps=False):
    """The worker's analysis run of ``uid`` equals the one filed in this process."""
    remote_run = worker_analysis(client, uid)
    local_run = next(r for r in catalog.analyses(client, uid)
                     if "source" not in r.metadata["start"]["xrdml"]["config"])
    stop = remote_run.metadata["stop"]
    assert stop["exit_status"] == "success", stop["reason"]
    assert local_run.metadata["stop"]["exit_status"] == "success"
    assert stop["num_events"] == local_run.metadata["stop"]["num_events"]
    for stream in streams:
        a, b = catalog.table(local_run, stream), catalog.table(remote_run, stream)
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
        # BraggNN is float32 and batches differently in the two processes
        np.testing.assert_allclose(a.select_dtypes("number").to_numpy(float),
                                   b.select_dtypes("number").to_numpy(float),
                                   rtol=1e-6, atol=1e-3)
    if maps:
        local_maps, remote_maps = catalog.maps(local_run), catalog.maps(remote_run)
        assert set(local_maps.data_vars) == set(remote_maps.data_vars)
        for name in local_maps.data_vars:
            np.testing.assert_allclose(local_maps[name].values, remote_maps[name].values,
                                       rtol=1e-6, atol=1e-3, equal_nan=True)
    return remote_run


def scan_with_both(RE, pub, client, plan, rewrite=None, root_map=None):
    """Runs ``plan`` with the publisher and an in-process ``XRDMLCallback`` attached,
    both fed the documents through ``rewrite(name, doc)`` if given; returns the raw
    run's uid and the names of the documents that went out."""
    cb = XRDMLCallback(root_map=root_map)
    cb.subscribe(catalog.analysis_writer(client))
    names = []

    def both(name, doc):
        doc = rewrite(name, doc) if rewrite else doc
        names.append(name)
        cb(name, doc)
        pub(name, doc)

    RE.subscribe(both)
    (uid,) = RE(plan)
    assert cb.wait(timeout=120)
    return uid, names


def test_frames_in_hdf5_files_travel_as_datum_references(services, RE_pub, tiled_client,
                                                         tmp_path):
    """An AreaDetector-style detector (HDF5 file, resource + datum documents): only
    references cross 0MQ, and the worker reads the frames from the shared filesystem."""
    from bluesky_xrdml.devices import HDF5AreaDetector

    RE, pub = RE_pub
    beamline = sim_beamline(seed=7)
    det = HDF5AreaDetector(name="area", rotation=beamline.rot, seed=7,
                           directory=tmp_path / "frames")
    sent = []
    RE.subscribe(lambda name, doc: sent.append(len(remote.pack(doc))) if name == "event"
                 else None)
    uid, names = scan_with_both(RE, pub, tiled_client,
                                xrd_map([det], beamline.x, -0.6, 0.6, 3, beamline.y, -0.4,
                                        0.4, 2))
    assert names.count("resource") == 1 and names.count("datum") == 6
    assert max(sent) < 2000  # a datum id, not a 256x256 frame, in every event
    run = assert_same_analysis(tiled_client, uid, streams=("peaks", "frames"), maps=True)
    assert min(catalog.table(run, "frames")["n_peaks"]) > 5


def test_frames_in_hdf5_files_travel_as_stream_datum_references(services, RE_pub,
                                                                tiled_client):
    """An ophyd-async-style detector (stream_resource + stream_datum, no frame in the
    events) analysed by the worker from the file, as in this process. The detector's
    URI names the folder as the acquisition host sees it; the worker was started with
    ``--root-map ACQ=HERE`` for where that folder is mounted on its machine."""
    from bluesky_xrdml.devices.files import StreamHDF5Detector

    RE, pub = RE_pub
    sim = sim_beamline(seed=8).area.simulator
    angles = iter([0.0, 0.7, 1.4, 2.1])
    det = StreamHDF5Detector("sdet", lambda: sim.frame(next(angles)), sim.shape,
                             services.shared / "frames")

    def as_on_the_acquisition_host(name, doc):
        if name == "stream_resource":
            doc = {**doc, "uri": doc["uri"].replace(str(services.shared), ACQ)}
            assert doc["uri"].startswith(f"file://localhost{ACQ}/frames/")
        return doc

    uid, names = scan_with_both(RE, pub, tiled_client, bp.count([det], num=4),
                                rewrite=as_on_the_acquisition_host,
                                root_map={ACQ: str(services.shared)})
    assert names.count("stream_resource") == 1 and names.count("stream_datum") == 4
    run = assert_same_analysis(tiled_client, uid, streams=("peaks", "frames"))
    assert list(catalog.table(run, "frames")["frame"]) == [1, 2, 3, 4]


def test_a_root_map_to_a_missing_folder_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["worker", "--zmq", "127.0.0.1:1", "--catalog",
                                      "http://127.0.0.1:1/api", "--root-map",
                                      f"{ACQ}={tmp_path / 'not-mounted'}"])
    assert result.exit_code == 2
    assert "--root-map" in result.output and "where the acquisition side's folder" in \
        result.output


def test_malformed_messages_are_rejected_and_counted(services, RE_pub, tiled_client):
    before = services.log().count("rejected message")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.connect(f"tcp://127.0.0.1:{services.port_in}")
    time.sleep(SETTLE)
    for message in (b"no-spaces-here", b" event \xc1\xc1\xc1", b" bogus " + remote.pack({}),
                    b" start " + pickle.dumps({"uid": "x", "time": 0.0})):
        sock.send(message)
    sock.close()
    ctx.term()
    services.wait_log("rejected message", count=before + 4)
    log = services.log()
    assert "unknown document name 'bogus'" in log and "not msgpack" in log
    # and the worker still analyses the next run
    RE, pub = RE_pub
    RE.subscribe(pub)
    beamline = sim_beamline(seed=1)
    (uid,) = RE(bp.count([beamline.powder], num=3))
    assert worker_analysis(tiled_client, uid).metadata["stop"]["exit_status"] == "success"


def test_events_lost_on_the_way_are_recorded(services, RE_pub, tiled_client):
    RE, pub = RE_pub
    lost = {2, 4}
    RE.subscribe(lambda n, d: None if n == "event" and d["seq_num"] in lost else pub(n, d))
    beamline = sim_beamline(seed=2)
    (uid,) = RE(bp.count([beamline.powder], num=6))
    run = worker_analysis(tiled_client, uid)
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert "missed 2 of 6 events of stream 'primary' (seq_num 2, 4)" in stop["reason"]
    assert f"xrdml reprocess {uid}" in stop["reason"]
    errors = catalog.table(run, "errors")
    assert any("missed 2 of 6" in e for e in errors["error"])


def test_proxy_restart_mid_scan_is_recorded_not_fatal(services, RE_pub, tiled_client):
    RE, pub = RE_pub
    RE.subscribe(pub)

    def restart_proxy(name, doc):
        if name == "event" and doc["seq_num"] == 3:
            services.proxy.terminate()
            services.proxy.wait(timeout=60)
        if name == "event" and doc["seq_num"] == 5:
            services.start_proxy()
            time.sleep(3 * SETTLE)  # both ends reconnect by themselves

    RE.subscribe(restart_proxy)
    beamline = sim_beamline(seed=6)
    (uid,) = RE(bp.count([beamline.powder], num=10))
    run = worker_analysis(tiled_client, uid)
    stop = run.metadata["stop"]
    # 0MQ queues on the publisher's side while the proxy is away, so often nothing is
    # lost; what is lost (a subscription that came back late) must be accounted for
    if stop["exit_status"] == "success":
        assert len(catalog.table(run, "patterns")) == 10
    else:
        assert "events of stream 'primary'" in stop["reason"] and "missed" in stop["reason"]
        assert f"xrdml reprocess {uid}" in stop["reason"]


def test_worker_stopped_mid_scan_and_restarted(services, RE_pub, tiled_client):
    """SIGTERM mid-scan: the run in progress is closed as interrupted and the worker exits
    0; a worker started mid-scan logs the run it missed; `xrdml reprocess` fills it."""
    RE, pub = RE_pub
    client, beamline = tiled_client, sim_beamline(seed=4)
    raw = catalog.raw_writer(client)
    RE.subscribe(raw)
    RE.subscribe(pub)
    codes = []

    def orchestrate(name, doc):
        if name == "event" and doc["seq_num"] == 3:
            codes.append(services.stop_worker(signal.SIGTERM))
        if name == "event" and doc["seq_num"] == 5:
            services.start_worker()

    token = RE.subscribe(orchestrate)
    (uid,) = RE(bp.count([beamline.powder], num=10, delay=0.2))
    RE.unsubscribe(token)  # (the next scan has a seq_num 3 too)
    raw.join(timeout=120)
    assert codes == [0]
    first = services.log(-2)
    assert f"run {uid} interrupted" in first
    interrupted = worker_analysis(client, uid).metadata["stop"]
    assert "interrupted: the xrdml worker was stopped (SIGTERM)" in interrupted["reason"]
    services.wait_log(f"xrdml reprocess {uid}")  # the new worker missed this run's start
    # the new worker analyses the next scan in full
    (uid2,) = RE(bp.count([beamline.powder], num=4))
    stop = worker_analysis(client, uid2).metadata["stop"]
    assert stop["exit_status"] == "success" and "interrupted" not in stop.get("reason", "")
    assert stop["num_events"]["patterns"] == 4
    # and the command it logged analyses the missed run from the catalog
    result = CliRunner().invoke(app, ["reprocess", uid, "--catalog", client.uri],
                                env={"TILED_API_KEY": client.context.api_key})
    assert result.exit_code == 0, result.output
    assert "1 run(s) reprocessed, 0 with errors" in result.output
    complete = catalog.analyses(client, uid)[0].metadata["stop"]
    assert complete["exit_status"] == "success" and complete["num_events"]


def test_reprocess_on_a_local_dask_cluster(tiled_client):
    client, RE, beamline = tiled_client, RunEngine({}), sim_beamline(seed=5)
    raw = catalog.raw_writer(client)
    RE.subscribe(raw)
    uids = [RE(bp.count([beamline.powder], num=4))[0] for _ in range(4)]
    raw.join(timeout=120)
    done = []
    results = reprocess_many(uids + ["no-such-run"], client.uri, dask="local:2",
                             api_key=client.context.api_key, on_result=done.append)
    assert len(done) == 5
    assert [r["raw_uid"] for r in results] == uids + ["no-such-run"]
    for uid, r in zip(uids, results):
        assert r["exit_status"] == "success", r["reason"]
        assert r["model_loads"] == 1  # each Dask worker loaded the models once
        assert catalog.analyses(client, uid)[0].metadata["start"]["uid"] == r["analysis_uid"]
    assert results[-1]["exit_status"] == "fail"
    assert "not in the catalog" in results[-1]["reason"]

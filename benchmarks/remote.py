"""Analysis off the acquisition machine: what it costs the scan, and what it sustains.

1. RunEngine time of a 500-point scan (25x20 map of 2048-bin powder patterns) with the
   0MQ publisher attached vs nothing attached, alternating, median of ``--repeats``
   each (target: <= 3 % slowdown): once with only the proxy running, once with an
   ``xrdml worker`` analysing on the same cores (on a 2-core machine the woken proxy and
   worker preempt the RunEngine; at a beamline the worker runs on another machine).
   Wall times swing by tens of % on a loaded machine, so the process's CPU time and the
   CPU time the RunEngine's thread spent inside the publisher are printed too.
2. The worker's sustained events/s: a scan of ``--frames`` 256x256 area-detector frames
   published as fast as the RunEngine makes them; the worker's own log line for the run
   (first event received -> analysis run complete), and the same scan analysed in-process.
3. Reprocessing runs/minute with ``xrdml reprocess --dask local:1`` and ``local:2`` over
   ``--runs`` archived maps (cluster start-up excluded and printed apart), and the ratio.

    nice -n 10 .venv/bin/python benchmarks/remote.py [--repeats 5 --frames 200 --runs 6]
                                                     [--stages overhead,worker,reprocess]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bluesky.plans as bp
from bluesky import RunEngine

from bluesky_xrdml import catalog, remote
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.catalog import _free_port
from bluesky_xrdml.devices import sim_beamline
from bluesky_xrdml.plans import xrd_map


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def start_proxy():
    port_in, port_out = _free_port(), _free_port()
    proxy = subprocess.Popen([shutil.which("bluesky-0MQ-proxy",
                                           path=str(Path(sys.executable).parent)),
                              "--in-address", f"127.0.0.1:{port_in}",
                              "--out-address", f"127.0.0.1:{port_out}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proxy, port_in, port_out


def start_worker(tmp: Path, uri: str, port_out: int):
    log = tmp / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "bluesky_xrdml.cli", "worker", "--zmq",
                               f"127.0.0.1:{port_out}", "--catalog", uri],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    while "listening on" not in log.read_text():
        if worker.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.2)
    time.sleep(2)
    return worker, log


def scan_overhead(port_in: int, repeats: int, where: str) -> None:
    bl = sim_beamline(seed=0)
    inside = [0.0, 0.0]  # wall and CPU seconds the RunEngine's thread spent in the publisher

    def one(with_publisher: bool) -> tuple[float, float]:
        RE = RunEngine({})
        pub = remote.publisher(f"127.0.0.1:{port_in}") if with_publisher else None
        if pub:
            def timed(name, doc):
                t, c = time.perf_counter(), time.thread_time()
                pub(name, doc)
                inside[0] += time.perf_counter() - t
                inside[1] += time.thread_time() - c
            RE.subscribe(timed)
            time.sleep(1)
        t0, c0 = time.perf_counter(), time.process_time()
        RE(xrd_map([bl.powder], bl.x, -1, 1, 25, bl.y, -1, 1, 20))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if pub:
            pub.close()
        return dt, dc

    one(False)  # warm-up
    bare, published = [], []
    for _ in range(repeats):
        bare.append(one(False))
        published.append(one(True))
    (b, bc), (p, pc) = ([statistics.median(x) for x in zip(*runs)]
                        for runs in (bare, published))
    print(f"{where}: 500-point scan (2048-bin patterns), RunEngine wall time: nothing "
          f"attached {b:.2f} s, "
          f"publisher attached {p:.2f} s (medians of {repeats}): {100 * (p / b - 1):+.1f} %; "
          f"CPU time of the process {bc:.2f} s vs {pc:.2f} s: {100 * (pc / bc - 1):+.1f} %; "
          f"inside the publisher per scan: {inside[0] / repeats:.3f} s wall = "
          f"{100 * inside[0] / repeats / b:.1f} % of the bare scan's wall time, "
          f"{inside[1] / repeats:.3f} s CPU = {100 * inside[1] / repeats / bc:.1f} % of its "
          f"CPU time (target <= 3 %); {load()}", flush=True)


def worker_rate(port_in: int, log: Path, frames: int) -> None:
    bl = sim_beamline(seed=1)
    RE = RunEngine({})
    pub = remote.publisher(f"127.0.0.1:{port_in}")
    RE.subscribe(pub)
    time.sleep(1)
    t0 = time.perf_counter()
    (uid,) = RE(bp.count([bl.area], num=frames))
    t_scan = time.perf_counter() - t0
    pattern = re.compile(rf"raw run {uid} -> analysis run \S+ (\w+): (\d+) events analysed in "
                         rf"([\d.]+) s \(([\d.]+) events/s\)")
    while not (m := pattern.search(log.read_text())):
        time.sleep(0.5)
    print(f"worker: {frames} frames of 256x256 published at {frames / t_scan:.1f} frames/s; "
          f"worker {m.group(1)}: {m.group(2)} events analysed at {m.group(4)} events/s "
          f"(first event received -> analysis run complete); {load()}", flush=True)
    pub.close()
    # the same scan analysed in this process, for comparison on the same (loaded) machine
    RE, cb = RunEngine({}), XRDMLCallback()
    RE.subscribe(cb)
    t0 = time.perf_counter()
    RE(bp.count([bl.area], num=frames))
    cb.worker.join()
    rate = frames / (time.perf_counter() - t0)
    print(f"in-process (RunEngine + XRDMLCallback, no catalog): {rate:.1f} events/s; the worker "
          f"sustains {float(m.group(4)) / rate:.2f}x that; {load()}", flush=True)


def reprocessing(client, uri: str, runs: int) -> None:
    from bluesky_xrdml.cluster import reprocess_many

    bl, RE = sim_beamline(seed=2), RunEngine({})
    raw = catalog.raw_writer(client)
    RE.subscribe(raw)
    uids = [RE(xrd_map([bl.powder, bl.area], bl.x, -0.6, 0.6, 4, bl.y, -0.4, 0.4, 3))[0]
            for _ in range(runs)]
    raw.join()
    rates = {}
    for n in (1, 2):
        t0 = time.perf_counter()
        finished: list[float] = []
        results = reprocess_many(uids[:1], uri, dask=f"local:{n}")  # start-up + one run
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = reprocess_many(uids, uri, dask=f"local:{n}",
                                 on_result=lambda r, f=finished: f.append(time.perf_counter()))
        total = time.perf_counter() - t0
        failed = [r for r in results if r["exit_status"] != "success"]
        assert not failed, failed
        # runs/minute after the first round (n runs at once) to the last run: cluster
        # start-up and model loading excluded
        span = finished[-1] - finished[n - 1]
        rates[n] = 60 * (runs - n) / span
        print(f"reprocess --dask local:{n}: {runs} runs (12-point maps, frames + patterns) "
              f"in {total:.1f} s with start-up; {rates[n]:.1f} runs/minute once running "
              f"(start-up + 1 run alone: {t_start:.1f} s); {load()}", flush=True)
    print(f"scaling 1 -> 2 Dask workers: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} "
          f"cores; {load()}")


def main(repeats: int, frames: int, runs: int, stages: str = "overhead,worker,reprocess"):
    from tiled.client import from_uri

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("XRDML_SPOOL", f"{tmp}/spool")
        server = catalog.EmbeddedServer(tmp)
        server.start(timeout=600)  # a loaded machine can take minutes
        try:
            client = from_uri(server.uri)
            proxy, port_in, port_out = start_proxy()
            worker = None
            try:
                if "overhead" in stages:  # the proxy only: nothing else on these 2 cores
                    scan_overhead(port_in, repeats, "proxy, no worker")
                worker, log = start_worker(Path(tmp), server.uri, port_out)
                if "overhead" in stages:  # the worker analyses on the same cores
                    scan_overhead(port_in, repeats, "proxy + worker on this machine")
                if "worker" in stages:
                    worker_rate(port_in, log, frames)
            finally:
                for proc in (worker, proxy):
                    if proc is not None:
                        proc.terminate()
                        proc.wait()
            if "reprocess" in stages:
                reprocessing(client, server.uri, runs)
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--stages", default="overhead,worker,reprocess",
                        help="which of overhead, worker, reprocess to run")
    args = parser.parse_args()
    main(args.repeats, args.frames, args.runs, args.stages)

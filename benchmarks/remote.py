"""Analysis off the acquisition machine: what it costs the scan, and what it sustains.

1. ``overhead``: RunEngine time of a 500-point scan (25x20 map of 2048-bin powder
   patterns) with nothing attached, with the 0MQ publisher (batched sends, the default)
   and with ``batch_interval=0`` (a send per document, as bluesky's own Publisher),
   through a running ``bluesky-0MQ-proxy``; ``--repeats`` rounds, arms in alternating
   order, each trial a fresh RunEngine after the same pause and ``gc.collect()``
   (target: <= 3 % wall slowdown). Wall times swing on a loaded machine, so it also
   prints the slowdown round by round (median and quartiles), the wall time less the
   RunEngine thread's waits for a CPU (what other processes' load adds), the CPU time of the
   RunEngine's thread (from the scheduler's counters) and of the process, the CPU time
   the RunEngine's thread spent inside the publisher, the proxy's CPU time and the load
   average. ``overhead-with-worker``: the same with an ``xrdml worker`` analysing on the
   same cores (on a 2-core machine the woken proxy and worker preempt the RunEngine; at
   a beamline the worker runs on another machine).
2. ``worker``: the worker's sustained events/s: a scan of ``--frames`` 256x256
   area-detector frames published as fast as the RunEngine makes them; the worker's own
   log line for the run (first event received -> analysis run complete), and the same
   scan analysed in-process.
3. ``reprocess``: runs/minute with ``xrdml reprocess --dask local:1`` and ``local:2`` over
   ``--runs`` archived maps (cluster start-up excluded and printed apart), and the ratio.

    nice -n 10 .venv/bin/python benchmarks/remote.py [--repeats 10 --frames 200 --runs 6]
        [--stages overhead,overhead-with-worker,worker,reprocess]
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


def _cpu_seconds(pid: int | str = "self", tid: int | None = None,
                 field: int = 0) -> float | None:
    """CPU time of one thread (``tid``) or of all threads of a process, in seconds, from
    the scheduler's nanosecond counters (Linux; ``field=1``: time spent runnable but
    waiting for a CPU); None where there are none."""
    tasks = [tid] if tid is not None else os.listdir(f"/proc/{pid}/task")
    try:
        return sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[field])
                   for t in tasks) / 1e9
    except (OSError, ValueError):
        return None


class TimedPublisher(remote.MsgpackPublisher):
    """The publisher, with the CPU time the calling thread spends in it (packing in
    ``__call__``, sending in ``flush``) added up in ``inside``."""

    inside = 0.0

    def __call__(self, name, doc):
        c = time.thread_time()
        super().__call__(name, doc)
        self.inside += time.thread_time() - c

    def flush(self):
        c = time.thread_time()
        super().flush()
        self.inside += time.thread_time() - c


def scan_overhead(port_in: int, proxy_pid: int, repeats: int, where: str) -> None:
    """RunEngine time of the same 500-point scan with nothing attached, with the publisher
    (default: batched sends) and with ``batch_interval=0`` (one send per document, as
    bluesky's Publisher does). Every trial gets a fresh RunEngine, the same 1 s pause
    before it (0MQ connects in the background) and a ``gc.collect()``; the arms are run
    in turn, in alternating order, and compared round by round."""
    import gc

    bl = sim_beamline(seed=0)
    address = f"127.0.0.1:{port_in}"
    arms = {"nothing attached": None,
            "a no-op callback": lambda: (lambda name, doc: None),  # the RunEngine's share
            "publisher": lambda: remote.publisher(address),
            "publisher, batch_interval=0": lambda: remote.publisher(address,
                                                                     batch_interval=0)}

    def one(make) -> dict:
        RE = RunEngine({})
        pub = make() if make else None
        if pub:
            RE.subscribe(pub)
        time.sleep(1)
        gc.collect()
        tid = RE._th.native_id  # the RunEngine's event-loop thread: plans and callbacks
        t0, c0 = time.perf_counter(), time.process_time()
        r0, x0 = _cpu_seconds(tid=tid), _cpu_seconds(proxy_pid)
        w0 = _cpu_seconds(tid=tid, field=1)
        (uid,) = RE(xrd_map([bl.powder], bl.x, -1, 1, 25, bl.y, -1, 1, 20))
        out = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
        r1, x1 = _cpu_seconds(tid=tid), _cpu_seconds(proxy_pid)
        w1 = _cpu_seconds(tid=tid, field=1)
        if None not in (r0, r1, x0, x1, w0, w1):
            out["re_cpu"], out["proxy_cpu"] = r1 - r0, x1 - x0
            # the wall time less the time the RunEngine's thread was ready to run but
            # another task had the CPU: what other people's load adds, taken out
            out["unqueued"] = out["wall"] - (w1 - w0)
        if hasattr(pub, "close"):
            out["inside"] = getattr(pub, "inside", None)
            pub.close()
        return out

    one(None)  # warm-up: imports, first-run caches
    names = list(arms)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load0 = load()
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            runs[name].append(one(arms[name]))
    # the CPU time the RunEngine's thread spends inside the publisher, in separate runs
    # (the timing wrapper itself costs a little)
    inside = {}
    for name, interval in (("publisher", 0.05), ("publisher, batch_interval=0", 0)):
        per_scan = [one(lambda i=interval: TimedPublisher(address, batch_interval=i))["inside"]
                    for _ in range(max(2, repeats // 3))]
        inside[name] = statistics.median(per_scan)

    def med(name, key):
        values = [r[key] for r in runs[name] if key in r]
        return statistics.median(values) if values else float("nan")

    bare = runs["nothing attached"]
    b, bc, br, bu = (med("nothing attached", k)
                     for k in ("wall", "cpu", "re_cpu", "unqueued"))
    print(f"{where}: 500-point scan (25x20 map, 2048-bin patterns), {repeats} rounds "
          f"of each arm in alternating order; {load0} before", flush=True)
    print(f"  nothing attached: wall {b:.3f} s (median; min {min(r['wall'] for r in bare):.3f}"
          f" s), less the RunEngine thread's waits for a CPU {bu:.3f} s; CPU of the process "
          f"{bc:.3f} s, of the RunEngine's thread {br:.3f} s")
    for name in names[1:]:
        ratios = sorted(p["wall"] / q["wall"] for p, q in zip(runs[name], bare))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        p, pc, pr, pu = (med(name, k) for k in ("wall", "cpu", "re_cpu", "unqueued"))
        mins = min(r["wall"] for r in runs[name]) / min(r["wall"] for r in bare)
        print(f"  {name}: wall {p:.3f} s = {100 * (p / b - 1):+.1f} % (target <= 3 %); "
              f"round by round {100 * (statistics.median(ratios) - 1):+.1f} % (quartiles "
              f"{100 * (q1 - 1):+.1f} .. {100 * (q3 - 1):+.1f} %); min vs min "
              f"{100 * (mins - 1):+.1f} %; wall less the waits for a CPU {pu:.3f} s = "
              f"{100 * (pu / bu - 1):+.1f} %; CPU of the RunEngine's thread {pr:.3f} s = "
              f"{100 * (pr / br - 1):+.1f} %, "
              f"of the process (with 0MQ's I/O thread) {pc:.3f} s = {100 * (pc / bc - 1):+.1f} "
              f"%" + (f"; inside the publisher {1e3 * inside[name]:.1f} ms CPU per scan = "
                      f"{1e6 * inside[name] / 503:.0f} us per document = "
                      f"{100 * inside[name] / br:.1f} % of the bare scan's RunEngine thread; "
                      f"the proxy used {med(name, 'proxy_cpu'):.3f} s CPU per scan"
                      if name in inside else ""), flush=True)
    print(f"  {load()} after", flush=True)


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


STAGES = "overhead,overhead-with-worker,worker,reprocess"


def main(repeats: int, frames: int, runs: int, stages: str = STAGES):
    from tiled.client import from_uri

    stages = set(stages.split(","))
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
                    scan_overhead(port_in, proxy.pid, repeats, "proxy, no worker")
                if stages & {"overhead-with-worker", "worker"}:
                    worker, log = start_worker(Path(tmp), server.uri, port_out)
                if "overhead-with-worker" in stages:  # the worker analyses on these cores
                    scan_overhead(port_in, proxy.pid, max(3, repeats // 3),
                                  "proxy + worker on this machine")
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
    parser.add_argument("--repeats", type=int, default=10,
                        help="rounds of the overhead comparison (more on a busy machine)")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--stages", default=STAGES, help=f"which of {STAGES} to run")
    args = parser.parse_args()
    main(args.repeats, args.frames, args.runs, args.stages)

"""A callback that runs for days: memory over a long scan, and what the analysis costs the
RunEngine when detectors take a real exposure.

1. Memory: ``count([powder], num=N)`` (default 20 000 patterns, no exposure, as fast as the
   analysis goes) with a default ``XRDMLCallback`` and a sink that drops what it gets.
   Prints the process RSS after warm-up (the first 2 000 events) and at the end, the growth
   per 1000 events (target <= 5 MB), and events/s. The same count without the callback is
   measured first, so the detector's and RunEngine's own growth is printed beside it.
2. Cost to the scan: the same scan with nothing attached and with the callback, with
   detectors that take a real exposure (``--exposure``, 0.1 s as hardware does; the frames
   are made before the scan, so the simulation costs the scan nothing, as a hardware
   detector would not): 1D patterns and 2048x2048 frames. Prints the RunEngine time ratio
   (target <= 1.05) and how long after the scan's stop the analysis run closed (target
   <= 2 s: the analysis keeps up).
3. A dead catalog mid-scan: the same exposed powder scan with the raw writer and the
   analysis writer filing into an embedded catalog, with the catalog up throughout and
   with its server stopped (from another thread, as an outage) after the first tenth of
   the points, alternating, ``--repeats`` each. Prints the RunEngine times and the ratio
   of the medians (target: within 10 %), the runs left in the spool, and what
   ``sync`` did with them once a server is back (each run filed once; a second ``sync``
   has nothing to do).

    .venv/bin/python benchmarks/long_scan.py [--patterns 20000] [--points 100]
                                             [--stages memory,writers,cost,outage]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import bluesky.plans as bp
import numpy as np
from bluesky import RunEngine
from ophyd.status import Status

from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.devices import sim_beamline
from bluesky_xrdml.devices.area import BraggSpotDetector
from bluesky_xrdml.devices.powder import PowderDetector
from bluesky_xrdml.simulation.spots import SpotSimulator


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Exposed:
    """Mix-in: ``trigger`` puts the next of ``pool`` (made before the scan) and finishes
    ``exposure`` seconds later, as a hardware detector's acquisition does."""

    def setup_exposure(self, signal, pool, exposure: float):
        self._signal, self._pool, self._exposure, self._n = signal, pool, exposure, 0

    def trigger(self):
        self._signal.put(self._pool[self._n % len(self._pool)])
        self._n += 1
        status = Status(obj=self)
        threading.Timer(self._exposure, status.set_finished).start()
        return status


class ExposedPowder(Exposed, PowderDetector):
    pass


class ExposedArea(Exposed, BraggSpotDetector):
    pass


def exposed_powder(bl, seed: int, exposure: float) -> ExposedPowder:
    """A powder detector of beamline ``bl`` that puts the next of 8 patterns the simulator
    made before the scan (at 8 sample positions) and takes ``exposure`` s per point."""
    powder = ExposedPowder(name="powder", x=bl.x, y=bl.y, rotation=bl.rot, seed=seed)
    pool = []
    for i in range(8):
        bl.x.set(-0.8 + 0.2 * i)
        PowderDetector.trigger(powder)  # the simulator's own pattern
        pool.append(powder.pattern.get().copy())
    powder.setup_exposure(powder.pattern, pool, exposure)
    return powder


def memory(patterns: int, warmup: int = 2000) -> None:
    bl = sim_beamline(seed=1)
    samples = {}

    def sample(name, doc):
        if name == "event" and doc["seq_num"] in (warmup, patterns):
            samples[doc["seq_num"]] = rss_mb()

    for label, attach in (("nothing attached", False), ("XRDMLCallback attached", True)):
        RE = RunEngine({})
        cb = None
        if attach:
            cb = XRDMLCallback()
            cb.subscribe(lambda name, doc: None)
            RE.subscribe(cb)
        RE.subscribe(sample)
        bl.powder.truth.clear()
        t0 = time.perf_counter()
        RE(bp.count([bl.powder], num=patterns))
        if cb is not None:
            cb.wait()
            samples[patterns] = rss_mb()  # once the analysis has caught up
        dt = time.perf_counter() - t0
        bl.powder.truth.clear()  # the simulator keeps its truth for tests
        grow = (samples[patterns] - samples[warmup]) / (patterns - warmup) * 1000
        print(f"  {label}: RSS {samples[warmup]:.0f} MB after {warmup} events, "
              f"{samples[patterns]:.0f} MB after {patterns}: {grow:+.2f} MB per 1000 events; "
              f"{patterns / dt:.0f} events/s" + (f"; analysis {cb.summaries()[-1]['analysed']}"
                                                  if cb else ""))
        if cb is not None:
            cb.close()


def memory_with_writers(patterns: int, exposure: float, warmup: int = 1000) -> None:
    """RSS growth with the raw and analysis writers filing into an embedded catalog (each
    run spooled to disk until filed): exposed detector, so the writers keep up."""
    import tempfile

    from bluesky_xrdml import catalog

    bl = sim_beamline(seed=5)
    powder = exposed_powder(bl, 5, exposure)
    samples = {}

    def sample(name, doc):
        if name == "event" and doc["seq_num"] in (warmup, patterns):
            samples[doc["seq_num"]] = rss_mb()

    with tempfile.TemporaryDirectory() as tmp, \
            catalog.embedded(f"{tmp}/catalog") as (_, client):
        RE = RunEngine({})
        raw = catalog.raw_writer(client, spool=f"{tmp}/spool")
        cb = XRDMLCallback()
        cb.subscribe(catalog.analysis_writer(client, spool=f"{tmp}/spool"))
        RE.subscribe(raw)
        RE.subscribe(cb)
        RE.subscribe(sample)
        t0 = time.perf_counter()
        (uid,) = RE(bp.count([powder], num=patterns))
        t_scan = time.perf_counter() - t0
        cb.wait()
        raw.join()
        lag = time.perf_counter() - t0 - t_scan
        cb.close()
        grow = (samples[patterns] - samples[warmup]) / (patterns - warmup) * 1000
        (run,) = catalog.analyses(client, uid)
        print(f"  XRDMLCallback + raw and analysis writers (embedded catalog, {exposure} s "
              f"exposure): RSS {samples[warmup]:.0f} MB after {warmup} events, "
              f"{samples[patterns]:.0f} MB after {patterns}: {grow:+.2f} MB per 1000 events; "
              f"everything filed {lag:.1f} s after the stop; raw run has "
              f"{client[uid]['primary']['powder_pattern'].shape[0]} patterns, analysis run "
              f"{run.metadata['stop']['exit_status']}")


def cost(points: int, exposure: float) -> None:
    bl = sim_beamline(seed=2)
    rng = np.random.default_rng(0)
    powder = exposed_powder(bl, 2, exposure)
    sim = SpotSimulator(shape=(2048, 2048), density=400.0, seed=2)
    area = ExposedArea(name="area", rotation=bl.rot, simulator=sim, seed=2)
    frames = [sim.frame(0.5 * i, rng) for i in range(4)]
    area.setup_exposure(area.image, frames, exposure)
    cases = {"powder patterns (2048 points)": powder, "area frames (2048x2048)": area}
    for label, det in cases.items():
        RE = RunEngine({})
        t0 = time.perf_counter()
        RE(bp.count([det], num=points))
        bare = time.perf_counter() - t0
        cb = XRDMLCallback()
        RE.subscribe(cb)
        RE(bp.count([det], num=3))  # warm-up: loads models, derives ROIs
        cb.wait()
        t0 = time.perf_counter()
        RE(bp.count([det], num=points))
        stopped = time.perf_counter()  # RE() returns right after the stop document
        attached = stopped - t0
        cb.wait()
        lag = time.perf_counter() - stopped
        summary = cb.summaries()[-1]
        print(f"  {label}: RunEngine {bare:.2f} s alone, {attached:.2f} s with the analysis "
              f"(ratio {attached / bare:.3f}, target <= 1.05); analysis run closed {lag:.2f} s "
              f"after the stop (target <= 2 s); {summary['exit_status']}: "
              f"{summary['analysed']}; queue stalls {cb.stats.stalls}")
        cb.close()


def outage(points: int, exposure: float, repeats: int = 3) -> None:
    import tempfile
    from pathlib import Path

    import tiled.client.utils as utils

    from bluesky_xrdml import catalog

    # the client's retries (45 s by default) run on the writers' threads, not the scan's;
    # shortened so that the benchmark does not wait for them at the end
    utils.TILED_RETRY_ATTEMPTS, utils.TILED_RETRY_TIMEOUT = 1, 1.0
    bl = sim_beamline(seed=3)
    powder = exposed_powder(bl, 3, exposure)
    dead = "catalog stopped after 10 % of the points"

    def one(case: str, where: Path):
        directory, spool = where / "catalog", where / "spool"
        server = catalog.embedded(directory)
        _, client = server.__enter__()
        stopped = []
        RE = RunEngine({})
        raw = catalog.raw_writer(client, spool=spool)
        cb = XRDMLCallback()
        cb.subscribe(catalog.analysis_writer(client, spool=spool))
        RE.subscribe(raw)
        RE.subscribe(cb)
        if case == dead:
            def kill(name, doc):
                # the server dies on its own, as in an outage: stopped from another
                # thread, so that stopping it is not counted in the scan's time
                if name == "event" and doc["seq_num"] == max(1, points // 10) and not stopped:
                    stopped.append(threading.Thread(target=server.__exit__,
                                                    args=(None, None, None)))
                    stopped[0].start()
            RE.subscribe(kill)
        t0 = time.perf_counter()
        (uid,) = RE(bp.count([powder], num=points))
        elapsed = time.perf_counter() - t0
        cb.wait(timeout=600)
        raw.join(timeout=600)
        cb.close()
        if stopped:
            stopped[0].join()
        else:
            server.__exit__(None, None, None)
        left = sorted(p.relative_to(spool).as_posix() for p in spool.rglob("*.msgpack"))
        print(f"  {case}: RunEngine {elapsed:.2f} s; spooled: {left or 'nothing'}", flush=True)
        return elapsed, uid, directory, spool

    times: dict = {"catalog up": [], dead: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):  # alternating, so that a change of load hits both
            for case in times:
                elapsed, uid, directory, spool = one(case, Path(tmp) / f"{i}-{len(times[case])}"
                                                     f"{'-dead' if case == dead else ''}")
                times[case].append(elapsed)
        up, down = (statistics.median(times[c]) for c in ("catalog up", dead))
        print(f"  scan time with the catalog dead vs up (medians of {repeats}): {down:.2f} s "
              f"vs {up:.2f} s, ratio {down / up:.3f} (target <= 1.10); {load()}")
        with catalog.embedded(directory) as (_, client):  # the last dead run's catalog
            first = catalog.sync(client, spool)
            second = catalog.sync(client, spool)
            n = client[uid]["primary"]["powder_pattern"].shape[0]
            print(f"  sync once the server is back: {[what for _, what in first]}; "
                  f"a second sync: {second or 'nothing to do'}; the raw run {uid[:8]} now "
                  f"has {n} of {points} patterns, its analysis runs: "
                  f"{len(catalog.analyses(client, uid))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", type=int, default=20_000)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--exposure", type=float, default=0.1)
    parser.add_argument("--writer-patterns", type=int, default=5000)
    parser.add_argument("--writer-exposure", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=3, help="outage: runs of each case")
    parser.add_argument("--stages", default="memory,writers,cost,outage")
    args = parser.parse_args()
    stages = args.stages.split(",")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if "memory" in stages:
        print(f"1. memory over a count of {args.patterns} powder patterns")
        memory(args.patterns)
    if "writers" in stages:
        print(f"1b. memory with the writers filing into a catalog: {args.writer_patterns} "
              f"patterns, {args.writer_exposure} s exposure")
        memory_with_writers(args.writer_patterns, args.writer_exposure)
    if "cost" in stages:
        print(f"2. cost to the scan: {args.points} points, {args.exposure} s exposure each")
        cost(args.points, args.exposure)
    if "outage" in stages:
        print(f"3. a dead catalog mid-scan: {args.points} points, {args.exposure} s exposure")
        outage(args.points, args.exposure, args.repeats)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""What attaching XRDMLCallback costs the scan, and how fast the worker keeps up.

For each detector: the same scan without and with the callback (no sinks, so this measures
the callback, not Tiled), in the same process. Prints the scan time ratio and the analysis
throughput (items analysed per second of wall time until the analysis run was closed).

    .venv/bin/python benchmarks/live_overhead.py [--points 200]
"""

from __future__ import annotations

import argparse
import time

import bluesky.plans as bp
from bluesky import RunEngine

from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.devices import sim_beamline


def timed(RE, plan):
    t0 = time.perf_counter()
    RE(plan)
    return time.perf_counter() - t0


def main(points: int) -> None:
    bl = sim_beamline()
    cases = {
        "area detector frames (256x256)": lambda: bp.count([bl.area], num=points),
        "powder patterns (2048 points)": lambda: bp.scan([bl.powder], bl.x, -0.9, 0.9, points),
    }
    print(f"{points} points per scan; 2-core CPU; no sinks attached")
    for label, plan in cases.items():
        RE = RunEngine({})
        timed(RE, plan())  # warm up caches (pymatgen peak lists, imports)
        bare = min(timed(RE, plan()) for _ in range(2))
        cb = XRDMLCallback()
        RE.subscribe(cb)
        timed(RE, plan())  # the first run derives ROIs; not what a long beamtime sees
        cb.wait()
        t0 = time.perf_counter()
        scan = timed(RE, plan())
        cb.wait()
        done = time.perf_counter() - t0
        print(f"{label}:\n"
              f"  scan alone {bare:.2f} s, with callback {scan:.2f} s  (ratio {scan / bare:.2f})\n"
              f"  analysis run closed {done:.2f} s after the scan started: "
              f"{points / done:.0f} items/s end to end; queue stalls {cb.stats.stalls}, "
              f"largest batch {cb.stats.max_batch}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    main(parser.parse_args().points)

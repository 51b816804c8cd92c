"""Replay throughput of an archived run against the live scan's rate, in the same run.

1. Live: a rotation series of N area-detector frames (256×256) with the raw writer and the
   analysis callback attached, filed in an embedded Tiled catalog.
2. Replay through the RunEngine (``RE(replay(client[uid]))``) with the callback.
3. Bulk: the archived run's documents pushed straight into the callback.

Each prints events/s from the start of the scan/replay until its analysis run is filed.

    .venv/bin/python benchmarks/replay.py [--frames 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import bluesky.plans as bp
from bluesky import RunEngine

from bluesky_xrdml import catalog
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.devices import sim_beamline
from bluesky_xrdml.reprocess import reprocess


def main(frames: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, catalog.embedded(tmp) as (_, client):
        bl, RE = sim_beamline(), RunEngine({})
        raw = catalog.raw_writer(client, spool=f"{tmp}/spool")
        RE.subscribe(raw)
        cb = XRDMLCallback()
        cb.subscribe(catalog.analysis_writer(client, spool=f"{tmp}/spool"))
        RE.subscribe(cb)
        t0 = time.perf_counter()
        (uid,) = RE(bp.count([bl.area], num=frames))
        t_scan = time.perf_counter() - t0
        cb.wait()
        raw.join()
        t_live = time.perf_counter() - t0
        print(f"{frames} frames of 256x256, 2-core CPU, embedded Tiled catalog")
        print(f"live scan:       scan {t_scan:.1f} s ({frames / t_scan:.1f} frames/s), raw and "
              f"analysis runs filed after {t_live:.1f} s ({frames / t_live:.1f} frames/s)")
        rates = {}
        for label, engine in (("replay (RunEngine)", True), ("bulk (no RunEngine)", False)):
            s = reprocess(client, uid, engine=engine, spool=f"{tmp}/spool")
            assert s["exit_status"] == "success", s["reason"]
            rates[label] = frames / s["seconds"]
            print(f"{label + ':':20} {s['seconds']:.1f} s, {rates[label]:.1f} frames/s "
                  f"({rates[label] / (frames / t_live):.2f}x the live rate)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    main(parser.parse_args().frames)

"""The demo: two simulated scans analysed live and filed in a Tiled catalog.

1. A rotation series on the area detector (Bragg spots) -> peak table.
2. A 2D map on the powder detector -> ROI maps of the four demo phases.

Both raw runs go to Tiled through ``TiledWriter``; the callback's analysis runs go there
too and are then read back with the catalog helpers to draw the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import bluesky.plans as bp
from bluesky import RunEngine

from . import catalog
from .callbacks import XRDMLCallback
from .devices import HDF5AreaDetector, sim_beamline
from .plans import xrd_map
from .plots import save_figures


def run_demo(client, figures: Path, map_points: int = 20, frames: int = 12, log=print,
             spool: Path | None = None, frames_dir: Path | None = None) -> list:
    """Run the two scans against ``client``; returns one summary dict per scan.

    ``frames_dir``: the area detector writes its frames to HDF5 files there and the runs
    reference them (resource/datum), as a real AreaDetector does; the catalog server must
    be allowed to read that folder. Without it, frames travel inside the events."""
    figures.mkdir(parents=True, exist_ok=True)
    bl = sim_beamline()
    if frames_dir is not None:
        bl.area = HDF5AreaDetector(name="area", rotation=bl.rot, directory=frames_dir,
                                   labels={"detectors"})
    RE = RunEngine({})
    raw = catalog.raw_writer(client, spool=spool)
    RE.subscribe(raw)
    cb = XRDMLCallback()
    cb.subscribe(catalog.analysis_writer(client, spool=spool))
    RE.subscribe(cb)

    summaries = []
    scans = [
        ("rotation series, area detector", lambda: bp.scan(
            [bl.area], bl.rot, 0.0, 3.0, frames, md={"sample": "simulated grains"})),
        ("powder map, 1D detector", lambda: xrd_map(
            [bl.powder], bl.x, -0.95, 0.95, map_points, bl.y, -0.95, 0.95, map_points,
            md={"sample": "demo phantom: Ni/NiO particle, CeO2 block, Pd particle"})),
    ]
    for label, plan in scans:
        log(f"[bold]scan:[/bold] {label}")
        t0 = time.perf_counter()
        (raw_uid,) = RE(plan())
        t_scan = time.perf_counter() - t0
        cb.wait()
        raw.join()
        t_all = time.perf_counter() - t0
        run = catalog.analyses(client, raw_uid)[0]
        summary = {
            "scan": label, "raw_uid": raw_uid, "analysis_uid": run.metadata["start"]["uid"],
            "exit_status": run.metadata["stop"]["exit_status"],
            "reason": run.metadata["stop"]["reason"], "points": len(client[raw_uid]["primary"]
                                                                     .base["internal"].read()),
            "scan_s": t_scan, "analysis_done_s": t_all,
            "incomplete": catalog.verify(run),
            "figures": save_figures(client, run, figures),
        }
        summaries.append(summary)
    summaries[-1]["stalls"] = cb.stats.stalls
    return summaries

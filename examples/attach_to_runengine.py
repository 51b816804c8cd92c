"""Attach live diffraction analysis to a RunEngine and file everything in Tiled.

Run it:  .venv/bin/python examples/attach_to_runengine.py
"""

from bluesky import RunEngine

from bluesky_xrdml import catalog
from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.devices import sim_beamline
from bluesky_xrdml.plans import xrd_map

with catalog.embedded("xrdml-data") as (server, client):  # or catalog.connect(URI)
    RE = RunEngine()
    raw = catalog.raw_writer(client)                  # raw run -> Tiled (own thread)
    RE.subscribe(raw)
    cb = XRDMLCallback()                              # every analysis available
    cb.subscribe(catalog.analysis_writer(client))     # analysis run -> Tiled
    RE.subscribe(cb)

    bl = sim_beamline()                               # your hardware goes here
    (uid,) = RE(xrd_map([bl.powder], bl.x, -0.9, 0.9, 12, bl.y, -0.9, 0.9, 12))
    cb.wait()                                         # the scan never waited for the analysis
    raw.join()                                        # nor for the catalog

    run = catalog.analyses(client, uid)[0]
    print(run.metadata["stop"]["reason"])
    print(catalog.maps(run))

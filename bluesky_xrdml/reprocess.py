"""Re-analyse archived runs from a catalog: the engine behind ``xrdml replay``.

Two paths, one callback: through the RunEngine with the ``replay`` plan (the default;
exactly what a live scan goes through), or by pushing the archived run's documents
straight into ``XRDMLCallback`` (``engine=False``: no RunEngine, for bulk reprocessing).
"""

from __future__ import annotations

import time

from . import catalog
from .archive import ArchivedRun
from .callbacks import XRDMLCallback


def reprocess(client, uid: str, *, analyses=None, models=None, engine: bool = True,
              spool=None, on_events=None) -> dict:
    """Analyse archived run ``uid`` again and file a new analysis run in ``client``.

    ``analyses``/``models``: as for ``XRDMLCallback`` (default: every analysis available,
    shipped weights).
    ``on_events(n)`` is called as events go through (for progress bars).
    Returns a summary: uids, status, reason, events, seconds.
    """
    t0 = time.perf_counter()
    archived = ArchivedRun(client[uid])
    # closed at the end: a long-lived process (a Dask worker) keeps no threads per run
    with XRDMLCallback(analyses, models=models) as cb:
        # big batches: nobody watches a reprocessed run fill up; each request costs ~0.1 s
        cb.subscribe(catalog.analysis_writer(client, batch_size=500, spool=spool))
        if engine:
            from bluesky import RunEngine

            from .plans import replay

            RE = RunEngine({})
            RE.subscribe(cb)
            if on_events:
                RE.subscribe(lambda name, doc: on_events(1) if name == "event" else None)
            RE(replay(archived))
        else:
            for name, doc in archived.documents():
                cb(name, doc)
                if on_events and name == "event_page":
                    on_events(len(doc["seq_num"]))
        cb.wait()
        summary = cb.summaries()[-1]
        summary.update(events=archived.n_events, seconds=time.perf_counter() - t0,
                       sink_failures=cb.sink_failures)
    return summary

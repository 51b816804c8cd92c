"""Re-analysing many archived runs at once, one run per task on a Dask cluster.

``reprocess_many(uids, catalog_uri, dask="tcp://scheduler:8786")`` (or ``dask="local:4"``
for a ``LocalCluster`` of 4 worker processes; ``dask=None`` for one run after another
in this process). Each Dask worker loads the models once (``ModelsPlugin``), connects to
the catalog once, and for each run it is given does what ``xrdml replay --bulk`` does:
reads the run from Tiled, pushes its documents through ``XRDMLCallback`` and files the
new analysis run, linked to the raw run. A run that fails is reported as failed; the
others go on.
"""

from __future__ import annotations

import logging
import time

from .reprocess import reprocess

logger = logging.getLogger(__name__)

try:
    from distributed import WorkerPlugin
except ImportError:  # dask.distributed is only needed with --dask
    WorkerPlugin = object


class ModelsPlugin(WorkerPlugin):
    """Loads the analyses (and their models) once per Dask worker, and keeps one catalog
    client per worker. ``loads`` counts how often that happened on this worker."""

    name = "xrdml-models"

    def __init__(self, models: dict | None = None, catalog_uri: str = "",
                 api_key: str | None = None):
        self.models = dict(models or {})
        self.catalog_uri = catalog_uri
        self.api_key = api_key
        self.analyses = None
        self.client = None
        self.loads = 0

    def setup(self, worker=None):
        from . import catalog
        from .callbacks.registry import default_analyses

        self.analyses = default_analyses(models=self.models)
        self.loads += 1
        self.client = catalog.connect(self.catalog_uri, api_key=self.api_key)


def _on_dask_worker(uid: str, spool) -> dict:
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins[ModelsPlugin.name]
    summary = _one(plugin.client, uid, plugin.analyses, spool)
    summary.update(worker=worker.address, model_loads=plugin.loads)
    return summary


def _one(client, uid: str, analyses, spool) -> dict:
    t0 = time.perf_counter()
    try:
        if uid not in client:
            raise KeyError(f"{uid} is not in the catalog")
        return reprocess(client, uid, analyses=analyses, engine=False, spool=spool)
    except Exception as err:
        logger.exception("xrdml: reprocessing %s failed", uid)
        return {"raw_uid": uid, "analysis_uid": None, "exit_status": "fail",
                "reason": f"{type(err).__name__}: {err}", "events": 0,
                "seconds": time.perf_counter() - t0, "sink_failures": 0}


def local_cluster(n_workers: int):
    """A ``LocalCluster`` of ``n_workers`` single-threaded worker processes on this machine."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        dashboard_address=None, host="127.0.0.1")


def reprocess_many(uids: list[str], catalog_uri: str, *, api_key: str | None = None,
                   dask: str | None = None, models: dict | None = None, spool=None,
                   on_result=None) -> list[dict]:
    """Analyse archived runs ``uids`` again; returns one summary per run, in order.

    ``dask``: a scheduler address (``tcp://host:8786``), ``"local:N"`` for a local
    cluster of N worker processes, or None to run them one after another here.
    ``on_result(summary)`` is called as each run finishes (in completion order).
    A run that fails has ``exit_status="fail"`` and the reason; the others go on.
    ``models``: your own weights, ``{"braggnn": PATH}``; paths must be readable on
    every Dask worker (a shared filesystem).
    """
    from . import catalog

    on_result = on_result or (lambda summary: None)
    if dask is None:
        from .callbacks.registry import default_analyses

        client = catalog.connect(catalog_uri, api_key=api_key)
        analyses = default_analyses(models=models)
        results = []
        for uid in uids:
            results.append(_one(client, uid, analyses, spool))
            on_result(results[-1])
        return results
    return _on_dask(uids, catalog_uri, api_key, dask, models, spool, on_result)


def _on_dask(uids, catalog_uri, api_key, dask, models, spool, on_result) -> list[dict]:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise RuntimeError("--dask needs dask.distributed: pip install distributed") from None
    cluster = None
    if dask.startswith("local:"):
        n = int(dask.split(":", 1)[1])
        if n < 1:
            raise ValueError(f"{dask}: a local cluster needs at least one worker")
        cluster = local_cluster(n)
        address = cluster
    else:
        address = dask
    try:
        with Client(address) as client:
            client.register_plugin(ModelsPlugin(models, catalog_uri, api_key))
            futures = {client.submit(_on_dask_worker, uid, spool, pure=False,
                                     key=f"xrdml-reprocess-{i}-{uid}"): uid
                       for i, uid in enumerate(uids)}
            by_uid = {}
            for future in as_completed(futures):
                uid = futures[future]
                try:
                    summary = future.result()
                except Exception as err:  # the task itself failed (a worker died, ...)
                    summary = {"raw_uid": uid, "analysis_uid": None, "exit_status": "fail",
                               "reason": f"{type(err).__name__}: {err}", "events": 0,
                               "seconds": 0.0, "sink_failures": 0}
                by_uid[future.key] = summary
                on_result(summary)
            return [by_uid[f.key] for f in futures]
    finally:
        if cluster is not None:
            cluster.close()

"""Tiled: the embedded catalog, writers for raw and analysis runs, and readers.

Analysis runs are ordinary Bluesky runs in Tiled, so any tiled client can read them;
these helpers add the common questions: which analysis runs belong to a raw run
(``analyses``), its maps as an ``xarray.Dataset`` (``maps``), its peak table as a
DataFrame (``peaks``). With plain tiled queries::

    from tiled.queries import Key
    client.search(Key("start.xrdml.raw_uid") == raw_uid)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import xarray as xr
from tiled.queries import Key

from . import layout
from .archive import stream_table

logger = logging.getLogger(__name__)


class CatalogError(RuntimeError):
    """The catalog cannot be reached or used; the message says what to check."""


@contextlib.contextmanager
def embedded(directory: str | os.PathLike = "xrdml-data", api_key: str | None = None,
             port: int = 0):
    """Start an embedded Tiled server on 127.0.0.1 over ``directory`` (kept between runs:
    SQLite catalog + files). Yields ``(server, client)``; the server stops on exit."""
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    Path(directory).mkdir(parents=True, exist_ok=True)
    # tiled keeps the single-user key process-wide: a second embedded server with another
    # key locks clients of the first out (401). All ours share one random key per process.
    api_key = api_key or _process_key()
    # always as a context manager: an exception before close() would hang the process
    # detectors' files (HDF5 frames referenced by resource/datum) under the directory are
    # registered by TiledWriter and must be readable by the server
    with SimpleTiledServer(directory=directory, api_key=api_key, port=port,
                           readable_storage=[Path(directory).resolve()]) as server:
        yield server, from_uri(server.uri)


@functools.cache
def _process_key() -> str:
    import secrets

    return secrets.token_hex(8)


def connect(uri: str, api_key: str | None = None):
    """A tiled client for ``uri``; the API key defaults to ``$TILED_API_KEY``."""
    import httpx
    from tiled.client import from_uri

    api_key = api_key or os.environ.get("TILED_API_KEY")
    parts = urlsplit(uri)
    try:  # one quick probe: the tiled client would retry for ~20 s before giving up
        httpx.get(f"{parts.scheme}://{parts.netloc}/healthz", timeout=5, trust_env=False)
    except httpx.HTTPError as err:
        raise CatalogError(
            f"no Tiled server answers at {parts.scheme}://{parts.netloc} "
            f"({type(err).__name__}). Check the URI and that the server is running "
            "(and, once it is, that TILED_API_KEY holds a valid key for it)."
        ) from None
    try:
        return from_uri(uri, api_key=api_key)
    except Exception as err:  # httpx errors, 401s: say what to check, not a retry trace
        if "401" in str(err):
            raise CatalogError(
                f"the Tiled server at {uri} rejected the API key "
                f"({'none given' if not api_key else 'TILED_API_KEY or --api-key'}): "
                "set TILED_API_KEY to a valid key for this server."
            ) from None
        raise CatalogError(
            f"could not open the Tiled catalog at {uri}: {type(err).__name__}: {err}. "
            "Check that the server is running and reachable, and that TILED_API_KEY "
            "holds a valid key for it."
        ) from None


# One lock per catalog server: our writers (raw and analysis runs, on different threads)
# take turns. The embedded server's DuckDB table storage lost rows, and once aborted the
# process, when two threads of one process created and appended tables at the same time.
_LOCKS: dict[str, threading.Lock] = {}


def serialized(client, writer):
    """``writer`` behind the lock of ``client``'s server: one write at a time."""
    lock = _LOCKS.setdefault(urlsplit(client.uri).netloc, threading.Lock())

    def write(name, doc):
        with lock:
            writer(name, doc)

    write.writer = writer
    return write


# Events written per request. 1 makes every event visible at once but costs ~80 ms per
# 2048-point raw pattern and ~45 ms per result row on this 2-core machine (TiledWriter
# appends row by row); 10 keeps results visible within seconds at a tenth of the cost.
LIVE_BATCH = 10


def raw_writer(client, batch_size: int = LIVE_BATCH, spool: str | os.PathLike | None = None):
    """A writer for raw runs: subscribe it to the RunEngine (``RE.subscribe(w)``).

    It files events while the scan runs (``TiledWriter``, ``batch_size`` events per
    request), on its own thread so the RunEngine never waits on the catalog, and spools
    the run to ``<spool>/raw`` if the catalog fails, so an outage neither aborts the scan
    nor loses data; the log then says where the run went (``w.sink.spooled`` lists them).
    An array whose shape differs from what its descriptor declares (a detector that
    changed its ROI mid-scan) cannot be stored beside the others: it is filed as a
    placeholder of the declared shape (0, or NaN for floats) and a warning says which
    point. Arrays are converted to lists first so the spool (JSON lines) can hold them:
    fine for patterns and frames up to a few megapixels; large detectors should write
    files (HDF5) that the run references instead. ``w.join()`` waits until everything
    is handed to Tiled.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    from .callbacks.worker import BackgroundSink

    spool = (default_spool() if spool is None else Path(spool)) / "raw"
    writer = serialized(client, TiledWriter(client, batch_size=batch_size,
                                            backup_directory=str(spool)))
    return BackgroundSink(RawRunSink(writer, spool), name="xrdml-raw-writer")


class RawRunSink:
    """Hands raw documents to ``writer`` as plain JSON-able values, with arrays conformed
    to their declared shapes; tells the user where a run went when it was spooled."""

    def __init__(self, writer, spool: Path):
        self.writer, self.spool = writer, Path(spool)
        self.spooled: list[tuple[str, Path]] = []  # (raw uid, spool file)
        self._declared: dict[str, dict] = {}  # descriptor uid -> {key: (shape, dtype)}
        self._warned: set = set()

    def __call__(self, name, doc):
        if name == "descriptor":
            self._declared[doc["uid"]] = {
                k: (tuple(dk["shape"]), dk.get("dtype_numpy"))
                for k, dk in doc.get("data_keys", {}).items()
                if dk.get("shape") and not dk.get("external")}
        elif name in ("event", "event_page"):
            doc = self._conform(name, doc)
        self.writer(name, jsonable(doc))
        if name == "stop":
            self._report(doc["run_start"])

    def _conform(self, name, doc):
        declared = self._declared.get(doc.get("descriptor"), {})
        data = doc.get("data", {})
        bad = {k for k in declared if k in data and self._mismatch(name, data[k], declared[k])}
        if not bad:
            return doc
        doc = {**doc, "data": dict(data)}
        for key in bad:
            shape, dtype = declared[key]
            fill = np.zeros(shape, dtype or "<f8")
            if fill.dtype.kind == "f":
                fill[...] = np.nan
            seqs = doc["seq_num"] if name == "event_page" else [doc["seq_num"]]
            if name == "event":
                doc["data"][key] = fill
            else:
                doc["data"][key] = [v if _shape(v) == shape else fill for v in data[key]]
            if (doc["descriptor"], key) not in self._warned:
                self._warned.add((doc["descriptor"], key))
                logger.warning(
                    "raw run: %r at seq_num %s does not have its declared shape %s; filed as "
                    "a placeholder of that shape (the detector changed shape mid-scan?); "
                    "later mismatches of this key are not reported", key, seqs, shape)
        return doc

    @staticmethod
    def _mismatch(name, value, declared) -> bool:
        shape = declared[0]
        values = value if name == "event_page" else [value]
        return any(_shape(v) != shape for v in values)

    def _report(self, uid: str) -> None:
        path = self.spool / f"{uid.split('-')[0]}.jsonl"
        if path.exists():
            self.spooled.append((uid, path))
            logger.warning("raw run %s could not be filed in the catalog; all its documents "
                           "are in %s: file them with `xrdml sync --spool %s` once the "
                           "catalog is reachable", uid, path, self.spool.parent)


def _shape(value) -> tuple:
    try:
        arr = np.asarray(value)
    except Exception:
        return ()
    if arr.dtype == object:  # ragged: no usable shape
        return ("ragged",)
    return tuple(arr.shape)


def jsonable(doc):
    """A copy of a document with numpy arrays and scalars as plain Python values."""
    if isinstance(doc, dict):
        return {k: jsonable(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [jsonable(v) for v in doc]
    if isinstance(doc, np.ndarray):
        return doc.tolist()
    if isinstance(doc, np.generic):
        return doc.item()
    return doc


def default_spool() -> Path:
    """Where analysis runs that could not be filed wait for ``xrdml sync``:
    ``$XRDML_SPOOL``, else ``./xrdml-spool``."""
    return Path(os.environ.get("XRDML_SPOOL", "xrdml-spool"))


# Rows per request for analysis runs: a frame gives ~30 peak rows, and at 10 rows per
# request the peak table cost three appends per frame, slower than the analysis itself
# (benchmarks/replay.py: 1000 frames filed after 224 s for a 76 s scan).
ANALYSIS_BATCH = 50


def analysis_writer(client, batch_size: int = ANALYSIS_BATCH,
                    spool: str | os.PathLike | None = None):
    """A ``TiledWriter`` for analysis runs, with a spool so that nothing is lost.

    If writing a run fails (catalog unreachable, key revoked), TiledWriter abandons that
    run's upload and appends all its documents to ``<spool>/analysis/<uid prefix>.jsonl``;
    ``sync`` files them later. ``max_array_size=0`` stores every array as an array node:
    TiledWriter keeps arrays of up to 16 elements in the SQL table by default, and those
    come back as strings, which would break small maps.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    spool = (default_spool() if spool is None else Path(spool)) / "analysis"
    return serialized(client, TiledWriter(client, batch_size=batch_size, max_array_size=0,
                                          backup_directory=str(spool)))


def sync(client, spool: str | os.PathLike | None = None, log=None) -> list[tuple[str, str]]:
    """Upload spooled analysis runs; idempotent. Returns ``[(uid, what happened)]``.

    A run already complete in the catalog is not written again. A partial copy left by
    the outage is replaced. A file is renamed ``*.jsonl.synced`` once its run is complete
    in the catalog, and kept (nothing is deleted).
    """
    import json

    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    spool = default_spool() if spool is None else Path(spool)
    done = []
    # raw runs first: an analysis run refers to its raw run
    paths = sorted((spool / "raw").glob("*.jsonl")) + sorted((spool / "analysis").glob("*.jsonl"))
    for path in paths:
        max_array_size = 0 if path.parent.name == "analysis" else 16
        docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        starts = [d["doc"] for d in docs if d["name"] == "start"]
        if not starts:
            done.append((path.name, "skipped: no start document in the file"))
            continue
        uid = starts[0]["uid"]
        if uid in client:
            node = client[uid]
            if node.metadata.get("stop") and not verify(node):
                path.rename(path.with_name(path.name + ".synced"))
                done.append((uid, "already in the catalog"))
                continue
            client.delete_contents(uid, recursive=True, external_only=False)
            what = "replaced a partial copy"
        else:
            what = "uploaded"
        writer = serialized(client, TiledWriter(client, batch_size=1000,
                                                max_array_size=max_array_size))
        for d in docs:
            writer(d["name"], d["doc"])
        missing = verify(client[uid])
        if missing:
            done.append((uid, f"incomplete after upload {missing}; file kept"))
            continue
        path.rename(path.with_name(path.name + ".synced"))
        done.append((uid, what))
        if log:
            log(f"{uid}: {what}")
    return done


def analyses(client, raw_uid: str) -> list:
    """The analysis runs of raw run ``raw_uid``, newest first."""
    found = client.search(Key("start.xrdml.raw_uid") == raw_uid)
    runs = list(found.values())
    return sorted(runs, key=lambda r: r.metadata["start"]["time"], reverse=True)


def table(analysis_run, stream: str) -> pd.DataFrame:
    """A per-item stream (``peaks``, ``frames``, ``patterns``, ``errors``) as a DataFrame."""
    if stream not in analysis_run:
        return pd.DataFrame()
    df = stream_table(analysis_run[stream])
    keep = [c for c in df.columns if c not in ("time", "seq_num") and not c.startswith("ts_")]
    return df[keep]


def verify(analysis_run) -> dict:
    """Streams whose stored rows differ from the count in the stop document:
    ``{stream: (expected, stored)}``; empty when everything arrived."""
    stop = analysis_run.metadata.get("stop") or {}
    missing = {}
    for stream, expected in (stop.get("num_events") or {}).items():
        stored = len(stream_table(analysis_run[stream])) if stream in analysis_run else 0
        if stored != expected:
            missing[stream] = (expected, stored)
    return missing


def peaks(analysis_run) -> pd.DataFrame:
    """The Bragg-peak table: frame, row, col, row_std, col_std, intensity, method, flag."""
    return table(analysis_run, layout.PEAKS)


def maps(analysis_run, stream: str = layout.MAPS) -> xr.Dataset:
    """The maps of an analysis run as an ``xarray.Dataset``.

    Dimensions are the scan's motors (outer first) for grid maps, ``point`` (the raw
    seq_num) with each motor's measured position as a coordinate for scans that are not
    grids, and ``row``/``col`` (mm) for XRD-CT images; coordinates come from the measured
    motor positions.
    """
    if stream not in analysis_run:
        raise KeyError(f"analysis run {analysis_run.metadata['start']['uid']} has no "
                       f"{stream!r} stream (it has: {list(analysis_run)})")
    node = analysis_run[stream]
    base = getattr(node, "base", node)
    data_keys = node.descriptors[0]["data_keys"]
    arrays = {k: np.asarray(base[k].read())[-1] for k in data_keys}
    dims = {k: tuple(v["dims"]) for k, v in data_keys.items()}
    coords = {k: (dims[k], arrays[k]) for k in arrays
              if dims[k] == (k,) or data_keys[k].get("coordinate")}
    variables = {k: (dims[k], arrays[k], {"units": data_keys[k].get("units", "")})
                 for k in arrays if k not in coords}
    start = analysis_run.metadata["start"]
    return xr.Dataset(variables, coords=coords, attrs={
        "analysis_uid": start["uid"], "raw_uid": start["xrdml"]["raw_uid"]})

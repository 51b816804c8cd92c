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
import logging
import os
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
             port: int = 0, readable_storage=()):
    """Start a Tiled server over ``directory`` (kept between runs) on 127.0.0.1, in its own
    process. Yields ``(server, client)``; the server stops on exit.

    It is ``tiled serve`` with everything in ``directory``: the SQLite catalog
    (``catalog.db``), array files (``data/``) and tables (``storage.duckdb``), as tiled's
    ``SimpleTiledServer`` keeps them, with two differences: the server runs in a process
    of its own, so nothing it does can take the user's session down, and its table
    operations take turns (``bluesky_xrdml.tiled_server``), so any number of independent
    writers may share it (in ``SimpleTiledServer``, a plain TiledWriter beside ours made
    DuckDB fail and then aborted the whole Python process).
    ``readable_storage``: folders of files that runs reference (detector HDF5/TIFF).
    """
    from tiled.client import from_uri

    # detectors' files (HDF5 frames referenced by resource/datum) under the directory are
    # registered by TiledWriter and must be readable by the server
    readable = [Path(directory), *readable_storage]
    server = EmbeddedServer(directory, api_key=api_key, port=port, readable_storage=readable)
    try:
        server.start()
        yield server, from_uri(server.uri)
    finally:
        server.stop()


class EmbeddedServer:
    """``tiled serve catalog`` over one directory, as a child process on 127.0.0.1.

    ``uri`` carries the API key (``...?api_key=KEY``) as tiled's own ``SimpleTiledServer``
    does; ``api_key`` is a random one unless given. ``log`` is the server's output.
    """

    def __init__(self, directory, api_key: str | None = None, port: int = 0,
                 readable_storage=()):
        import secrets

        self.directory = Path(directory).resolve()
        self.api_key = api_key or secrets.token_hex(16)
        self.port = port or _free_port()
        self.readable_storage = [Path(p).resolve() for p in readable_storage]
        self.log = self.directory / "server.log"
        self.process = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        from urllib.parse import quote_plus

        return f"{self.base}/api/v1?api_key={quote_plus(self.api_key)}"

    def config(self) -> dict:
        """The server's tiled configuration (written to ``tiled-config.yml``)."""
        d = self.directory
        writable = [str(d / "data"), f"duckdb:///{d / 'storage.duckdb'}"]
        args = {
            "uri": f"sqlite:///{d / 'catalog.db'}",
            "writable_storage": writable,
            "readable_storage": [str(p) for p in self.readable_storage],
            "init_if_not_exists": True,
        }
        return {"trees": [{"path": "/", "tree": "catalog", "args": args}]}

    def command(self) -> list[str]:
        import sys

        import yaml

        path = self.directory / "tiled-config.yml"
        path.write_text(yaml.safe_dump(self.config()))
        return [sys.executable, "-m", "bluesky_xrdml.tiled_server", "serve", "config",
                str(path), "--api-key", self.api_key,
                "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout: float = 180.0) -> None:
        import subprocess
        import time

        import httpx

        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1,
                             trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise CatalogError(f"the embedded Tiled server over {self.directory} did not "
                                   f"start; its log ({self.log}) ends with:\n{tail}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __repr__(self):
        return f"<EmbeddedServer {self.base} over {self.directory}>"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: end the server when the process that started it dies
    (Linux), so a crashed session leaves no server behind."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


# Events written per request. 1 makes every event visible at once but costs ~80 ms per
# 2048-point raw pattern and ~45 ms per result row on this 2-core machine (TiledWriter
# appends row by row); 10 keeps results visible within seconds at a tenth of the cost.
LIVE_BATCH = 10


def raw_writer(client, batch_size: int = LIVE_BATCH, spool: str | os.PathLike | None = None):
    """A writer for raw runs: subscribe it to the RunEngine (``RE.subscribe(w)``).

    It files events while the scan runs (``TiledWriter``, ``batch_size`` events per
    request), on its own thread so the RunEngine never waits on the catalog. Each run
    is also spooled to ``<spool>/raw`` until it is filed (``spool.SpooledWriter``): if
    the catalog fails, neither the scan nor the data are lost, and the log says where
    the run went (``w.sink.spooled`` lists them) for ``xrdml sync``. Arrays reach Tiled
    as arrays. An array whose shape differs from what its descriptor declares (a
    detector that changed its ROI mid-scan) cannot be stored beside the others: it is
    filed as a placeholder of the declared shape (0, or NaN for floats) and a warning
    says which point. ``w.join()`` waits until everything is handed to Tiled.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    from .callbacks.worker import BackgroundSink
    from .spool import SpooledWriter

    spool = (default_spool() if spool is None else Path(spool)) / "raw"
    writer = SpooledWriter(lambda: RawRunSink(TiledWriter(client, batch_size=batch_size)),
                           spool, what="raw run")
    return BackgroundSink(writer, name="xrdml-raw-writer")


class RawRunSink:
    """Hands one raw run's documents to ``writer`` with arrays conformed to their
    declared shapes."""

    def __init__(self, writer):
        self.writer = writer
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
        self.writer(name, doc)

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


def _shape(value) -> tuple:
    try:
        arr = np.asarray(value)
    except Exception:
        return ()
    if arr.dtype == object:  # ragged: no usable shape
        return ("ragged",)
    return tuple(arr.shape)


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
    """A writer for analysis runs (``cb.subscribe(w)``): a ``TiledWriter`` per run, each
    run spooled to ``<spool>/analysis`` until it is filed, so that nothing is lost when
    the catalog fails (``sync`` files it later; see ``spool.SpooledWriter``).
    ``max_array_size=0`` stores every array as an array node: TiledWriter keeps arrays
    of up to 16 elements in the SQL table by default, and those come back as strings,
    which would break small maps.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    from .spool import SpooledWriter

    spool = (default_spool() if spool is None else Path(spool)) / "analysis"
    return SpooledWriter(
        lambda: TiledWriter(client, batch_size=batch_size, max_array_size=0),
        spool, what="analysis run")


def sync(client, spool: str | os.PathLike | None = None, log=None) -> list[tuple[str, str]]:
    """Upload spooled runs; idempotent. Returns ``[(uid or file, what happened)]``.

    A run already complete in the catalog is not written again. A partial copy left by
    the outage is replaced. A file is renamed ``*.synced`` once its run is complete in
    the catalog, and kept (nothing is deleted). Files of runs still being written (or
    whose writer died mid-run) are reported and left alone.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    from . import spool as spooling

    spool = default_spool() if spool is None else Path(spool)
    done = []
    # raw runs first: an analysis run refers to its raw run
    for part in ("raw", "analysis"):
        for path in spooling.left_open(spool / part):
            done.append((path.name, "skipped: still being written, or its writer died "
                                    f"mid-run (rename it to {path.stem} to file it)"))
    paths = spooling.pending(spool / "raw") + spooling.pending(spool / "analysis")
    for path in paths:
        max_array_size = 0 if path.parent.name == "analysis" else 16
        start = next((d["doc"] for d in spooling.documents(path) if d["name"] == "start"),
                     None)
        if start is None:
            done.append((path.name, "skipped: no start document in the file"))
            continue
        uid = start["uid"]
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
        writer = TiledWriter(client, batch_size=1000, max_array_size=max_array_size)
        for d in spooling.documents(path):  # one at a time: a spooled run can be large
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

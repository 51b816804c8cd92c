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
import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import xarray as xr
from tiled.queries import Key

from . import layout


class CatalogError(RuntimeError):
    """The catalog cannot be reached or used; the message says what to check."""


@contextlib.contextmanager
def embedded(directory: str | os.PathLike = "xrdml-data", api_key: str | None = None):
    """Start an embedded Tiled server on 127.0.0.1 over ``directory`` (kept between runs:
    SQLite catalog + files). Yields ``(server, client)``; the server stops on exit."""
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    Path(directory).mkdir(parents=True, exist_ok=True)
    # always as a context manager: an exception before close() would hang the process
    with SimpleTiledServer(directory=directory, api_key=api_key) as server:
        yield server, from_uri(server.uri)


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
        raise CatalogError(
            f"could not open the Tiled catalog at {uri}: {type(err).__name__}: {err}. "
            "Check that the server is running and reachable, and that TILED_API_KEY "
            "holds a valid key for it."
        ) from None


# Events written per request. 1 makes every event visible at once but costs ~80 ms per
# 2048-point raw pattern and ~45 ms per result row on this 2-core machine (TiledWriter
# appends row by row); 10 keeps results visible within seconds at a tenth of the cost.
LIVE_BATCH = 10


def raw_writer(client, batch_size: int = LIVE_BATCH):
    """A ``TiledWriter`` for raw runs that makes events visible while the scan runs."""
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    return TiledWriter(client, batch_size=batch_size)


def analysis_writer(client, batch_size: int = LIVE_BATCH):
    """A ``TiledWriter`` for analysis runs.

    ``max_array_size=0`` stores every array as an array node: TiledWriter keeps arrays of
    up to 16 elements in the SQL table by default, and those come back as strings, which
    would break small maps.
    """
    from bluesky_tiled_plugins.writing.tiled_writer import TiledWriter

    return TiledWriter(client, batch_size=batch_size, max_array_size=0)


def analyses(client, raw_uid: str) -> list:
    """The analysis runs of raw run ``raw_uid``, newest first."""
    found = client.search(Key("start.xrdml.raw_uid") == raw_uid)
    runs = list(found.values())
    return sorted(runs, key=lambda r: r.metadata["start"]["time"], reverse=True)


def table(analysis_run, stream: str) -> pd.DataFrame:
    """A per-item stream (``peaks``, ``frames``, ``patterns``, ``errors``) as a DataFrame."""
    if stream not in analysis_run:
        return pd.DataFrame()
    node = analysis_run[stream]
    base = getattr(node, "base", node)
    parts = [base[k].read() for k in base if k.startswith("internal")]
    if not parts:
        return pd.DataFrame()
    df = pd.concat(parts, axis=1)
    keep = [c for c in df.columns if c != "time" and not c.startswith("ts_")]
    return df[keep].sort_values("seq_num").drop(columns="seq_num").reset_index(drop=True)


def verify(analysis_run) -> dict:
    """Streams whose stored rows differ from the count in the stop document:
    ``{stream: (expected, stored)}``; empty when everything arrived."""
    stop = analysis_run.metadata.get("stop") or {}
    missing = {}
    for stream, expected in (stop.get("num_events") or {}).items():
        node = analysis_run[stream]
        base = getattr(node, "base", node)
        tables = [k for k in base if k.startswith("internal")]
        stored = len(base[tables[0]].read()) if tables else 0
        if stored != expected:
            missing[stream] = (expected, stored)
    return missing


def peaks(analysis_run) -> pd.DataFrame:
    """The Bragg-peak table: frame, row, col, row_std, col_std, intensity, method, flag."""
    return table(analysis_run, layout.PEAKS)


def maps(analysis_run, stream: str = layout.MAPS) -> xr.Dataset:
    """The maps of an analysis run as an ``xarray.Dataset``.

    Dimensions are the scan's motors (outer first) for maps and ``row``/``col`` (mm) for
    XRD-CT images; coordinates come from the measured motor positions.
    """
    if stream not in analysis_run:
        raise KeyError(f"analysis run {analysis_run.metadata['start']['uid']} has no "
                       f"{stream!r} stream (it has: {list(analysis_run)})")
    node = analysis_run[stream]
    base = getattr(node, "base", node)
    data_keys = node.descriptors[0]["data_keys"]
    arrays = {k: np.asarray(base[k].read())[-1] for k in data_keys}
    dims = {k: tuple(v["dims"]) for k, v in data_keys.items()}
    coords = {k: (dims[k], arrays[k]) for k in arrays if dims[k] == (k,)}
    variables = {k: (dims[k], arrays[k], {"units": data_keys[k].get("units", "")})
                 for k in arrays if k not in coords}
    start = analysis_run.metadata["start"]
    return xr.Dataset(variables, coords=coords, attrs={
        "analysis_uid": start["uid"], "raw_uid": start["xrdml"]["raw_uid"]})

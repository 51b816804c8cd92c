"""Archived runs in Tiled, read back as Bluesky documents and data.

One reader serves both ways of re-analysing a run:

- ``replay`` (``plans/replay.py``) re-emits the data through a RunEngine as a new run;
- ``documents`` rebuilds the original documents client-side, to push straight into a
  callback without a RunEngine (bulk reprocessing). It does not need the server's
  ``application/json-seq`` exporter, which facility servers may not register.

Arrays (inline or external, e.g. HDF5 registered by TiledWriter) are read in chunks.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass

import numpy as np

CHUNK = 64  # events read per request for array data


@dataclass
class ArchivedStream:
    name: str
    descriptor: dict  # the (first) descriptor document, rebuilt by bluesky-tiled-plugins
    table: object  # pandas DataFrame of the internal table: seq_num, time, scalars, ts_*
    arrays: dict  # data key -> tiled array client (first axis = event)

    @property
    def n_events(self) -> int:
        return len(self.table)

    def chunks(self, size: int = CHUNK):
        """Yield ``(rows, data, timestamps)`` per chunk: ``rows`` the table slice,
        ``data``/``timestamps`` dicts of per-key lists for every data key."""
        keys = list(self.descriptor["data_keys"])
        for lo in range(0, self.n_events, size):
            rows = self.table.iloc[lo:lo + size]
            data, stamps = {}, {}
            for key in keys:
                if key in self.arrays:
                    block = np.asarray(self.arrays[key][lo:lo + size])
                    data[key] = list(block)
                elif key in rows:
                    data[key] = rows[key].tolist()
                else:
                    data[key] = [None] * len(rows)
                ts = f"ts_{key}"
                stamps[key] = rows[ts].tolist() if ts in rows else rows["time"].tolist()
            yield rows, data, stamps


class ArchivedRun:
    """A Bluesky run in Tiled (a ``BlueskyRun`` client node), ready to replay."""

    def __init__(self, run):
        self.node = run
        self.start = dict(run.metadata["start"])
        self.stop = dict(run.metadata.get("stop") or {})
        self.streams: list[ArchivedStream] = []
        for name in run:
            stream = run[name]
            base = getattr(stream, "base", stream)
            table = stream_table(stream)
            arrays = {k: base[k] for k in base if not k.startswith("internal")}
            (descriptor, *_) = stream.descriptors
            self.streams.append(ArchivedStream(name, dict(descriptor), table, arrays))

    @property
    def uid(self) -> str:
        return self.start["uid"]

    @property
    def n_events(self) -> int:
        return sum(s.n_events for s in self.streams)

    def documents(self, chunk: int = CHUNK):
        """The run's documents as it was recorded: start, descriptors, event pages (in
        time order across streams, one page per chunk), stop. Pages are read from the
        catalog as they are asked for: at most one chunk per stream is held at a time."""
        yield "start", copy.deepcopy(self.start)
        for s in self.streams:
            yield "descriptor", _clean_descriptor(s.descriptor, self.uid)
        for _, _, page in heapq.merge(*(self._pages(i, s, chunk)
                                        for i, s in enumerate(self.streams))):
            yield "event_page", page
        if self.stop:
            yield "stop", copy.deepcopy(self.stop)

    @staticmethod
    def _pages(index: int, s: ArchivedStream, chunk: int):
        """``(time of the first event, stream index, page)`` per chunk of a stream."""
        for rows, data, stamps in s.chunks(chunk):
            times = rows["time"].tolist()
            yield (times[0] if times else 0.0), index, {
                "descriptor": s.descriptor["uid"],
                "uid": [f"{s.descriptor['uid']}-{n}" for n in rows["seq_num"]],
                "seq_num": rows["seq_num"].astype(int).tolist(),
                "time": times,
                "data": data, "timestamps": stamps,
                "filled": {},
            }


def primary_stream(client, uid: str, where: str = "the catalog"):
    """``(ArchivedRun, its 'primary' ArchivedStream, the descriptor's configuration values
    merged over devices)`` of run ``uid``; ValueError saying what is missing."""
    try:
        run = ArchivedRun(client[uid])
    except KeyError:
        raise ValueError(f"no run {uid!r} in the catalog at {where}") from None
    stream = next((s for s in run.streams if s.name == "primary"), None)
    if stream is None:
        raise ValueError(f"run {uid} has no 'primary' stream")
    config = {}
    for obj in (stream.descriptor.get("configuration") or {}).values():
        config.update((obj or {}).get("data", {}))
    return run, stream, config


def stream_table(stream):
    """A stream's scalar data as one DataFrame sorted by ``seq_num``: TiledWriter's
    ``internal`` table (split into ``internal_0``, ``internal_1``, ... when wide)."""
    import pandas as pd

    base = getattr(stream, "base", stream)
    tables = [k for k in base if k.startswith("internal")]
    if not tables:
        return pd.DataFrame({"seq_num": [], "time": []})
    df = pd.concat([base[t].read() for t in tables], axis=1)
    df = df.loc[:, ~df.columns.duplicated()]
    return df.sort_values("seq_num").reset_index(drop=True)


def _clean_descriptor(descriptor: dict, run_start: str) -> dict:
    doc = {k: v for k, v in copy.deepcopy(descriptor).items() if not k.startswith("_")}
    doc["run_start"] = run_start
    if "object_keys" not in doc:
        objects: dict[str, list] = {}
        for key, dk in doc.get("data_keys", {}).items():
            objects.setdefault(dk.get("object_name", key), []).append(key)
        doc["object_keys"] = objects
    return doc

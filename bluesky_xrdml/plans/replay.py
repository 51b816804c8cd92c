"""Replay an archived run through the RunEngine, as a new run with the same data.

``RE(replay(client[uid]))`` re-emits every stream of the archived run, event by event in
the original time order, through playback devices: one per object of the original run
(a detector, a motor), with its data keys and configuration (a powder detector's 2θ axis
and wavelength come along). Arrays are re-emitted inline, external ones included. The
new run's start document carries the original's metadata, ``replay_of`` (its uid) and
``replay_of_plan`` (its plan name), and ``plan_name="xrdml_replay"``: a replay filed in a
catalog is never mistaken for a raw run.
"""

from __future__ import annotations

import copy
import heapq

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from ..archive import ArchivedRun

DROPPED = ("uid", "time", "scan_id")  # the RunEngine gives the new run its own
REPLAY_PLAN_NAME = "xrdml_replay"


class PlaybackDevice:
    """A readable, configurable object that returns archived values (bluesky protocols)."""

    def __init__(self, name: str, data_keys: dict, configuration: dict | None):
        self.name = name
        self.parent = None
        self._data_keys = {}
        for key, dk in data_keys.items():
            dk = {k: v for k, v in dk.items() if k not in ("external", "object_name")}
            self._data_keys[key] = dk
        self._config = configuration or {}
        self._reading: dict = {}

    def load(self, values: dict, stamps: dict) -> None:
        self._reading = {k: {"value": values[k], "timestamp": stamps[k]} for k in self._data_keys}

    def describe(self):
        return copy.deepcopy(self._data_keys)

    def read(self):
        return self._reading

    def describe_configuration(self):
        return copy.deepcopy(self._config.get("data_keys", {}))

    def read_configuration(self):
        data, stamps = self._config.get("data", {}), self._config.get("timestamps", {})
        return {k: {"value": v, "timestamp": stamps.get(k, 0.0)} for k, v in data.items()}


def _devices(stream) -> list[PlaybackDevice]:
    desc = stream.descriptor
    objects = desc.get("object_keys") or {}
    if not objects:
        for key, dk in desc["data_keys"].items():
            objects.setdefault(dk.get("object_name", key), []).append(key)
    config = desc.get("configuration") or {}
    return [PlaybackDevice(obj, {k: desc["data_keys"][k] for k in keys}, config.get(obj))
            for obj, keys in objects.items()]


def _rows(index: int, stream, chunk: int):
    for rows, data, stamps in stream.chunks(chunk):
        for i, t in enumerate(rows["time"].tolist()):
            yield (t, index, {k: v[i] for k, v in data.items()},
                   {k: v[i] for k, v in stamps.items()})


def replay(run, md=None, *, chunk: int = 64):
    """Plan: re-emit archived run ``run`` (a tiled BlueskyRun node or an ``ArchivedRun``).

    Returns the new run's uid. Subscribe ``XRDMLCallback`` to analyse it exactly as the
    live scan was analysed; its analysis run links to the original uid.
    """
    archived = run if isinstance(run, ArchivedRun) else ArchivedRun(run)
    _md = {k: v for k, v in archived.start.items() if k not in DROPPED}
    # marked as a replay, so that searches for raw runs by plan name never pick it up
    _md["replay_of"] = archived.uid
    _md["replay_of_plan"] = archived.start.get("plan_name")
    _md["plan_name"] = REPLAY_PLAN_NAME
    _md.update(md or {})
    devices = [_devices(s) for s in archived.streams]
    names = [s.name for s in archived.streams]
    merged = heapq.merge(*(_rows(i, s, chunk) for i, s in enumerate(archived.streams)),
                         key=lambda row: (row[0], row[1]))

    @bpp.run_decorator(md=_md)
    def inner():
        for _, index, values, stamps in merged:
            yield from bps.create(name=names[index])
            for dev in devices[index]:
                dev.load(values, stamps)
                yield from bps.read(dev)
            yield from bps.save()

    return (yield from inner())

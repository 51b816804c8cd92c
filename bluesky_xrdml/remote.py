"""Analysis off the acquisition machine: documents over bluesky's 0MQ proxy.

The acquisition side subscribes bluesky's own ``Publisher`` with our wire format::

    RE.subscribe(remote.publisher("proxy-host:5577"))

bluesky's proxy (``bluesky-0MQ-proxy --in-address 0.0.0.0:5577 --out-address
0.0.0.0:5578``) fans the stream out, and the analysis side
(``xrdml worker --zmq proxy-host:5578 --catalog URI``) is bluesky's ``RemoteDispatcher``
feeding the same ``XRDMLCallback`` as a live or replayed scan.

On the wire: msgpack, with numpy arrays as an extension type (dtype string, shape, raw
bytes). Nothing is ever unpickled: bluesky's default serializer is pickle, and
``msgpack-numpy`` unpickles object arrays, so neither is used. A message the worker
cannot decode is logged, counted and dropped; the worker carries on.

0MQ publishing never blocks: when nobody listens, or a listener falls behind, messages
are dropped rather than stall the scan. What the worker could not see is recorded: a
run whose start it missed is logged with the ``xrdml reprocess`` command that analyses
it from the catalog; events missing from a run it did see are counted against the raw
stop document's ``num_events`` and recorded in the analysis run (stop reason and
``errors`` stream).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid

import msgpack
import numpy as np
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
from bluesky.run_engine import DocumentNames

logger = logging.getLogger(__name__)

NDARRAY = 1  # msgpack extension type code of a numpy array


class DecodeError(ValueError):
    """A message that is not a document in our wire format."""


# --- wire format ---------------------------------------------------------------------
def _array_bytes(arr: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array, without copying them."""
    return memoryview(arr.reshape(-1).view(np.uint8))


def _default(obj, inner=None):
    """msgpack's hook for what it cannot pack itself: arrays as extension type
    ``NDARRAY`` holding the msgpack of ``[dtype string, shape, raw bytes]``, numpy
    scalars as Python numbers. ``inner``: a reused ``msgpack.Packer`` for that payload."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("object arrays cannot be sent; convert them to lists first")
        arr = np.ascontiguousarray(obj)  # (1-D for a 0-D array: the shape is obj's)
        payload = [arr.dtype.str, list(obj.shape), _array_bytes(arr)]
        return msgpack.ExtType(NDARRAY, inner.pack(payload) if inner is not None else
                               msgpack.packb(payload, use_bin_type=True))
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__} in a document")


def _ext_hook(code, data):
    if code != NDARRAY:
        raise DecodeError(f"unknown msgpack extension type {code}")
    dtype, shape, buf = msgpack.unpackb(data, raw=False)
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise DecodeError("object arrays are not accepted")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def pack(doc: dict) -> bytes:
    """A document as msgpack bytes (numpy arrays and scalars included)."""
    return msgpack.packb(doc, default=_default, use_bin_type=True)


def unpack(data: bytes) -> dict:
    """The document in ``data``; ``DecodeError`` if it is not one."""
    try:
        doc = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except DecodeError:
        raise
    except Exception as err:
        raise DecodeError(f"not msgpack: {type(err).__name__}: {err}") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"a document is a map, not {type(doc).__name__}")
    return doc


class MsgpackPublisher(Publisher):
    """bluesky's ``Publisher`` speaking ``pack``'s msgpack, built to cost the RunEngine
    as little as possible. The wire format is bluesky's (one 0MQ message
    ``prefix name document`` per document), so bluesky's proxy and ``RemoteDispatcher``
    take it unchanged.

    - No defensive deep copy of every document: each document is packed when it is
      emitted (the bytes are the snapshot), with reused msgpack packers and arrays
      packed from their own memory.
    - Sends are batched. Sending one 0MQ message wakes 0MQ's I/O thread, and a wake-up
      per document cost the RunEngine's thread more than the packing. Messages are
      held for ``batch_interval`` seconds and then sent together, from the RunEngine's
      own event loop (``loop.call_later``; a device that blocks the loop delays them):
      the socket is only ever used by that one thread, the scan never waits, and there
      is no thread to hand the GIL to.
      A run's ``stop`` document, ``flush()``, ``close()`` and ``batch_size`` messages
      waiting send at once; ``batch_interval=0``, or a call from outside an asyncio
      event loop (not from a RunEngine), sends every document at once.

    0MQ's ``PUB`` socket never blocks: with nobody listening, or a listener more than
    its high-water mark behind, messages are dropped (the worker accounts for them).
    """

    def __init__(self, address, *, prefix: bytes = b"", batch_interval: float = 0.05,
                 batch_size: int = 256, **kwargs):
        kwargs.setdefault("serializer", pack)
        super().__init__(address, prefix=prefix, **kwargs)
        self.batch_interval, self.batch_size = float(batch_interval), int(batch_size)
        inner = msgpack.Packer(use_bin_type=True)
        self._packer = msgpack.Packer(default=lambda obj: _default(obj, inner),
                                      use_bin_type=True, autoreset=False)
        self._pending: list[bytes] = []
        self._timer = None
        self._lock = threading.RLock()  # the socket and the batch: one thread at a time
        self.sent = 0  # messages handed to 0MQ

    def message(self, name: str, doc: dict) -> bytes:
        """The 0MQ message of one document: ``prefix name msgpack``, space-separated."""
        if self._serializer is not pack:  # a serializer of the caller's
            return b" ".join([self._prefix, name.encode(), self._serializer(doc)])
        packer = self._packer
        try:
            packer.pack(doc)
            return b" ".join([self._prefix, name.encode(), packer.getbuffer()])
        finally:
            packer.reset()

    def __call__(self, name, doc):
        message = self.message(name, doc)
        with self._lock:
            self._pending.append(message)
            if (self.batch_interval <= 0 or name == "stop"
                    or len(self._pending) >= self.batch_size):
                self.flush()
            elif self._timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # not called from an event loop: nobody would flush
                    self.flush()
                else:
                    self._timer = loop.call_later(self.batch_interval, self.flush)

    def flush(self) -> None:
        """Send every message waiting, now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            pending, self._pending = self._pending, []
            if self._socket.closed:
                return
            send = self._socket.send
            for message in pending:
                send(message)
            self.sent += len(pending)

    def close(self):
        self.flush()
        with self._lock:
            super().close()


def publisher(address: str, prefix: bytes = b"", batch_interval: float = 0.05) -> Publisher:
    """bluesky's ``Publisher`` to a 0MQ proxy at ``"HOST:PORT"``, speaking msgpack.

    ``RE.subscribe(publisher("localhost:5577"))``. Sending never blocks the RunEngine;
    documents leave in batches ``batch_interval`` seconds after they were emitted, a
    run's stop document at once (``MsgpackPublisher``).
    """
    return MsgpackPublisher(address, prefix=prefix, batch_interval=batch_interval)


# --- receiving -------------------------------------------------------------------------
class _CheckedSocket:
    """Wraps the dispatcher's 0MQ socket: ``recv`` returns only well-formed messages
    (``prefix name doc`` with a known document name and a decodable document) and counts
    and logs the others."""

    def __init__(self, socket, owner: CheckedDispatcher):
        self._socket = socket
        self._owner = owner

    def __getattr__(self, name):
        return getattr(self._socket, name)

    async def recv(self, *args, **kwargs):
        while True:
            message = await self._socket.recv(*args, **kwargs)
            problem = self._owner.check(message)
            if problem is None:
                return message
            self._owner.reject(message, problem)


class CheckedDispatcher(RemoteDispatcher):
    """bluesky's ``RemoteDispatcher`` with our decoder, which rejects (logs and counts
    in ``rejected``) every message it cannot use instead of stopping or printing: not
    three space-separated parts, an unknown document name (bluesky's dispatcher would
    raise ``KeyError`` and stop), or a body that is not a msgpack document."""

    def __init__(self, address, prefix: bytes = b"", **kwargs):
        super().__init__(address, prefix=prefix, deserializer=unpack, **kwargs)
        self.rejected = 0
        self.received = 0

    async def _poll(self):
        self._socket = _CheckedSocket(self._socket, self)
        return await super()._poll()

    def check(self, message: bytes) -> str | None:
        parts = message.split(b" ", 2)
        if len(parts) != 3:
            return "not 'prefix name document'"
        prefix, name, body = parts
        if self._prefix and prefix != self._prefix:
            return None  # someone else's stream; the dispatcher ignores it
        try:
            name = name.decode()
        except UnicodeDecodeError:
            return "document name is not UTF-8"
        if name not in DocumentNames.__members__:
            return f"unknown document name {name[:40]!r}"
        try:
            unpack(body)
        except DecodeError as err:
            return f"{name} document: {err}"
        self.received += 1
        return None

    def reject(self, message: bytes, problem: str) -> None:
        self.rejected += 1
        logger.error("xrdml worker: rejected message #%d (%d bytes): %s", self.rejected,
                     len(message), problem)


class RunTracker:
    """In front of the callback: passes on the documents of runs whose start the worker
    saw, and keeps account of the rest.

    A run whose start was missed (the worker started, restarted or reconnected after it
    began) is logged, with the command that analyses it from the catalog, and its
    documents are dropped. Events of a run that was seen but went missing are not this
    class's business: the analysis run counts them against the raw stop document.
    """

    def __init__(self, downstream, reprocess_hint: str = ""):
        self.downstream = downstream
        self.hint = reprocess_hint
        self.open: dict[str, dict] = {}  # run uid -> start document, stop not seen yet
        self.descriptors: dict[str, str] = {}  # descriptor uid -> run uid
        self.resources: dict[str, str] = {}  # (stream_)resource uid -> run uid
        self.missed_runs: dict[str, int] = {}  # run uid -> documents dropped
        self.orphans = 0  # events/datums whose descriptor never arrived
        self.events = 0  # events received of runs that were seen
        self.first_event: dict[str, float] = {}  # run uid -> when its first event came
        self.run_events: dict[str, int] = {}  # run uid -> events received
        self.finished = 0

    def __call__(self, name, doc):
        run = self._run_of(name, doc)
        if run is None:
            return
        if name in ("event", "event_page"):
            n = 1 if name == "event" else len(doc["seq_num"])
            self.events += n
            self.run_events[run] = self.run_events.get(run, 0) + n
            self.first_event.setdefault(run, time.monotonic())
        if name == "stop":
            self.open.pop(run, None)
            self.finished += 1
            self.descriptors = {d: r for d, r in self.descriptors.items() if r != run}
            self.resources = {d: r for d, r in self.resources.items() if r != run}
        self.downstream(name, doc)

    def _run_of(self, name, doc) -> str | None:
        if name == "start":
            self.open[doc["uid"]] = doc
            return doc["uid"]
        if name == "descriptor":
            run = doc.get("run_start")
            if run in self.open:
                self.descriptors[doc["uid"]] = run
                return run
            return self._missed(run)
        if name in ("resource", "stream_resource"):
            run = doc.get("run_start")
            if run in self.open or (run is None and self.open):
                run = run or next(reversed(self.open))
                self.resources[doc["uid"]] = run
                return run
            return self._missed(run)
        if name in ("event", "event_page", "stream_datum"):
            run = self.descriptors.get(doc.get("descriptor"))
        elif name in ("datum", "datum_page"):
            run = self.resources.get(doc.get("resource"))
        elif name == "stop":
            run = doc.get("run_start")
            if run not in self.open:
                self._missed(run, complete=True)
                return None
        else:
            return None
        if run is None:
            self.orphans += 1
        return run

    def _missed(self, run, complete: bool = False):
        if run is None:
            return None
        first = run not in self.missed_runs
        self.missed_runs[run] = self.missed_runs.get(run, 0) + 1
        if first or complete:
            when = ("it has ended; analyse it from the catalog" if complete else
                    "its documents are ignored; once it has ended, analyse it from the catalog")
            logger.warning("xrdml worker: missed the start of run %s (the worker started or "
                           "reconnected after it began): %s with `xrdml reprocess %s%s`",
                           run, when, run, self.hint)
        return None

    def interrupt(self, why: str) -> list[str]:
        """Close every open run with a stop saying it was interrupted; returns their uids."""
        closed = []
        for run in list(self.open):
            self(
                "stop",
                {"uid": str(uuid.uuid4()), "time": time.time(), "run_start": run,
                 "exit_status": "abort",
                 "reason": f"interrupted: {why} before the raw run ended; analyse the whole "
                           f"run with `xrdml reprocess {run}{self.hint}`"})
            closed.append(run)
        return closed


class RemoteWorker:
    """The long-running analysis service behind ``xrdml worker``.

    ``address``: the proxy's output (``HOST:PORT``); ``client``: a tiled client the
    analysis runs are filed in; ``callback``: an ``XRDMLCallback`` (default: every
    analysis, shipped weights or ``models``, detector files found through ``root_map``
    ``{folder on the acquisition side: where it is mounted here}``). ``run()`` blocks
    until SIGTERM/SIGINT, then closes the run in progress and waits until everything is
    filed.
    """

    def __init__(self, address: str, client, *, callback=None, models=None, root_map=None,
                 catalog_uri: str = "", report_every: float = 60.0, spool=None, log=None):
        from . import catalog
        from .callbacks import XRDMLCallback
        from .models.device import select_device

        self.address = address
        self.device = select_device("auto")
        self.cb = callback or XRDMLCallback(models=models, root_map=root_map)
        self.root_map = dict(root_map or {})
        self.cb.config["source"] = f"0MQ {address}"
        self.cb.subscribe(catalog.analysis_writer(client, spool=spool), background=True)
        self._raw_of: dict[str, str] = {}
        self.cb.subscribe(self._on_analysis)
        self.catalog = catalog_uri.split("?")[0]  # never the key
        hint = f" --catalog {self.catalog}" if catalog_uri else ""
        self.tracker = RunTracker(self.cb, hint)
        self.dispatcher = CheckedDispatcher(address)
        self.dispatcher.subscribe(self.tracker)
        self.report_every = report_every
        self.log = log or (lambda msg: logger.warning("%s", msg))
        self._signal = None
        self._t0 = time.monotonic()
        self._last = (self._t0, 0, 0)

    def describe(self) -> str:
        models = ", ".join(f"{m['name']} {m.get('version') or ''}".strip()
                           for a in self.cb.analyses for m in getattr(a, "models", []))
        return (f"xrdml worker: device {self.device}; models: {models or 'classical only'}; "
                f"{self.model_throughput()}; listening on "
                f"tcp://{self.address.split('://')[-1]}; filing to {self.catalog or 'Tiled'}"
                + "".join(f"; detector files under {old} read from {new}"
                          for old, new in self.root_map.items()))

    def model_throughput(self, n: int = 2048) -> str:
        """BraggNN patches/s on this device, measured now (it also warms the device up)."""
        model = next((a.model for a in self.cb.analyses
                      if getattr(a, "name", "") == "bragg-peaks" and a.model is not None), None)
        if model is None:
            return "no BraggNN"
        patches = np.random.default_rng(0).poisson(50, (n, 11, 11)).astype("float32")
        model.predict(patches[:64])
        t0 = time.perf_counter()
        model.predict(patches)
        return f"BraggNN {n / (time.perf_counter() - t0):.0f} patches/s"

    def throughput(self) -> str:
        now = time.monotonic()
        t, events, analysed = self._last
        done = self.cb.stats.processed
        self._last = (now, self.tracker.events, done)
        dt = max(now - t, 1e-9)
        return (f"xrdml worker: device {self.device}; {(self.tracker.events - events) / dt:.1f} "
                f"events/s received, {(done - analysed) / dt:.1f} documents/s analysed over the "
                f"last {dt:.0f} s; in all {self.tracker.events} events, "
                f"{self.tracker.finished} runs done, {len(self.tracker.open)} open, "
                f"{len(self.tracker.missed_runs)} missed, {self.dispatcher.rejected} "
                f"message(s) rejected, queue stalls {self.cb.stats.stalls}")

    def _report(self):
        self.log(self.throughput())
        self.dispatcher.loop.call_later(self.report_every, self._report)

    def _on_signal(self, signum):
        self._signal = signal.Signals(signum).name
        task = self.dispatcher._task
        if task is not None:
            task.cancel()

    def run(self) -> int:
        import asyncio

        loop = self.dispatcher.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.call_later(self.report_every, self._report)
        self.log(self.describe())
        try:
            self.dispatcher.start()
        except (asyncio.CancelledError, KeyboardInterrupt):
            pass
        return self.finish(f"the xrdml worker was stopped ({self._signal or 'interrupted'})")

    def finish(self, why: str) -> int:
        closed = self.tracker.interrupt(why)
        for run in closed:
            self.log(f"xrdml worker: run {run} interrupted; its analysis run says so")
        self.cb.wait()
        self.log(self.throughput())
        return 0

    def _on_analysis(self, name, doc):
        """Logs each analysis run as it ends: status, reason, events/s since its first event."""
        if name == "start":
            self._raw_of[doc["uid"]] = doc.get("xrdml", {}).get("raw_uid")
        elif name == "stop":
            raw = self._raw_of.pop(doc["run_start"], None)
            events = self.tracker.run_events.pop(raw, 0)
            seconds = time.monotonic() - self.tracker.first_event.pop(raw, time.monotonic())
            self.log(f"xrdml worker: raw run {raw} -> analysis run {doc['run_start']} "
                     f"{doc['exit_status']}: {events} events analysed in {seconds:.1f} s "
                     f"({events / max(seconds, 1e-9):.1f} events/s); {doc.get('reason', '')}")

"""The inference worker: a bounded queue drained by one thread that batches.

The RunEngine thread only ``submit``s. When the queue is full, ``submit`` blocks until
there is room (nothing is dropped) and the stall is counted and timed.
Consecutive data items for the same run and data key are handed over together, so an
analysis sees batches (up to ``batch_size``) whenever the scan outpaces it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    submitted: int = 0
    processed: int = 0
    batches: int = 0
    stalls: int = 0  # submits that found the queue full and had to wait
    stall_seconds: float = 0.0
    max_batch: int = 0


class BackgroundSink:
    """Runs a document sink on its own thread, so a slow or unreachable destination (a
    Tiled server retrying for tens of seconds) never holds up the analysis or the scan.

    The thread and its queue are bluesky's own ``BufferingWrapper``; this adds what the
    callback needs on top: ``join()`` waits until every document so far was handed over,
    ``errors`` counts the documents the sink failed on (logged too), ``close()`` stops the
    thread once the queue is drained.
    """

    def __init__(self, sink, name: str = "xrdml-sink"):
        from bluesky.callbacks.buffer import BufferingWrapper

        self.sink = sink
        self.name = name
        self.errors = 0
        self._pending = 0
        self._done = threading.Condition()
        self._buffer = BufferingWrapper(self._deliver)

    def __call__(self, name, doc):
        with self._done:
            self._pending += 1
        self._buffer(name, doc)

    def _deliver(self, name, doc):
        try:
            self.sink(name, doc)
        except Exception:
            self.errors += 1
            logger.exception("xrdml: sink %r failed on a %r document", self.sink, name)
        finally:
            with self._done:
                self._pending -= 1
                self._done.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every document received so far is handed over; False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Hand over what is queued (up to ``timeout``), then stop the thread."""
        drained = self.join(timeout)
        self._buffer.shutdown(wait=drained)
        return drained


# the analysis uses the CPU the acquisition leaves idle: its thread, and the threads its
# numerical libraries start from it (OpenMP/BLAS teams inherit it), run at this niceness
WORKER_NICENESS = 10


def _yield_to_acquisition() -> None:
    """Lower the calling thread's scheduling priority (Linux: per thread) so that the
    RunEngine's thread gets a core at once when a detector's exposure ends. Without it,
    torch's intra-op threads fill both cores of a 2-core machine and the scan waits for
    them (long_scan: 1.14-1.20× the scan time for powder patterns; 1.03× with them niced)."""
    import os

    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(current, WORKER_NICENESS))
    except OSError:  # not permitted here: the analysis runs at the process's priority
        pass


def _join(q: queue.Queue, timeout: float | None) -> bool:
    if timeout is None:
        q.join()
        return True
    deadline = time.monotonic() + timeout
    while q.unfinished_tasks:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


_CLOSE = "close"  # the op that ends the worker's thread


class Worker:
    """Runs ``owner.handle(op, payload)`` and ``owner.process(key, payloads)`` in a thread.

    Queue items are ``(owner, op, key, payload)``; items with ``op == "data"`` are batched
    by ``(owner, key)``, everything else runs alone and in order.
    """

    def __init__(self, maxsize: int = 256, batch_size: int = 64):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.batch_size = batch_size
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._loop, name="xrdml-worker", daemon=True)
        self._thread.start()

    def submit(self, owner, op: str, key=None, payload=None) -> None:
        item = (owner, op, key, payload)
        self.stats.submitted += 1
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.stats.stalls += 1
            t0 = time.perf_counter()
            self.queue.put(item)
            waited = time.perf_counter() - t0
            self.stats.stall_seconds += waited
            if self.stats.stalls == 1 or self.stats.stalls % 100 == 0:  # not once per event
                logger.warning("analysis queue full: the scan waited %.3f s for the analysis "
                               "(%d stalls, %.1f s in all so far)", waited, self.stats.stalls,
                               self.stats.stall_seconds)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is processed; False on timeout."""
        return _join(self.queue, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Process what is queued, then stop the thread; False if it was still busy after
        ``timeout`` seconds (it then stops after the item in hand)."""
        self.queue.put((None, _CLOSE, None, None))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _take(self) -> list:
        items = [self.queue.get()]
        while len(items) < self.batch_size:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        _yield_to_acquisition()
        while True:
            items = self._take()
            i = 0
            while i < len(items):
                owner, op, key, payload = items[i]
                j = i + 1
                if op == _CLOSE:
                    for _ in items[i:]:  # nothing is submitted after close
                        self.queue.task_done()
                    return
                if op == "data":
                    while j < len(items) and items[j][:3] == (owner, op, key):
                        j += 1
                    payloads = [it[3] for it in items[i:j]]
                    self.stats.batches += 1
                    self.stats.max_batch = max(self.stats.max_batch, len(payloads))
                    self._run(owner.process, key, payloads)
                else:
                    self._run(owner.handle, op, payload)
                self.stats.processed += j - i
                for _ in range(j - i):
                    self.queue.task_done()
                i = j

    @staticmethod
    def _run(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # the owner records its own errors; this is the last line of defence
            logger.exception("xrdml worker: unhandled error in %s", getattr(fn, "__qualname__", fn))

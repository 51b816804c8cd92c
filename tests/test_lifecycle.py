"""The callback's threads: sinks run in the background by default, and ``close()`` (or
leaving a ``with`` block) hands everything over and stops every thread."""

import threading
import time

import bluesky.plans as bp


def test_closing_hands_everything_over_then_stops_every_thread(RE, beamline, collector):
    from bluesky_xrdml.callbacks import XRDMLCallback

    before = threading.active_count()
    on_sink_thread = []

    def slow_sink(name, doc):  # a catalog that takes its time
        time.sleep(0.02)
        on_sink_thread.append(threading.current_thread().name)
        collector(name, doc)

    with XRDMLCallback() as cb:
        cb.subscribe(slow_sink)
        RE.subscribe(cb)
        RE(bp.count([beamline.powder], num=5))
    # leaving the block waited for the analysis and for the slow sink
    assert [n for n, _ in collector][0] == "start" and collector[-1][0] == "stop"
    assert collector[-1][1]["exit_status"] == "success"
    assert len(collector.stream("patterns")) == 5
    assert "xrdml-worker" not in set(on_sink_thread)  # the sink had a thread of its own
    assert not cb.worker._thread.is_alive()
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before

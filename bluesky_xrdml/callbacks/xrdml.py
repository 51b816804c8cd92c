"""``XRDMLCallback``: subscribe it to a RunEngine and every run gets an analysis run.

Built on event-model's ``RunRouter``: one ``RunAnalysis`` per raw run. The callback
only queues documents; a worker thread analyses and composes the analysis run, whose
documents go to every sink subscribed with ``cb.subscribe(sink)`` (a ``TiledWriter``,
a live plot, a 0MQ publisher, a list's ``append``).

Nothing the analysis does can abort the user's scan: errors in routing, analyses and
sinks are logged, counted and recorded in the analysis run.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

from event_model import RunRouter

from ..external import ExternalReader
from .integration import PowderIntegration
from .registry import default_analyses, resolve_analyses
from .run import RunAnalysis
from .worker import BackgroundSink, Worker

logger = logging.getLogger(__name__)


class XRDMLCallback(RunRouter):
    """Live analysis of diffraction data.

    Parameters
    ----------
    analyses : list, optional
        Analysis objects (``BraggPeaks``, ``RoiIntensities``, ``PhaseQuantification``, or
        your own with ``match``/``streams``/``analyze``/``finish``) or their names
        (``"bragg-peaks"``, ``"roi"``, ``"pqnet"``; unknown names are refused with the
        list); by default every one available: Bragg peaks on 2D frames, ROI intensities
        and PQ-Net on 1D powder patterns.
    rois, phases :
        Shortcuts for the default ROI analysis: explicit ``Roi`` windows, or phases
        (name -> pymatgen ``Structure``) whose strongest free reflection becomes a ROI.
    models : dict, optional
        Your own weights for the default analyses' models, e.g.
        ``{"braggnn": "my-braggnn.safetensors", "pqnet": "my-phases.safetensors"}``; the
        shipped weights otherwise.
    queue_size : int
        Bound of the queue between the RunEngine and the worker. When full, the
        RunEngine waits (counted in ``stats.stalls``); nothing is dropped.
    batch_size : int
        Most items the worker hands to an analysis at once.
    handler_registry : dict, optional
        spec -> handler class for old-style ``resource``/``datum`` external data, added to
        the defaults (``AD_HDF5``, ``AD_HDF5_SWMR``, ``AD_TIFF`` from
        area-detector-handlers, ``NPY_SEQ`` from ophyd). Frames are read from their files
        on the worker thread (``bluesky_xrdml.external.ExternalReader``), never on the
        RunEngine's; ``stream_resource``/``stream_datum`` data are read by mimetype.
    root_map : dict, optional
        Resource ``root`` -> where those files are on this machine.
    external_timeout : float
        Seconds a frame whose file is missing or not yet flushed is retried before it is
        recorded as an error (the analysis run then ends with ``exit_status="fail"``).
    calibrations : dict, optional
        2D data key -> pyFAI calibration (a PONI file path, a dict of PONI values or an
        integrator). Such keys are azimuthally integrated (stream ``integrated``) and the
        patterns go to the 1D analyses (ROI, PQ-Net) instead of the Bragg-peak analysis.
        A ``*poni`` entry in a detector's configuration does the same. ``integration=``
        takes a ``PowderIntegration`` to set the 2θ grid (``npt``, ``radial_range``).
    frame_time_limit : float or None
        Seconds of analysis a frame may take (default 30). Checked between frames (Python
        cannot stop a computation midway): the Bragg-peak analysis cuts off a frame whose
        peak finding alone took longer, and once a batch has used the limit × its frames,
        its remaining frames are not analysed. Each is recorded as an error saying so,
        and the analysis run ends with ``exit_status="fail"``. None: no limit.
    positions : list of str, optional
        For plans that name no ``motors`` in their start document (fly scans, your own
        plans): the data keys of the sample positions the events carry, e.g.
        ``["sample_x", "sample_y"]``. Maps are then made per point at those positions
        (two or more keys). Without it, the fields of the start's
        ``hints["dimensions"]`` are used where the plan set them.
    """

    def __init__(self, analyses=None, *, rois=None, phases=None, models=None,
                 queue_size: int = 256, batch_size: int = 64, handler_registry=None,
                 root_map=None, external_timeout: float = 10.0, calibrations=None,
                 integration=None, frame_time_limit: float | None = 30.0,
                 positions=None):
        self.analyses = (resolve_analyses(analyses) if analyses is not None
                         else default_analyses(rois, phases, models))
        self.worker = Worker(maxsize=queue_size, batch_size=batch_size)
        self.config = {"queue_size": queue_size, "batch_size": batch_size,
                       "frame_time_limit": frame_time_limit,
                       "positions": tuple(positions or ())}
        self.integration = integration or PowderIntegration(calibrations)
        if integration is not None and calibrations:
            self.integration.calibrations.update(calibrations)
        self._external = {"handler_registry": dict(handler_registry or {}),
                          "root_map": dict(root_map or {}), "timeout": external_timeout}
        # token -> sink. Not bluesky's CallbackRegistry: it holds bound methods weakly (a
        # sink like ``writer.write`` would vanish with no error once the user drops the
        # writer) and it cannot count failing sinks (``sink_failures``) nor join/close
        # background sinks; tokens work the same way (``subscribe`` / ``unsubscribe``).
        self._sinks: dict[int, object] = {}
        self._tokens = itertools.count()
        self.runs: deque[RunAnalysis] = deque(maxlen=100)
        self.sink_errors = 0
        self.dispatch_errors = 0
        # no handler_registry for RunRouter: its Filler would read files on the RunEngine's
        # thread; ours reads them on the worker (RunAnalysis.reader)
        super().__init__([self._factory])

    def __call__(self, name, doc, validate=False):
        # bluesky's make_callback_safe does the same isolation but only logs; we also count
        # (cb.dispatch_errors), and that count goes into summaries and tests
        try:
            return super().__call__(name, doc, validate)
        except Exception:
            self.dispatch_errors += 1
            logger.exception("xrdml: could not route a %r document; the scan goes on", name)

    def _factory(self, name, start_doc):
        run = RunAnalysis(start_doc, self.analyses, self.worker, self._emit, self.config,
                          reader=ExternalReader(**self._external),
                          integration=self.integration)
        self.runs.append(run)
        return [run], []

    # --- the analysis run's documents ---------------------------------------------
    def subscribe(self, sink, background: bool = True) -> int:
        """Send the analysis runs' documents to ``sink(name, doc)``; returns a token.

        Each sink runs on its own thread (``background=True``, the default), so a writer to
        a slow or unreachable catalog delays neither the analysis nor the scan.
        ``background=False`` calls the sink on the worker thread instead: enough for a
        cheap sink (a list's ``append``). ``cb.wait()`` waits for both kinds.
        """
        token = next(self._tokens)
        self._sinks[token] = BackgroundSink(sink) if background else sink
        return token

    def unsubscribe(self, token: int) -> None:
        sink = self._sinks.pop(token, None)
        if isinstance(sink, BackgroundSink):
            sink.close()

    def _emit(self, name, doc):
        for sink in list(self._sinks.values()):
            try:
                sink(name, doc)
            except Exception:
                self.sink_errors += 1
                logger.exception("xrdml: sink %r failed on a %r document", sink, name)

    # --- for people and tests -----------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every document received so far has been analysed and handed to
        every sink (background sinks included). False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.worker.join(timeout):
            return False
        for sink in list(self._sinks.values()):
            if isinstance(sink, BackgroundSink):
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if not sink.join(left):
                    return False
        return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Finish what was received (up to ``timeout`` seconds), hand it to every sink, and
        stop the worker and sink threads. False if something was still busy at the
        deadline. ``with XRDMLCallback() as cb:`` closes on exit."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left():
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        done = self.worker.close(left())
        for token in list(self._sinks):
            sink = self._sinks.pop(token)
            if isinstance(sink, BackgroundSink):
                done = sink.close(left()) and done
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def stats(self):
        return self.worker.stats

    @property
    def sink_failures(self) -> int:
        """Documents a sink failed on, foreground and background sinks together."""
        return self.sink_errors + sum(
            s.errors for s in self._sinks.values() if isinstance(s, BackgroundSink))

    def summaries(self) -> list[dict]:
        """One summary per raw run seen (newest last): uids, status, counts, errors."""
        return [run.summary() for run in self.runs]

"""One raw run's analysis: routes its data keys, runs analyses, composes the analysis run.

Documents arrive on the RunEngine's thread and are only queued (``submit``); everything
below ``# --- worker side`` runs on the worker thread, in document order, so the analysis
run's documents (start, descriptors, event pages, stop) come out in a valid order.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
from event_model import DocumentRouter, compose_run

from .. import __version__, layout
from ..external import ExternalDataError, ExternalReader
from .budget import TimeBudget, chunks
from .routes import Geometry, Item, Route, array_shape

logger = logging.getLogger(__name__)

CHUNK = 16  # frames per analysis call when a frame_time_limit is set


class RunAnalysis(DocumentRouter):
    """Analysis of one raw run. Created by ``XRDMLCallback`` for each start document."""

    def __init__(self, start: dict, analyses: list, worker, emit, config: dict,
                 reader: ExternalReader | None = None, integration=None):
        super().__init__()
        self.raw_start = start
        self.analyses = analyses
        self.worker = worker
        self._emit_out = emit
        self.config = config
        self.geometry = Geometry.from_start(start, config.get("positions"))
        self.motors = list(self.geometry.motors)
        # worker-side state
        self.bundle = None  # event_model ComposeRunBundle of the analysis run
        self.stop_doc: dict | None = None
        self.routes: dict[str, list[Route]] = {}  # raw descriptor uid -> routes
        self.ignored: dict[str, str] = {}  # raw data key -> why it is not analysed
        self.errors: list[tuple[int, str, str]] = []  # (point, detector, message)
        self.counts: Counter = Counter()  # items analysed per analysis
        self._streams: dict = {}  # analysis stream name -> descriptor bundle
        # resources, datums and stream_resources of the run; frames are read from their
        # files on the worker, when an item needs them
        self.reader = reader if reader is not None else ExternalReader()
        # calibrated 2D keys are integrated first; their patterns feed the 1D analyses
        self.integration = integration
        self._positions: dict[tuple[str, int], dict] = {}
        self._received: dict[str, set] = {}  # stream name -> seq_nums seen (missed events)
        self._stream_of: dict[str, str] = {}  # raw descriptor uid -> stream name
        self.submit("open", None)

    # --- RunEngine side: queue and return ------------------------------------------
    def submit(self, op, doc, key=None):
        self.worker.submit(self, op, key, doc)

    def descriptor(self, doc):
        self.submit("descriptor", doc)

    def event_page(self, doc):
        self.submit("data", doc, key=("page", doc["descriptor"]))

    def resource(self, doc):
        self.submit("external", ("resource", doc))

    def datum(self, doc):
        self.submit("external", ("datum", doc))

    def datum_page(self, doc):
        self.submit("external", ("datum_page", doc))

    def stream_resource(self, doc):
        self.submit("external", ("stream_resource", doc))

    def stream_datum(self, doc):
        self.submit("data", doc, key=("datum", doc["descriptor"]))

    def stop(self, doc):
        self.submit("stop", doc)

    # --- worker side -----------------------------------------------------------------
    @property
    def uid(self) -> str | None:
        return self.bundle.start_doc["uid"] if self.bundle else None

    def handle(self, op, doc):
        try:
            if op == "descriptor":
                self._on_descriptor(doc)
            elif op == "external":
                self.reader.consume(*doc)
            elif op == "stop":
                self._on_stop(doc)
        except Exception as err:
            logger.exception("xrdml: %s document of run %s failed", op, self.raw_start["uid"])
            self._record_error(-1, "", f"{op}: {type(err).__name__}: {err}")
            if op == "stop" and self.stop_doc is None:
                self._close(exit_status="fail")

    def process(self, key, docs):
        kind, desc_uid = key
        routes = self.routes.get(desc_uid, [])
        if desc_uid not in self.routes:
            self._record_error(-1, "", f"{kind} refers to unknown descriptor {desc_uid!r}")
            return
        try:
            if kind == "page":
                for page in docs:
                    self._remember_positions(desc_uid, page)
                    self._received.setdefault(self._stream_of[desc_uid], set()).update(
                        page["seq_num"])
                items = self._items_from_pages(routes, docs)
            else:
                items = self._items_from_stream_datums(routes, docs)
            for route, its in items.items():
                self._analyze(route, its)
        except Exception as err:
            logger.exception("xrdml: analysis failed for run %s", self.raw_start["uid"])
            self._record_error(-1, "", f"{type(err).__name__}: {err}")

    def _on_descriptor(self, doc):
        self._stream_of[doc["uid"]] = doc.get("name", "primary")
        routes = []
        taken = {r.analysis.name for rs in self.routes.values() for r in rs}
        for key, data_key in doc.get("data_keys", {}).items():
            # every analysis that can use the key gets it (ROI maps and PQ-Net phase maps
            # of the same patterns, say); a key nobody can use is reported once, with why
            reasons, matched = [], False
            reference = str(data_key.get("external") or "").rstrip(":").upper()
            analyses, upstream = self.analyses, None
            if self.integration is not None:
                context = self.integration.match(key, data_key, doc)
                if isinstance(context, dict):  # a calibrated 2D key: integrate it, then
                    upstream = Route(key, self.integration, first=self.integration.name
                                     not in taken, external=reference == "STREAM",
                                     context=context, reference=reference,
                                     shape=array_shape(data_key),
                                     geometry=self.geometry, start=self.raw_start)
                    taken.add(self.integration.name)
                    routes.append(upstream)
                    matched = True
                    # ... route its patterns as a 1D detector's
                    data_key, doc = self.integration.pattern_descriptor(upstream, doc)
                elif isinstance(context, str):
                    reasons.append(f"{self.integration.name}: {context}")
                    analyses = []  # a calibration was meant: no Bragg peaks on rings
            for analysis in analyses:
                context = analysis.match(key, data_key, doc)
                if isinstance(context, dict):
                    route = Route(key, analysis, first=analysis.name not in taken,
                                  external=reference == "STREAM" and upstream is None,
                                  context=context, reference=reference,
                                  shape=array_shape(data_key), upstream=upstream,
                                  geometry=self.geometry, start=self.raw_start)
                    taken.add(analysis.name)
                    routes.append(route)
                    matched = True
                elif isinstance(context, str):
                    reasons.append(f"{analysis.name}: {context}")
            if upstream is not None and len(routes) and routes[-1] is upstream:
                self.ignored[f"{key} (integrated)"] = "; ".join(reasons) or "no 1D analysis"
            if not matched:
                if key not in self.ignored and key not in self.motors:
                    self.ignored[key] = "; ".join(reasons) or "not a 2D frame or a 1D pattern"
        self.routes[doc["uid"]] = routes
        if self.ignored:
            logger.info("xrdml: run %s: not analysed: %s", self.raw_start["uid"][:8], self.ignored)
        if routes:
            self._ensure_started()
            for route in routes:
                configure = getattr(route.analysis, "configuration", None)
                for name, keys in route.analysis.streams(route, self.motors).items():
                    self._declare(name, keys, configure(route) if configure else None)

    def _remember_positions(self, desc_uid, page):
        if not self.motors:  # a count: nothing to remember per point
            return
        for i, seq in enumerate(page["seq_num"]):
            self._positions[(desc_uid, seq)] = {
                m: float(page["data"][m][i]) for m in self.motors if m in page["data"]
            }

    def _positions_at(self, desc_uid, seq) -> dict:
        known = self._positions.get((desc_uid, seq), {})
        return {m: known.get(m, np.nan) for m in self.motors}

    def _items_from_pages(self, routes, pages) -> dict:
        items = {}
        for route in routes:
            if route.external or route.upstream is not None:
                continue  # arrives through stream_datum / from the integration of frames
            its = items.setdefault(route, [])
            for page in pages:
                values = page["data"].get(route.key)
                if values is None:
                    for seq in page["seq_num"]:
                        self._record_error(seq, route.key, f"event has no data for {route.key!r} "
                                           "although its descriptor declares it")
                    continue
                filled = (page.get("filled") or {}).get(route.key)
                for i, seq in enumerate(page["seq_num"]):
                    value = values[i]
                    if route.reference and isinstance(value, str) and not (
                            isinstance(filled, list) and filled[i]):
                        try:  # a datum id: the frame is in a file
                            value = self.reader.fill(value, ndim=len(route.shape) or None)
                        except ExternalDataError as err:
                            self._record_error(seq, route.key, str(err))
                            continue
                    its.append(Item(seq, value, self._positions_at(page["descriptor"], seq)))
        return items

    def _items_from_stream_datums(self, routes, datums) -> dict:
        items = {}
        by_key: dict[str, list] = {}  # every analysis of the key gets the frames
        for r in routes:
            if r.upstream is None:
                by_key.setdefault(r.key, []).append(r)
        for datum in datums:
            resource = self.reader.stream_resources.get(datum["stream_resource"])
            key = resource["data_key"] if resource else ""
            if resource is not None and key not in by_key:
                continue
            seqs = range(datum["seq_nums"]["start"], datum["seq_nums"]["stop"])
            try:
                key, seqs, arrays = self.reader.read_stream_datum(datum)
            except ExternalDataError as err:
                for seq in seqs:  # every frame it stood for is recorded as not analysed
                    self._record_error(seq, key, str(err))
                continue
            its = [Item(seq, arr, self._positions_at(datum["descriptor"], seq))
                   for seq, arr in zip(seqs, arrays)]
            for route in by_key[key]:
                items.setdefault(route, []).extend(its)
        return items

    def _analyze(self, route, items):
        """Analyse a batch; with a ``frame_time_limit``, in chunks, the budget of the batch
        (limit × frames) checked before each chunk and handed to the analysis as
        ``route.budget`` to check between frames itself (callbacks/budget.py)."""
        if not items:
            return
        limit = self.config.get("frame_time_limit")
        if not limit:
            self._analyze_chunk(route, items)
            return
        budget = route.budget = TimeBudget(limit, len(items))
        try:
            for chunk in chunks(items, CHUNK):
                if budget.done and budget.exceeded():
                    message = budget.batch_message()
                    for item in items[budget.done:]:
                        self._record_error(item.point, route.key, message)
                    break
                self._analyze_chunk(route, chunk)
                budget.done += len(chunk)
        finally:
            route.budget = None

    def _analyze_chunk(self, route, items):
        results, errors = route.analysis.analyze(route, items)
        if not route.context.get("auxiliary"):  # readings that only support another key's
            self.counts[route.analysis.name] += len(items) - len(errors)
        for point, message in errors:
            self._record_error(point, route.key, message)
        for stream, rows in results.items():
            self._emit_rows(stream, rows)
        if route.analysis is self.integration:  # the patterns go on to the 1D analyses
            rows = [r for rs in results.values() for r in rs]
            patterns = [Item(r["point"], r["intensity"], {m: r[m] for m in self.motors})
                        for r in rows]
            for down in self.routes_from(route):
                self._analyze(down, patterns)

    def routes_from(self, upstream) -> list:
        return [r for rs in self.routes.values() for r in rs if r.upstream is upstream]

    def _on_stop(self, doc):
        self.reader.close()
        for message in missed_events(doc, self._received):  # events lost on the way here
            self._record_error(-1, "", message)
        # every analysis adds its maps to one event per stream: same grid, same coordinates
        merged: dict[str, tuple[dict, dict]] = {}
        for routes in self.routes.values():
            for route in routes:
                for stream, (keys, data) in route.analysis.finish(route, self.geometry).items():
                    all_keys, all_data = merged.setdefault(stream, ({}, {}))
                    all_keys.update(keys)
                    all_data.update(data)
        for stream, (keys, data) in merged.items():
            self._declare(stream, keys)
            self._emit_rows(stream, [data])
        # a finished run keeps only its summary: the callback remembers recent runs
        for routes in self.routes.values():
            for route in routes:
                route.acc.clear()
        self._positions.clear()
        self._received.clear()
        ended = ""  # an aborted raw run, or one a remote worker was stopped in, says so
        if doc.get("exit_status", "success") != "success":
            ended = (f"; raw run ended with exit_status={doc.get('exit_status')!r}"
                     + (f": {doc['reason']}" if doc.get("reason") else ""))
        if not self.counts and not self.errors:
            why = "; ".join(f"{k}: {v}" for k, v in self.ignored.items()) or "no data keys"
            self._close("success", f"nothing to analyse ({why}){ended}")
            return
        done = ", ".join(f"{n} {a}" for a, n in sorted(self.counts.items()))
        done = (done or "nothing") + ended
        if self.errors:
            point, det, msg = self.errors[0]
            where = f"point {point} of {det}" if det else "run"
            self._close("fail", f"{len(self.errors)} error(s); first at {where}: {msg}. "
                                f"Analysed: {done}")
        else:
            self._close("success", f"analysed: {done}")

    # --- composing the analysis run ----------------------------------------------------
    def _ensure_started(self):
        if self.bundle is not None:
            return
        routes: dict[str, list] = {}
        for rs in self.routes.values():
            for r in rs:
                routes.setdefault(r.key, []).append(r.analysis.name)
        candidates = self.analyses + ([self.integration] if self.integration else [])
        used = [a for a in candidates if any(a.name in names for names in routes.values())]
        md = layout.start_metadata(
            self.raw_start,
            analyses=[a.name for a in used],
            routes=routes,
            models=[m for a in used for m in getattr(a, "models", [])],
            config={**self.config, **{a.name: a.config for a in used}},
            version=__version__,
        )
        self.bundle = compose_run(metadata=md)
        self._emit("start", self.bundle.start_doc)

    def _declare(self, name, data_keys, configuration=None):
        if name in self._streams:
            return
        self._ensure_started()
        self._streams[name] = self.bundle.compose_descriptor(
            name=name, data_keys=data_keys, configuration=configuration or {})
        self._emit("descriptor", self._streams[name].descriptor_doc)

    def _emit_rows(self, stream, rows):
        if not rows:
            return
        keys = list(self._streams[stream].descriptor_doc["data_keys"])
        now = time.time()
        # plain Python values: the documents must survive JSON (spool files, 0MQ, exports)
        data = {k: [_plain(row[k]) for row in rows] for k in keys}
        page = self._streams[stream].compose_event_page(
            data=data, timestamps={k: [now] * len(rows) for k in keys},
            time=[now] * len(rows), validate=False,
        )
        self._emit("event_page", page)

    def _record_error(self, point, detector, message):
        logger.warning("xrdml: run %s, point %s, %s: %s",
                       self.raw_start["uid"][:8], point, detector or "-", message)
        self.errors.append((int(point), detector, message))
        if self.bundle is not None:
            self._emit_error(int(point), detector, message)

    def _emit_error(self, point, detector, message):
        try:
            self._declare(layout.ERRORS, layout.error_keys())
            self._emit_rows(layout.ERRORS, [{"point": point, "detector": detector,
                                             "error": message}])
        except Exception:  # recording must never raise; the error is in self.errors anyway
            logger.exception("xrdml: could not emit an error record")

    def _close(self, exit_status, reason=""):
        if self.bundle is None:
            self._ensure_started()
            for point, det, msg in self.errors:  # errors seen before the run had started
                self._emit_error(point, det, msg)
        self.stop_doc = self.bundle.compose_stop(exit_status=exit_status, reason=reason)
        self._emit("stop", self.stop_doc)

    def _emit(self, name, doc):
        self._emit_out(name, doc)

    def summary(self) -> dict:
        return {
            "raw_uid": self.raw_start.get("replay_of") or self.raw_start["uid"],
            "replay_uid": self.raw_start["uid"] if "replay_of" in self.raw_start else None,
            "analysis_uid": self.uid,
            "exit_status": self.stop_doc["exit_status"] if self.stop_doc else "running",
            "reason": self.stop_doc["reason"] if self.stop_doc else "",
            "analysed": dict(self.counts),
            "errors": len(self.errors),
            "ignored": dict(self.ignored),
        }


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def missed_events(stop: dict, received: dict[str, set]) -> list[str]:
    """One message per stream of which fewer events arrived than the raw stop document
    counts (``num_events``): a remote worker whose stream dropped messages."""
    messages = []
    for stream, n in sorted((stop.get("num_events") or {}).items()):
        missing = sorted(set(range(1, int(n) + 1)) - received.get(stream, set()))
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            messages.append(
                f"missed {len(missing)} of {n} events of stream {stream!r} (seq_num {shown}); "
                f"`xrdml reprocess {stop.get('run_start')}` analyses the whole run from the "
                "catalog")
    return messages


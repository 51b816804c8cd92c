"""Operando patterns → voltage ± σ, mode and rate probabilities and attention over 2θ.

Plugs into ``XRDMLCallback`` like the other analyses (``match`` / ``streams`` / ``analyze``
/ ``finish``); not in ``default_analyses``: add it where you choose the analyses::

    XRDMLCallback(analyses=default_analyses() + [OperandoAttention()])

Routing: a 1D pattern with a 2θ axis and a wavelength in its detector's configuration
(and, optionally, ``instrument_fwhm`` in degrees 2θ: the model matches resolutions with it),
from a detector the model is configured for (``detectors=``: data keys or device names),
or — by default — any such pattern in an event that also holds the cell's voltage (a data
key ending in ``voltage``). The pattern must cover the model's Q range at its wavelength.

Per pattern, stream ``operando``: ``voltage``, ``voltage_std`` (V), ``p_charge``,
``p_discharge``, ``p_rate_<label>`` per C-rate of the model (``1C``, ``0p2C``), the
predicted ``mode`` and ``rate`` (labels), the 256-value ``vaw`` and its ``vaw_two_theta``
(degrees at the pattern's wavelength). The measured voltage and cell time are read from the
same events (they are routed here too, and are not counted as analysed items) and, at the stop, two
PNGs land in ``figures``: predicted vs measured voltage over time with mode/rate
probabilities, and the patterns as an image (time × 2θ) with the VAW beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import layout
from .routes import Geometry, Item, Route, array_shape, config_value

logger = logging.getLogger(__name__)

OPERANDO = "operando"  # the per-pattern stream


def _label(rate_label: str) -> str:
    return rate_label.replace(".", "p")


class FigureHistory:
    """What the figures of one run show: at most ``capacity`` patterns, evenly spread over
    the whole run however long it lasts. Every pattern is kept until the history is full;
    then every second one is dropped and only every second new one kept, and so on (a
    stride that doubles), so memory stays flat over days of cycling."""

    def __init__(self, capacity: int = 2000):
        self.capacity, self.stride = max(2, int(capacity)), 1
        self.rows: list[dict] = []
        self.x: list[np.ndarray] = []
        self.values: dict[str, dict] = {"voltage": {}, "time": {}}  # name -> point -> value

    def _kept(self, point: int) -> bool:
        return (point - 1) % self.stride == 0

    def measured(self, name: str, point: int, value: float) -> None:
        if self._kept(point):
            self.values[name][point] = value

    def add(self, row: dict, x: np.ndarray) -> None:
        if not self._kept(row["point"]):
            return
        self.rows.append(row)
        self.x.append(x)
        if len(self.rows) > self.capacity:
            self.stride *= 2
            keep = [i for i, r in enumerate(self.rows) if self._kept(r["point"])]
            self.rows = [self.rows[i] for i in keep]
            self.x = [self.x[i] for i in keep]
            for name, values in self.values.items():
                self.values[name] = {p: v for p, v in values.items() if self._kept(p)}


class OperandoAttention:
    """Operando 1D patterns → the attention model's predictions (see the module doc).

    ``model``: an ``AttentionPredictor`` (``prepare``, ``predict_prepared``, ``rate_labels``,
    ``card``); by default ``load_model(weights)`` — the shipped
    ``attention-demo`` model or ``weights=`` a path to your own. ``voltage_key`` /
    ``time_key``: suffixes of the event's scalar keys holding the measured voltage (V) and
    the cell time (s), for the figures. ``figures``: folder of the PNGs (default
    ``$XRDML_FIGURES`` or ``./xrdml-figures``; ``False`` for none). ``figure_points``: the
    most patterns a run's figures show (``FigureHistory``: evenly spread over the run; each
    costs ~3 kB until the stop); the ``operando`` stream has every pattern.
    """

    name = "attention"
    base_streams = (OPERANDO,)

    def __init__(self, weights=None, *, detectors=None, model=None, device: str = "auto",
                 voltage_key: str = "voltage", time_key: str = "time", figures=None,
                 figure_points: int = 2000):
        self.model, self.error = model, ""
        self.detectors = set(detectors) if detectors else None
        self.voltage_key, self.time_key = voltage_key, time_key
        self.figure_points = figure_points
        if figures is None:
            figures = os.environ.get("XRDML_FIGURES", "xrdml-figures")
        self.figures = Path(figures) if figures else None
        self.saved: list[str] = []  # PNGs written, newest last
        self._runs: dict[str, FigureHistory] = {}  # descriptor uid -> the run's figure history
        if model is None:
            try:
                from ..models import load_model

                self.model = load_model(weights or "attention-demo", device=device)
            except Exception as err:  # missing weights: nothing routed here, reason recorded
                self.error = f"attention model could not be loaded ({type(err).__name__}: {err})"
                logger.warning("xrdml: %s", self.error)

    @property
    def models(self) -> list:
        from ..models.weights import provenance_of

        return provenance_of(self.model)

    @property
    def config(self) -> dict:
        if self.model is None:
            return {"error": self.error}
        return {"detectors": sorted(self.detectors) if self.detectors else "with a voltage",
                "q_range": list(self.model.q_range), "rates": list(self.model.rate_labels)}

    # --- routing ---------------------------------------------------------------------
    def _patterns_of(self, descriptor: dict) -> list[str]:
        keys = []
        for k, dk in descriptor.get("data_keys", {}).items():
            shape = array_shape(dk)
            if len(shape) != 1 or shape[0] < 32:
                continue
            if self.detectors is None or k in self.detectors or \
                    dk.get("object_name") in self.detectors:
                keys.append(k)
        return keys

    def _scalar(self, descriptor: dict, suffix: str) -> str | None:
        for k, dk in descriptor.get("data_keys", {}).items():
            if k.endswith(suffix) and not array_shape(dk) and dk.get("dtype") in (
                    "number", "integer"):
                return k
        return None

    def match(self, key: str, data_key: dict, descriptor: dict):
        patterns = self._patterns_of(descriptor)
        voltage = self._scalar(descriptor, self.voltage_key)
        if not patterns or (self.detectors is None and voltage is None):
            return None  # not operando data (or not a configured detector)
        if key not in patterns:
            if key in (voltage, self._scalar(descriptor, self.time_key)):
                kind = "voltage" if key == voltage else "time"
                return {"companion": kind, "descriptor": descriptor["uid"], "auxiliary": True}
            return None
        if self.model is None:
            return self.error
        obj = data_key.get("object_name")
        tt = config_value(descriptor, obj, "two_theta")
        wl = config_value(descriptor, obj, "wavelength")
        if tt is None or wl is None:
            return "1D pattern without a 2θ axis or wavelength in its configuration"
        tt = np.asarray(tt, float)
        if tt.size != array_shape(data_key)[0]:
            return f"2θ axis has {tt.size} points but the pattern has {array_shape(data_key)[0]}"
        fwhm = config_value(descriptor, obj, "instrument_fwhm")  # None: the model's default
        fwhm = None if fwhm is None else float(fwhm)
        try:  # the pattern must cover the model's Q range
            self.model.prepare(np.ones((1, tt.size)), tt, float(wl), fwhm)
        except ValueError as err:
            return str(err)
        return {"two_theta": tt, "wavelength": float(wl), "instrument_fwhm": fwhm,
                "descriptor": descriptor["uid"],
                "raw_uid": descriptor.get("run_start", ""),
                "stream": layout.stream_name(OPERANDO, key, patterns.index(key) == 0)}

    def value_keys(self) -> dict:
        keys = {"point": layout.integer(), "detector": layout.string(),
                "voltage": layout.number("V"), "voltage_std": layout.number("V"),
                "p_charge": layout.number(), "p_discharge": layout.number(),
                "mode": layout.string(), "rate": layout.string()}
        for label in self.model.rate_labels:
            keys[f"p_rate_{_label(label)}"] = layout.number()
        n = self.model.n_points
        keys["vaw"] = layout.array((n,), ("vaw_two_theta",))
        keys["vaw_two_theta"] = layout.array((n,), ("vaw_two_theta",), units="deg")
        return keys

    def streams(self, route: Route, motors) -> dict:
        if "companion" in route.context:
            return {}
        keys = self.value_keys()
        keys.update(layout.position_keys(motors))
        return {route.context["stream"]: keys}

    def _store(self, route: Route) -> FigureHistory:
        return self._runs.setdefault(route.context["descriptor"],
                                     FigureHistory(self.figure_points))

    def analyze(self, route: Route, items: list[Item]):
        store = self._store(route)
        if "companion" in route.context:
            for item in items:
                store.measured(route.context["companion"], item.point, float(item.value))
            return {}, []
        from ..models.attention import PatternError

        tt, wl = route.context["two_theta"], route.context["wavelength"]
        good, errors = [], []
        for item in items:  # check each so one bad pattern does not sink the batch
            try:
                good.append((item, self.model.prepare(
                    item.value, tt, wl, route.context["instrument_fwhm"])[0]))
            except PatternError as err:
                errors.append((item.point, str(err)))
        rows = []
        if good:
            x = np.stack([g[1] for g in good])
            pred = self.model.predict_prepared(x, wl)
            labels = self.model.rate_labels
            for i, (item, _) in enumerate(good):
                row = {"point": item.point, "detector": route.key, **item.positions,
                       "voltage": float(pred["voltage"][i]),
                       "voltage_std": float(pred["voltage_std"][i]),
                       "p_charge": float(pred["mode"][i, 0]),
                       "p_discharge": float(pred["mode"][i, 1]),
                       "mode": "charge" if pred["mode"][i, 0] >= 0.5 else "discharge",
                       "rate": labels[int(np.argmax(pred["rate"][i]))],
                       "vaw": pred["vaw"][i], "vaw_two_theta": pred["vaw_two_theta"]}
                for j, label in enumerate(labels):
                    row[f"p_rate_{_label(label)}"] = float(pred["rate"][i, j])
                rows.append(row)
            for row, xi in zip(rows, x):
                store.add({k: v for k, v in row.items() if k != "vaw_two_theta"}, xi)
        return {route.context["stream"]: rows}, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        if "companion" in route.context:
            return {}
        store = self._runs.pop(route.context["descriptor"], None)
        if store and store.rows and self.figures:
            try:
                self.saved += self.save_figures(store, route)
            except Exception:  # a figure must never fail the analysis run
                logger.exception("xrdml: operando figures failed")
        return {}

    def save_figures(self, store: dict, route: Route) -> list[str]:
        from ..plots import plot_operando

        tag = f"{route.context.get('raw_uid', '')[:8]}_{route.key}"
        return plot_operando(
            rows=store.rows, x=np.stack(store.x), measured=store.values["voltage"],
            time=store.values["time"], vaw_two_theta=self.model.vaw_two_theta(
                route.context["wavelength"]),
            rate_labels=self.model.rate_labels, out_dir=self.figures, tag=tag)

"""Operando patterns → voltage ± σ, mode and rate probabilities and attention over 2θ.

Plugs into ``XRDMLCallback`` like the other analyses (``match`` / ``streams`` / ``analyze``
/ ``finish``); not in ``default_analyses``: add it where you choose the analyses::

    XRDMLCallback(analyses=default_analyses() + [OperandoAttention()])

Routing: a 1D pattern with a 2θ axis and a wavelength in its detector's configuration,
from a detector the model is configured for (``detectors=``: data keys or device names),
or — by default — any such pattern in an event that also holds the cell's voltage (a data
key ending in ``voltage``). The pattern must cover the model's Q range at its wavelength.

Per pattern, stream ``operando``: ``voltage``, ``voltage_std`` (V), ``p_charge``,
``p_discharge``, ``p_rate_<label>`` per C-rate of the model (``1C``, ``0p2C``), the
predicted ``mode`` and ``rate`` (labels), the 256-value ``vaw`` and its ``vaw_two_theta``
(degrees at the pattern's wavelength). The measured voltage and cell time are read from the
same events (they are routed here too and count as analysed items) and, at the stop, two
PNGs land in ``figures``: predicted vs measured voltage over time with mode/rate
probabilities, and the patterns as an image (time × 2θ) with the VAW beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import layout
from .analyzers import Geometry, Item, Route, _array_shape, _config_value

logger = logging.getLogger(__name__)

OPERANDO = "operando"  # the per-pattern stream


def _label(rate_label: str) -> str:
    return rate_label.replace(".", "p")


class OperandoAttention:
    """Operando 1D patterns → the attention model's predictions (see the module doc).

    ``model``: an ``AttentionPredictor`` (``prepare``, ``predict_prepared``, ``rate_labels``,
    ``card``); by default ``load_model(weights)`` — the shipped
    ``attention-demo`` model or ``weights=`` a path to your own. ``voltage_key`` /
    ``time_key``: suffixes of the event's scalar keys holding the measured voltage (V) and
    the cell time (s), for the figures. ``figures``: folder of the PNGs (default
    ``$XRDML_FIGURES`` or ``./xrdml-figures``; ``False`` for none).
    """

    name = "attention"
    base_streams = (OPERANDO,)

    def __init__(self, weights=None, *, detectors=None, model=None, device: str = "auto",
                 voltage_key: str = "voltage", time_key: str = "time", figures=None):
        self.model, self.error = model, ""
        self.detectors = set(detectors) if detectors else None
        self.voltage_key, self.time_key = voltage_key, time_key
        if figures is None:
            figures = os.environ.get("XRDML_FIGURES", "xrdml-figures")
        self.figures = Path(figures) if figures else None
        self.saved: list[str] = []  # PNGs written, newest last
        self._runs: dict[str, dict] = {}  # descriptor uid -> what the run accumulated
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
            shape = _array_shape(dk)
            if len(shape) != 1 or shape[0] < 32:
                continue
            if self.detectors is None or k in self.detectors or \
                    dk.get("object_name") in self.detectors:
                keys.append(k)
        return keys

    def _scalar(self, descriptor: dict, suffix: str) -> str | None:
        for k, dk in descriptor.get("data_keys", {}).items():
            if k.endswith(suffix) and not _array_shape(dk) and dk.get("dtype") in (
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
                return {"companion": kind, "descriptor": descriptor["uid"]}
            return None
        if self.model is None:
            return self.error
        obj = data_key.get("object_name")
        tt = _config_value(descriptor, obj, "two_theta")
        wl = _config_value(descriptor, obj, "wavelength")
        if tt is None or wl is None:
            return "1D pattern without a 2θ axis or wavelength in its configuration"
        tt = np.asarray(tt, float)
        if tt.size != _array_shape(data_key)[0]:
            return f"2θ axis has {tt.size} points but the pattern has {_array_shape(data_key)[0]}"
        try:  # the pattern must cover the model's Q range
            self.model.prepare(np.ones((1, tt.size)), tt, float(wl))
        except ValueError as err:
            return str(err)
        return {"two_theta": tt, "wavelength": float(wl), "descriptor": descriptor["uid"],
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

    def _store(self, route: Route) -> dict:
        return self._runs.setdefault(route.context["descriptor"], {
            "voltage": {}, "time": {}, "rows": [], "x": [], "points": []})

    def analyze(self, route: Route, items: list[Item]):
        store = self._store(route)
        if "companion" in route.context:
            values = store[route.context["companion"]]
            for item in items:
                values[item.point] = float(item.value)
            return {}, []
        from ..models.attention import PatternError

        tt, wl = route.context["two_theta"], route.context["wavelength"]
        good, errors = [], []
        for item in items:  # check each so one bad pattern does not sink the batch
            try:
                good.append((item, self.model.prepare(item.value, tt, wl)[0]))
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
            store["x"].append(x)
        store["rows"].extend({k: v for k, v in r.items() if k != "vaw_two_theta"} for r in rows)
        return {route.context["stream"]: rows}, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        if "companion" in route.context:
            return {}
        store = self._runs.pop(route.context["descriptor"], None)
        if store and store["rows"] and self.figures:
            try:
                self.saved += self.save_figures(store, route)
            except Exception:  # a figure must never fail the analysis run
                logger.exception("xrdml: operando figures failed")
        return {}

    def save_figures(self, store: dict, route: Route) -> list[str]:
        from ..plots import plot_operando

        tag = f"{route.context.get('raw_uid', '')[:8]}_{route.key}"
        return plot_operando(
            rows=store["rows"], x=np.concatenate(store["x"]), measured=store["voltage"],
            time=store["time"], vaw_two_theta=self.model.vaw_two_theta(
                route.context["wavelength"]),
            rate_labels=self.model.rate_labels, out_dir=self.figures, tag=tag)

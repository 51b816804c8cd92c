"""Crystal system and space group of every 1D powder pattern, live (``models.structure``).

Not in ``default_analyses()``: add it when you want it::

    XRDMLCallback(analyses=default_analyses() + [StructureClassification()])

The composition the chemistry sub-network uses comes, per pattern, from

1. ``composition_key``: a data key of the same events — an XRF/EDS reading of element
   fractions, either a 1D array (element symbols from ``elements=`` or from the
   detector's ``*elements`` configuration) or a string (a formula ``"Fe2O3"`` or JSON
   ``{"Fe": 0.4, "O": 0.6}``);
2. else ``composition=`` given here (a dict or formula, for every run);
3. else the raw run's ``start["sample"]["composition"]`` (dict or formula);
4. else none: the pattern alone.

Stream ``structure`` (``structure_<key>`` for a second detector): per pattern, point,
detector, motor positions, the top-5 space groups (``sg_1`` … ``sg_5`` numbers,
``sg_1_symbol`` …, ``p_sg_1`` …), the crystal-system probabilities (``p_triclinic`` …
``p_cubic``), the most probable crystal system, ``chemistry_used`` and the composition
used. With ``plot_dir`` a PNG per run and detector shows the last pattern and the ranked
probabilities.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .. import layout
from ..analysis.roi import PatternError, check_patterns
from ..simulation.crystals import CRYSTAL_SYSTEMS
from .routes import Geometry, Item, Route, array_shape, config_value, pattern_axis

logger = logging.getLogger(__name__)

STRUCTURE = "structure"


def structure_keys(motors, top: int = 5) -> dict:
    keys = {"point": layout.integer(), "detector": layout.string(),
            **layout.position_keys(motors)}
    for i in range(1, top + 1):
        keys[f"sg_{i}"] = layout.integer()
        keys[f"sg_{i}_symbol"] = layout.string()
        keys[f"p_sg_{i}"] = layout.number()
    for name in CRYSTAL_SYSTEMS:
        keys[f"p_{name}"] = layout.number()
    keys["crystal_system"] = layout.string()
    keys["chemistry_used"] = layout.integer()
    keys["composition"] = layout.string()
    return keys


def parse_composition(value, elements=None):
    """A composition dict from a data key's value: a string (formula or JSON object) or
    an array of amounts for ``elements``; None when it holds nothing."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("{"):
            return {str(k): float(v) for k, v in json.loads(text).items()}
        from pymatgen.core import Composition

        return {str(k): float(v) for k, v in Composition(text).get_el_amt_dict().items()}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    arr = np.asarray(value, float).ravel()
    if elements is None:
        raise ValueError("a composition array needs its element symbols: pass elements= or "
                         "give the detector an '*elements' configuration")
    if arr.size != len(elements):
        raise ValueError(f"composition array has {arr.size} values for {len(elements)} "
                         "elements")
    comp = {str(e): float(a) for e, a in zip(elements, arr) if np.isfinite(a) and a > 0}
    return comp or None


def _formula(comp) -> str:
    if not comp:
        return ""
    if isinstance(comp, str):
        return comp
    return " ".join(f"{el}{amount:.3g}" for el, amount in comp.items())


class StructureClassification:
    """1D powder patterns → crystal system and space group probabilities (+ chemistry).

    ``weights``: your own ``.safetensors`` (default: the shipped ``structure`` weights);
    ``composition_key`` / ``elements`` / ``composition``: see the module doc;
    ``two_theta`` / ``wavelength``: when the detector's configuration has none;
    ``top``: how many space groups each row lists; ``plot_dir``: where PNGs go.
    """

    name = "structure"
    base_streams = (STRUCTURE,)

    def __init__(self, weights=None, device: str = "auto", model=None,
                 composition_key: str | None = None, elements=None, composition=None,
                 two_theta=None, wavelength: float | None = None, top: int = 5,
                 plot_dir: str | Path | None = None):
        self.model, self.error = model, ""
        self.composition_key, self.elements = composition_key, elements
        self.composition = composition
        self.two_theta, self.wavelength = two_theta, wavelength
        self.top, self.plot_dir = int(top), plot_dir
        self._symbols: dict[int, str] = {}
        self._by_descriptor: dict[str, dict] = {}
        if model is None:
            try:
                from ..models import load_model

                self.model = load_model("structure", path=weights, device=device)
            except Exception as err:  # missing torch / weights: nothing routed here
                self.error = f"structure model could not be loaded ({type(err).__name__}: {err})"
                logger.warning("xrdml: %s", self.error)

    @property
    def models(self) -> list:
        return [self.model.provenance()] if self.model is not None else []

    @property
    def config(self) -> dict:
        if self.model is None:
            return {"error": self.error}
        return {"composition_key": self.composition_key or "",
                "composition": _formula(self.composition), "top": self.top}

    # --- routing ------------------------------------------------------------------
    def match(self, key: str, data_key: dict, descriptor: dict):
        if self.model is None:
            shape = array_shape(data_key)
            return self.error if len(shape) == 1 and shape[0] >= 32 else None
        shared = self._shared(descriptor)
        if self.composition_key is not None and key == self.composition_key:
            elements = self.elements
            if elements is None:
                elements = config_value(descriptor, data_key.get("object_name"), "elements")
            return {"role": "composition", "shared": shared, "auxiliary": True,
                    "elements": list(elements) if elements is not None else None}
        axis = pattern_axis(data_key, descriptor, self.two_theta, self.wavelength)
        if not isinstance(axis, tuple):
            return axis
        tt, wl = axis
        if wl is None:
            return "no wavelength in the configuration; pass wavelength="
        try:
            self.model.prepare(np.ones((1, tt.size)), tt, float(wl))
        except ValueError as err:
            return str(err)
        per_event = (self.composition_key is not None
                     and self.composition_key in descriptor.get("data_keys", {}))
        return {"role": "pattern", "shared": shared, "two_theta": tt, "wavelength": float(wl),
                "per_event": per_event, "run": descriptor.get("run_start", "")}

    def _shared(self, descriptor: dict) -> dict:
        """State the pattern and composition routes of one descriptor share (the last
        few descriptors' are kept: a run's routes are matched together)."""
        uid = descriptor.get("uid", "")
        if uid in self._by_descriptor:
            return self._by_descriptor[uid]
        while len(self._by_descriptor) >= 8:
            self._by_descriptor.pop(next(iter(self._by_descriptor)))
        shared = self._by_descriptor[uid] = {"compositions": {}, "pending": [], "routes": []}
        if self.composition is not None:
            shared["default"] = self.composition
        return shared

    def streams(self, route: Route, motors) -> dict:
        if route.context["role"] != "pattern":
            return {}
        shared = route.context["shared"]
        # the first pattern key gets the plain stream name, whatever the order of the keys
        # (run.py counts the composition key as this analysis's first)
        route.context["stream"] = layout.stream_name(STRUCTURE, route.key,
                                                     not shared["routes"])
        shared["routes"].append(route)
        return {route.context["stream"]: structure_keys(motors, self.top)}

    # --- analysis -------------------------------------------------------------------
    def analyze(self, route: Route, items: list[Item]):
        if route.context["role"] == "composition":
            return self._compositions(route, items)
        shared = route.context["shared"]
        ready, errors = [], []
        for item in items:
            if route.context["per_event"] and item.point not in shared["compositions"]:
                shared["pending"].append((route, item))  # its composition comes later
            else:
                ready.append(item)
        rows, errs = self._classify(route, ready)
        return {route.context["stream"]: rows} if rows else {}, errors + errs

    def _compositions(self, route: Route, items: list[Item]):
        shared, errors = route.context["shared"], []
        for item in items:
            try:
                shared["compositions"][item.point] = parse_composition(
                    item.value, route.context["elements"])
            except Exception as err:
                shared["compositions"][item.point] = None
                errors.append((item.point, f"composition not readable ({err}); "
                                           "classified from the pattern alone"))
        # patterns that were waiting for these compositions
        waiting = [(r, it) for r, it in shared["pending"] if it.point in shared["compositions"]]
        shared["pending"] = [(r, it) for r, it in shared["pending"]
                             if it.point not in shared["compositions"]]
        results = {}
        for r in {id(r): r for r, _ in waiting}.values():
            rows, errs = self._classify(r, [it for rr, it in waiting if rr is r])
            if rows:
                results.setdefault(r.context["stream"], []).extend(rows)
            errors.extend(errs)
        return results, errors

    def _composition_for(self, route: Route, point: int):
        shared = route.context["shared"]
        if route.context["per_event"]:
            comp = shared["compositions"].pop(point, None)
            if comp:
                return comp
        if "default" in shared:
            return shared["default"]
        sample = (route.start or {}).get("sample")  # the raw run's start document
        return sample.get("composition") if isinstance(sample, dict) else None

    def _classify(self, route: Route, items: list[Item]):
        tt = route.context["two_theta"]
        good, errors = [], []
        for item in items:
            try:
                good.append((item, check_patterns(item.value, tt.size)[0]))
            except PatternError as err:
                errors.append((item.point, str(err)))
        if not good:
            return [], errors
        comps = [self._composition_for(route, item.point) for item, _ in good]
        try:
            out = self.model.predict(np.stack([g[1] for g in good]), tt,
                                     route.context["wavelength"], comps)
        except ValueError as err:  # a composition the model cannot read
            errors.extend((item.point, f"{err}; classified from the pattern alone")
                          for item, _ in good)
            comps = [None] * len(good)
            out = self.model.predict(np.stack([g[1] for g in good]), tt,
                                     route.context["wavelength"], None)
        from ..models.structure import space_group_symbol, top_space_groups

        numbers, probs = top_space_groups(out["space_group"], self.top)
        rows = []
        for i, (item, _) in enumerate(good):
            row = {"point": item.point, "detector": route.key, **item.positions}
            for j in range(self.top):
                n = int(numbers[i, j])
                if n not in self._symbols:
                    self._symbols[n] = space_group_symbol(n)
                row[f"sg_{j + 1}"] = n
                row[f"sg_{j + 1}_symbol"] = self._symbols[n]
                row[f"p_sg_{j + 1}"] = float(probs[i, j])
            for k, name in enumerate(CRYSTAL_SYSTEMS):
                row[f"p_{name}"] = float(out["crystal_system"][i, k])
            row["crystal_system"] = CRYSTAL_SYSTEMS[int(out["crystal_system"][i].argmax())]
            row["chemistry_used"] = int(bool(out["chemistry_used"][i]))
            row["composition"] = _formula(comps[i]) if out["chemistry_used"][i] else ""
            rows.append(row)
        route.acc["last"] = (good[-1][1], out["space_group"][-1], out["crystal_system"][-1],
                             rows[-1])
        route.acc["n"] = route.acc.get("n", 0) + len(rows)
        return rows, errors

    def finish(self, route: Route, geometry: Geometry) -> dict:
        if route.context["role"] != "pattern":
            return {}
        if self.plot_dir and "last" in route.acc:
            y, p_sg, p_cs, row = route.acc["last"]
            path = Path(self.plot_dir) / (f"structure_{str(route.context['run'])[:8]}_"
                                          f"{route.key}.png")
            try:
                plot_classification(route.context["two_theta"], y, p_sg, p_cs, path,
                                    title=f"{route.key}, point {row['point']}"
                                          + (f", {row['composition']}" if row["composition"]
                                             else ", pattern only"))
            except Exception:  # a figure must never fail the analysis
                logger.exception("xrdml: could not write %s", path)
        return {}


def plot_classification(two_theta, pattern, p_space_group, p_crystal_system, path,
                        title: str = "", top: int = 10) -> Path:
    """PNG: the pattern, the ranked space-group probabilities and the crystal systems'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..models.structure import space_group_symbol

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True,
                             gridspec_kw={"width_ratios": [2.2, 1.2, 1]})
    axes[0].plot(two_theta, pattern, lw=0.8)
    axes[0].set_xlabel("2θ (°)")
    axes[0].set_ylabel("counts")
    axes[0].set_title(title, fontsize=9)
    order = np.argsort(-np.asarray(p_space_group))[:top]
    labels = [f"{n + 1} {space_group_symbol(n + 1)}" for n in order]
    axes[1].barh(range(len(order))[::-1], np.asarray(p_space_group)[order])
    axes[1].set_yticks(range(len(order))[::-1], labels, fontsize=8)
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("probability")
    axes[1].set_title("space groups", fontsize=9)
    axes[2].barh(range(7)[::-1], p_crystal_system, color="tab:orange")
    axes[2].set_yticks(range(7)[::-1], CRYSTAL_SYSTEMS, fontsize=8)
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("probability")
    axes[2].set_title("crystal systems", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Neural models (no Bluesky in here): loading by name or path, device choice, weights I/O.

``load_model(name)`` loads shipped weights from ``bluesky_xrdml/weights/``; a path to a
user's own ``.safetensors`` file (with its ``.json`` card beside it) loads the same way.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .device import select_device

# model name -> module whose ``load(path_or_none, device)`` builds the model object
REGISTRY: dict[str, str] = {}


def register(name: str, module: str) -> None:
    REGISTRY[name] = module


register("braggnn", "bluesky_xrdml.models.braggnn")
register("braggnn-ensemble", "bluesky_xrdml.models.braggnn_ensemble")
register("braggnn-pair", "bluesky_xrdml.models.braggnn")  # v3.0: two networks
register("pqnet-demo", "bluesky_xrdml.models.pqnet")
register("pqnet", "bluesky_xrdml.models.pqnet")  # what a trained model's card says
register("pqnet-oxides", "bluesky_xrdml.models.pqnet")
register("attention-demo", "bluesky_xrdml.models.attention")
register("attention", "bluesky_xrdml.models.attention")  # the name in its cards
register("structure", "bluesky_xrdml.models.structure")


def load_model(name: str, path: str | Path | None = None, device: str = "auto"):
    """Load model ``name`` ("braggnn", ...): shipped weights, or ``path`` to your own file.

    A path alone (``load_model("my-run.safetensors")``) works too: the card beside it says
    which model it is.
    """
    if name not in REGISTRY and Path(name).with_suffix(".json").exists():
        import json

        path = name
        name = json.loads(Path(name).with_suffix(".json").read_text())["model"]
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {sorted(REGISTRY)}")
    if path is None:  # shipped weights under the model's own name, where there are some
        from .weights import WEIGHTS_DIR

        shipped = WEIGHTS_DIR / f"{name}.safetensors"
        path = shipped if shipped.exists() else None
    module = importlib.import_module(REGISTRY[name])
    return module.load(path, device=select_device(device))


__all__ = ["REGISTRY", "load_model", "register", "select_device"]

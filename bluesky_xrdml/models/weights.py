"""Weights on disk: safetensors + a JSON model card beside them, with provenance.

``name.safetensors`` holds the tensors; ``name.json`` the card (architecture, training
recipe, seed, metrics, ``sha256`` of the safetensors file). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: str | Path, tensors: dict, card: dict) -> dict:
    """Write ``tensors`` (name -> torch.Tensor) as safetensors and the card beside it.
    Returns the card with ``sha256`` and ``file`` filled in."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    card = {**card, "file": path.name, "sha256": sha256_file(path)}
    path.with_suffix(".json").write_text(json.dumps(card, indent=2, sort_keys=True))
    return card


def load(path: str | Path, device: str = "cpu") -> tuple[dict, dict]:
    """``(tensors, card)`` from a safetensors file and its card; checks the sha256."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    digest = sha256_file(path)
    if card.get("sha256") and card["sha256"] != digest:
        raise ValueError(f"{path}: sha256 {digest[:12]}… does not match its card "
                         f"({card['sha256'][:12]}…); the file was changed or truncated")
    card["sha256"] = digest
    return load_file(str(path), device=device), card


def provenance(card: dict) -> dict:
    """What an analysis run records about a model: name, version, sha256."""
    return {"name": card.get("name"), "version": card.get("version"), "sha256": card.get("sha256")}


def provenance_of(model) -> list[dict]:
    """``[{name, version, sha256}]`` of a loaded model for an analysis run's start document
    (its ``provenance()``, else its card's); ``[]`` for no model or one without a card."""
    if model is None:
        return []
    if hasattr(model, "provenance"):
        return [model.provenance()]
    card = getattr(model, "card", None)
    return [provenance(card)] if card is not None else []

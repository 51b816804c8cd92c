"""A model a user trained loads by path, and by name=path in the callback and the CLI:
its card says "pqnet" (the shipped weights are registered as "pqnet-demo")."""

import shutil

from bluesky_xrdml.callbacks import XRDMLCallback
from bluesky_xrdml.models import load_model
from bluesky_xrdml.models.weights import WEIGHTS_DIR


def own_pqnet(tmp_path):
    """The shipped ensemble under a user's file name: a card that says "pqnet"."""
    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / f"pqnet-demo{suffix}", tmp_path / f"m{suffix}")
    return tmp_path / "m.safetensors"


def test_a_trained_pqnet_loads_by_path(tmp_path):
    path = own_pqnet(tmp_path)
    model = load_model(str(path))
    assert model.card["model"] == "pqnet"
    assert load_model("pqnet", path=path).card["sha256"] == model.card["sha256"]


def test_a_trained_pqnet_is_used_by_the_callback_as_pqnet(tmp_path):
    path = own_pqnet(tmp_path)
    cb = XRDMLCallback(models={"pqnet": str(path)})
    (pq,) = [a for a in cb.analyses if a.name == "pqnet"]
    assert pq.model is not None and pq.models[0]["sha256"] == load_model(str(path)).card["sha256"]


def test_every_shipped_model_loads_by_its_name():
    from bluesky_xrdml.models import load_model

    assert load_model("pqnet-oxides").phases[0] == "CeO2"  # its own weights, not the demo's
    assert load_model("pqnet-demo").phases == ["Ni", "NiO", "CeO2", "Pd"]
    assert load_model("braggnn-ensemble").provenance()["name"] == "braggnn-ensemble"

"""PQ-Net fine-tuned on labelled runs in a Tiled catalog (``xrdml train pqnet --from-runs``),
through the CLI against the embedded catalog."""

import json

import numpy as np
from test_pqnet import pattern_run
from typer.testing import CliRunner

from bluesky_xrdml import catalog
from bluesky_xrdml.cli import app
from bluesky_xrdml.models import pqnet
from bluesky_xrdml.simulation.instrument import Instrument
from bluesky_xrdml.simulation.powder import PowderSimulator
from bluesky_xrdml.simulation.structures import demo_structures

WL = 0.1771
TT = np.linspace(1.0, 11.0, 1024)


def _file(client, patterns, sample):
    """File a raw run of ``patterns`` on TT whose start says ``sample``; its uid."""
    docs = pattern_run(patterns, TT, WL, obj="det")
    if sample is not None:
        docs[0][1]["sample"] = sample
    writer = catalog.raw_writer(client)
    for name, doc in docs:
        writer(name, doc)
    assert writer.join(60)
    return docs[0][1]["uid"]


def test_train_pqnet_from_labelled_runs_through_the_cli(tiled_client, tmp_path, monkeypatch):
    s = demo_structures()
    # measured on an instrument the model is not told about: broader, asymmetric peaks
    other = Instrument(wavelength=WL, W=0.05**2, asym0=0.01)
    sim = PowderSimulator({"NiO": s["NiO"], "CeO2": s["CeO2"]}, WL, TT, instrument=other)
    rng = np.random.default_rng(0)
    nio = sim.noisy(sim.patterns(np.tile([[2e5, 0.0]], (6, 1)) * sim.step,
                                 np.tile([[4.177, 5.411]], (6, 1)), np.full((6, 2), 40.0))
                    + 30, rng)
    mix = sim.noisy(sim.patterns(np.tile([[1e5, 1e5]], (6, 1)) * sim.step,
                                 np.tile([[4.177, 5.411]], (6, 1)), np.full((6, 2), 40.0))
                    + 30, rng)
    uid1 = _file(tiled_client, nio, {"phases": {"NiO": 1.0}})
    uid2 = _file(tiled_client, mix, {"phases": ["NiO", "CeO2"]})
    unlabelled = _file(tiled_client, nio[:2], None)
    monkeypatch.setenv("TILED_API_KEY", tiled_client.context.api_key or "")
    out = tmp_path / "mine.safetensors"
    args = ["train", "pqnet", "--phase", "NiO", "--phase", "CeO2", "--wavelength", str(WL),
            "--two-theta", "1:11:1024", "--members", "1", "--steps", "40", "--pool", "512",
            "--batch", "64", "--validation", "40", "--threads", "1", "--out", str(out),
            "--catalog", tiled_client.uri, "--run-steps", "60", "--from-runs", uid1, uid2]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "6 patterns" in result.output and "fine-tuning on 12 labelled" in result.output
    card = json.loads(out.with_suffix(".json").read_text())
    runs = card["training"]["runs"]
    assert runs["runs"] == [uid1, uid2] and runs["patterns"] == {uid1: 6, uid2: 6}
    model = pqnet.load(out)
    ds = model.predict(nio)
    assert (ds["presence"].sel(phase="NiO").values > 0.5).all()
    assert (ds["presence"].sel(phase="CeO2").values < 0.5).all()
    assert (ds["fraction"].sel(phase="NiO").values > 0.8).all()
    # what a user can get wrong is said plainly
    bad = CliRunner().invoke(app, [*args[:-2], unlabelled])
    assert bad.exit_code == 2 and "no labels" in bad.output
    bad = CliRunner().invoke(app, [a for a in args if a not in ("--catalog", tiled_client.uri)])
    assert bad.exit_code == 2 and "--catalog" in bad.output

"""The structure classifier: simulation, model contract, training, live use."""

import json
import re
import time

import numpy as np
import pytest
import torch
from bluesky.plans import count
from conftest import shared_data
from ophyd import Signal

from bluesky_xrdml.callbacks import StructureClassification, XRDMLCallback
from bluesky_xrdml.models import load_model
from bluesky_xrdml.models import structure as st
from bluesky_xrdml.simulation import crystals as cr
from bluesky_xrdml.training import structure as ts

# a small, fast architecture for the tests
TINY = {"q": [0.5, 7.0, 256], "conv": [[8, 5], [12, 3]], "diffraction_features": 32,
        "chemistry_hidden": [32, 16], "hidden": 32}


@pytest.fixture(scope="module")
def protos():
    """Prototype crystals in three space groups of three crystal systems (quick to make)."""
    rng = np.random.default_rng(1)
    crystals = []
    for name in ("rocksalt", "rutile", "wurtzite") * 8:
        s = cr.prototype(name, rng)
        d, inten, hkl = cr.peaks(s.get_primitive_structure())
        comp = {str(k): float(v) for k, v in s.composition.reduced_composition
                .get_el_amt_dict().items()}
        crystals.append(cr.Crystal(cr.PROTOTYPES[name][0], comp, d, inten, hkl,
                                   s.get_primitive_structure().lattice
                                   .reciprocal_lattice_crystallographic.matrix, name))
    return cr.CrystalSet.from_crystals(crystals)


@pytest.fixture(scope="module")
def tiny_path(protos, tmp_path_factory):
    """A tiny model trained on the prototypes (weights + card on disk)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = st.StructureNet(TINY)
    q = ts.model_grid(net)
    idx = np.arange(len(protos))
    ts.fit(net, (ts.inputs(protos, np.random.default_rng(k).choice(idx, 32),
                           np.random.default_rng(k), q) for k in range(10**6)), 150,
           lr=3e-3, progress=False, log=lambda *a: None)
    path = tmp_path_factory.mktemp("structure") / "tiny.safetensors"
    from bluesky_xrdml.models import weights

    weights.save(path, dict(net.state_dict()),
                 {"model": "structure", "name": "structure-tiny", "version": "0",
                  "architecture": net.arch, "temperature": {"chemistry": 1.0,
                                                            "pattern_only": 1.0}})
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(str(tiny_path))


def test_generator_is_reproducible_and_symmetric():
    i, a = next((i, c) for i in range(20)
                if (c := cr.make_crystal(7, i, prototype_share=0.0)) is not None)
    b = cr.make_crystal(7, i, prototype_share=0.0)
    assert b is not None
    assert a.space_group == b.space_group and a.composition == b.composition
    np.testing.assert_allclose(a.d, b.d)
    assert np.all(np.diff(a.d) <= 0) and a.intensity.max() == pytest.approx(1.0)


def test_materials_project_prior_draws_common_groups_reproducibly():
    """The "mp" prior: space groups (and their Wyckoff positions) as often as among
    Materials Project structures; Fm-3m and P-1 common, P1 rare; reproducible."""
    p = cr.space_group_prior("mp")
    assert p.sum() == pytest.approx(1) and p.argmax() + 1 in (225, 2)
    assert p[224] > 20 * p[0] and cr.space_group_prior("uniform")[0] == pytest.approx(1 / 230)
    made = [c for i in range(12) if (c := cr.make_crystal(3, i, 0.0, "mp")) is not None]
    assert len(made) >= 8
    assert all(p[c.space_group - 1] > 0 for c in made)
    again = cr.make_crystal(3, 0, 0.0, "mp")
    first = cr.make_crystal(3, 0, 0.0, "mp")
    assert (again is None) == (first is None)
    if first is not None:
        assert again.space_group == first.space_group and again.composition == first.composition


def test_split_keeps_composition_families_apart(protos):
    split = protos.split(test=0.3, validation=0.3)
    fams = {k: set(protos.family[v]) for k, v in split.items()}
    assert not (fams["train"] & fams["test"]) and not (fams["train"] & fams["validation"])
    assert sum(len(v) for v in split.values()) == len(protos)


def test_cache_round_trip(protos, tmp_path):
    protos.save(tmp_path / "set.npz")
    back = cr.CrystalSet.load(tmp_path / "set.npz")
    np.testing.assert_array_equal(back.space_group, protos.space_group)
    sub = back.subset([2, 0])
    np.testing.assert_allclose(sub.d[: sub.offsets[1]], protos.d[protos.offsets[2]:
                                                                  protos.offsets[3]])


def test_rendered_rocksalt_peaks_sit_at_their_q(protos):
    q = cr.q_grid(2048)
    i = int(np.nonzero(protos.source == "rocksalt")[0][0])
    y, mask = cr.render(protos, np.array([i]), np.random.default_rng(0), q, aug=None)
    assert mask.all() and y.max() == pytest.approx(1.0)
    sl = slice(protos.offsets[i], protos.offsets[i + 1])
    d, inten = protos.d[sl].astype(float), protos.intensity[sl]
    theta = np.arcsin(0.5 / (2 * d))  # aug=None renders at 0.5 Å
    lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
    strongest = 2 * np.pi / d[np.argmax(inten * lp)]
    assert abs(q[np.argmax(y[0])] - strongest) < 2 * (q[1] - q[0])
    for qk in 2 * np.pi / d[(2 * np.pi / d) < q[-1]]:  # every reflection is a peak
        assert y[0, np.argmin(abs(q - qk))] > 0


@pytest.mark.parametrize("points", [1024, 700])
def test_rebinning_puts_a_measured_peak_at_its_q(points):
    """A peak measured at 2θ (any λ) lands on the model grid at its Q, whether the scan is
    finer or coarser than the grid; bins outside the scan are masked."""
    q = cr.q_grid(1024, 0.5, 7.0)
    wl, tt = 0.7093, np.linspace(5, 60, points)
    q_peak = 3.0
    tt_peak = np.degrees(2 * np.arcsin(q_peak * wl / (4 * np.pi)))
    y = 10 + 1000 * np.exp(-0.5 * ((tt - tt_peak) / 0.03) ** 2)
    x, mask = st.rebin(y[None], tt, wl, q)
    step = np.gradient(q)
    k = int(np.argmax(x[0]))
    assert abs(q[k] - q_peak) <= step[k]
    covered = q[mask[0] > 0]
    assert covered.min() == pytest.approx(cr.q_of(5, wl), abs=2 * step[0])
    assert covered.max() == pytest.approx(min(cr.q_of(60, wl), 7.0), abs=2 * step[-1])


@pytest.mark.parametrize("name", ["rutile", "wurtzite", "corundum", "gdfeo3", "baddeleyite",
                                  "spinel"])
def test_lattice_distortion_keeps_the_symmetry_and_matches_pymatgen(name):
    """The augmentation's strained peak positions are those pymatgen computes for the
    deformed structure, whose space group is unchanged."""
    from pymatgen.analysis.elasticity.strain import Deformation
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    s = cr.prototype(name, np.random.default_rng(3))
    sg = cr.PROTOTYPES[name][0]
    prim = s.get_primitive_structure(tolerance=1e-3)
    d, inten, hkl = cr.peaks(prim)
    f = cr.lattice_strain(int(cr.crystal_system_index(sg)), np.random.default_rng(5), 0.06)
    assert not np.allclose(f, np.eye(3))
    r = prim.lattice.reciprocal_lattice_crystallographic.matrix
    strained = 1 / np.linalg.norm(hkl @ (r @ np.linalg.inv(f)), axis=1)
    deformed = Deformation(f).apply_to_structure(s)
    assert SpacegroupAnalyzer(deformed, symprec=1e-3).get_space_group_number() == sg
    d2, _, _ = cr.peaks(deformed.get_primitive_structure(tolerance=1e-3))
    inside = strained > 2 * np.pi / 7.2 * 1.08  # clear of the peak list's Q cut
    assert np.abs(strained - d).max() > 0.01  # it moved the peaks
    for x in strained[inside]:
        assert np.min(np.abs(d2 - x)) < 1e-6


def test_powder_classes_group_the_extinction_symbols():
    """Space groups with one powder extinction class: the textbook monoclinic groups,
    the F-centred cubic groups without further conditions, P6_3/mmc with P6_3mc and
    P-62c, Pnma with Pna2_1; P2_1/c stands alone. The ceiling of a uniform test set follows."""
    from bluesky_xrdml.simulation import powder_classes as pc

    c = pc.powder_classes()
    same = [[3, 6, 10], [4, 11], [5, 8, 12], [7, 13], [9, 15], [196, 202, 209, 216, 225],
            [186, 190, 194], [195, 200, 207, 215, 221], [33, 62]]
    for group in same:
        assert len({int(c[g - 1]) for g in group}) == 1, group
    for a, b in [(3, 4), (14, 13), (225, 229), (62, 63), (221, 229), (194, 191)]:
        assert c[a - 1] != c[b - 1], (a, b)
    assert (c == c[13]).sum() == 1
    ceiling = pc.ceiling(np.arange(1, 231))
    assert ceiling["space_group_top1"] == pytest.approx(ceiling["classes"] / 230)
    assert ceiling["space_group_top1"] < ceiling["space_group_top5"] <= 1


def test_measured_composition_loses_light_elements():
    comp = np.zeros((200, len(cr.ELEMENTS)))
    comp[:, cr.Z["Fe"]], comp[:, cr.Z["O"]] = 2, 3
    m = cr.measured_composition(comp, np.random.default_rng(0), p_light_missing=0.5)
    assert np.allclose(m.sum(1), 1, atol=1e-5)
    lost = m[:, cr.Z["O"]] == 0
    assert 0.3 < lost.mean() < 0.7
    assert np.allclose(m[lost, cr.Z["Fe"]], 1)


def test_predict_contract_and_hierarchy(tiny, protos):
    q = tiny.q
    y, _ = cr.render(protos, np.arange(6), np.random.default_rng(2), q, aug=None)
    wl = 0.7093
    tt = np.degrees(2 * np.arcsin(np.clip(q * wl / (4 * np.pi), 0, 0.999)))
    for comp in (None, {"Na": 1, "Cl": 1}, ["NaCl", None, {"Ti": 1, "O": 2}, None, None, "ZnO"]):
        out = tiny.predict(y * 1000 + 5, tt, wl, composition=comp)
        assert out["crystal_system"].shape == (6, 7)
        assert out["space_group"].shape == (6, 230)
        np.testing.assert_allclose(out["space_group"].sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(out["crystal_system"].sum(1), 1, atol=1e-5)
        system_of = cr.crystal_system_index(np.arange(1, 231))
        # a space group's probability never exceeds its crystal system's
        assert np.all(out["space_group"] <= out["crystal_system"][:, system_of] + 1e-6)
    assert out["chemistry_used"].tolist() == [True, False, True, False, False, True]
    one = tiny.predict(y[0] * 1000, tt, wl)
    assert one["space_group"].shape == (1, 230)


def test_tiny_model_learns_the_prototypes(tiny, protos):
    rng = np.random.default_rng(5)
    x, chem, label = ts.inputs(protos, np.arange(len(protos)), rng, tiny.q)
    p = torch.softmax(ts.logits_of(tiny.net, x, chem), 1).numpy()
    m = ts.metrics(p, label.numpy() + 1)
    assert m["space_group_top1"] > 0.6  # chance is 1/3 among these three


@pytest.mark.parametrize("bad, message", [
    (dict(patterns=np.ones((2, 50)), two_theta=np.linspace(5, 60, 40)), "do not match"),
    (dict(wavelength=154.06), "outside 0.05-5"),
    (dict(composition={"Xx": 1}), "unknown element"),
    (dict(composition=[{"Fe": 1}] * 3), "3 compositions for 2 patterns"),
    (dict(patterns=np.full((2, 40), np.nan)), "NaN"),
])
def test_bad_input_gives_a_clear_error(tiny, bad, message):
    args = dict(patterns=np.ones((2, 40)), two_theta=np.linspace(5, 60, 40), wavelength=1.5406)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        tiny.predict(**args)


def test_ceo2_real_pattern_runs_through_the_model(tiny):
    data = np.loadtxt(shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.xy"))
    out = tiny.predict(data[:, 1], data[:, 0], 0.4066, composition="CeO2")
    assert out["space_group"].shape == (1, 230) and np.isfinite(out["space_group"]).all()


def test_live_rows_use_the_start_composition(RE, beamline, collector, tiny, tmp_path):
    cb = XRDMLCallback(analyses=[StructureClassification(model=tiny, plot_dir=tmp_path)])
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(count([beamline.powder], 3), sample={"composition": {"Ni": 1, "O": 1}})
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    rows = collector.stream("structure")
    assert len(rows) == 3
    for row in rows:
        assert row["chemistry_used"] == 1 and "Ni" in row["composition"]
        ps = [row[f"p_sg_{i}"] for i in range(1, 6)]
        assert ps == sorted(ps, reverse=True) and 1 <= row["sg_1"] <= 230
        assert sum(row[f"p_{c}"] for c in cr.CRYSTAL_SYSTEMS) == pytest.approx(1, abs=1e-5)
    (start,) = collector.of("start")
    assert start["xrdml"]["routes"] == {"powder_pattern": ["structure"]}
    assert list(tmp_path.glob("structure_*.png"))


def test_live_composition_from_a_data_key_in_either_order(RE, beamline, collector, tiny):
    xrf = Signal(name="xrf", value="")
    cb = XRDMLCallback(analyses=[StructureClassification(model=tiny, composition_key="xrf")])
    cb.subscribe(collector)
    RE.subscribe(cb)

    def plan():
        for i, comp in enumerate(["NiO", json.dumps({"Ni": 0.5, "O": 0.5}), ""]):
            yield from _set(xrf, comp)
            yield from count([xrf, beamline.powder] if i % 2 else [beamline.powder, xrf], 1)

    RE(plan())
    assert cb.wait(timeout=60)
    runs = [r for r in cb.summaries() if r["analysis_uid"]]
    assert len(runs) == 3
    rows = collector.stream("structure")
    assert [r["chemistry_used"] for r in rows] == [1, 1, 0]  # the last: empty reading


def _set(sig, value):
    from bluesky.plan_stubs import null

    sig.put(value)
    yield from null()


def test_finetune_on_labelled_patterns_improves_them(tiny, tiny_path, protos, tmp_path):
    # "measured" patterns of a wurtzite at Cu Kα, labelled 186, as a run would hold them
    i = int(np.nonzero(protos.source == "wurtzite")[0][0])
    q = tiny.q
    y, _ = cr.render(protos, np.full(12, i), np.random.default_rng(3), q)
    wl = 1.5406
    ok = q * wl / (4 * np.pi) < 0.99
    tt = np.degrees(2 * np.arcsin(q[ok] * wl / (4 * np.pi)))
    runs = [{"uid": "run-1", "patterns": y[:, ok] * 500 + 20, "two_theta": tt,
             "wavelength": wl, "space_group": 186, "composition": "ZnO"}]
    torch.manual_seed(0)
    card = ts.finetune(runs, tmp_path / "ft", base=tiny_path, steps=30, lr=1e-3,
                       simulated=protos, progress=False, log=lambda *a: None)
    m = card["finetune"]["on_the_runs_themselves"]
    assert m["after"]["space_group_top1"] >= m["before"]["space_group_top1"]
    assert m["after"]["space_group_top1"] > 0.5
    assert (tmp_path / "ft.png").exists()
    assert load_model(str(tmp_path / "ft.safetensors")).card["finetune"]["runs"] == ["run-1"]


def test_train_command_writes_weights_card_and_curve(protos, tmp_path):
    from typer.testing import CliRunner

    from bluesky_xrdml.cli import app

    protos.subset(np.arange(20)).save(tmp_path / "cache" / "seed0" / "chunk00000-100.npz")
    out = tmp_path / "s.safetensors"
    res = CliRunner().invoke(app, ["train", "structure", "--structures", "20", "--cache",
                                   str(tmp_path / "cache"), "--steps", "6", "--batch", "4",
                                   "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # output captured (not a terminal): plain progress lines, not a silent rich bar
    assert re.search(r"structure: step 6/6 \| loss [\d.]+ acc [\d.]+.* elapsed, ~0s left",
                     res.output), res.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["model"] == "structure" and card["data"]["structures"] == 20
    assert set(card["temperature"]) == {"chemistry", "pattern_only"}
    assert out.with_suffix(".png").exists()
    assert load_model(str(out)).predict(np.ones(300), np.linspace(5, 80, 300), 1.54)[
        "space_group"].shape == (1, 230)


def test_shipped_model_ranks_ceo2_fluorite_cubic():
    data = np.loadtxt(shared_data("ceo2_pilatus1m", "CeO2_Pilatus1M.xy"))
    model = load_model("structure")
    assert model.card["model"] == "structure" and model.card["temperature"]["chemistry"] > 0
    out = model.predict(data[:, 1], data[:, 0], 0.4066, composition="CeO2")
    numbers, _ = st.top_space_groups(out["space_group"], 2)
    assert cr.CRYSTAL_SYSTEMS[int(out["crystal_system"][0].argmax())] == "cubic"
    assert 225 in numbers[0]  # Fm-3m


def test_finetune_from_a_labelled_run_in_the_catalog(tiled_client, RE, beamline, tiny_path,
                                                     tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bluesky_xrdml import catalog
    from bluesky_xrdml.cli import app

    RE.subscribe(catalog.raw_writer(tiled_client))
    (uid,) = RE(count([beamline.powder], 3),
                sample={"space_group": 225, "composition": {"Ni": 1, "O": 1}})
    monkeypatch.setenv("TILED_API_KEY", tiled_client.context.api_key or "")
    out = tmp_path / "ft.safetensors"
    args = ["train", "structure", "--from-runs", uid, "--catalog", tiled_client.uri,
            "--base", str(tiny_path), "--cache", str(tmp_path / "none"), "--steps", "5",
            "--threads", "1", "--out", str(out)]
    for _ in range(20):  # the raw writer files the run on its own thread
        res = CliRunner().invoke(app, args)
        if "has no" not in res.output:
            break
        time.sleep(0.5)
    assert res.exit_code == 0, res.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["finetune"]["runs"] == [uid] and card["finetune"]["patterns"] == 3
    bad = CliRunner().invoke(app, ["train", "structure", "--from-runs", "nope", "--catalog",
                                   tiled_client.uri])
    assert bad.exit_code != 0 and "no run" in bad.output

"""BraggNN: architecture, predict contract, training, frame pipeline, callback, fine-tuning."""

import json
import re

import bluesky.plans as bp
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bluesky_xrdml import catalog
from bluesky_xrdml.analysis import locate_peaks
from bluesky_xrdml.callbacks import BraggPeaks, XRDMLCallback
from bluesky_xrdml.cli import app
from bluesky_xrdml.models import braggnn as bnn
from bluesky_xrdml.models import load_model
from bluesky_xrdml.models.weights import WEIGHTS_DIR, sha256_file
from bluesky_xrdml.simulation import SpotSimulator
from bluesky_xrdml.simulation.spots import pseudo_voigt_2d
from bluesky_xrdml.training.braggnn import train_ensemble
from bluesky_xrdml.training.patches import simulate_patches

ROWS, COLS = np.mgrid[0:11, 0:11].astype(float)


@pytest.fixture(scope="module")
def model():
    return load_model("braggnn", device="cpu")


def test_architecture_is_the_reference_one():
    net = bnn.BraggNN()
    assert bnn.n_parameters(net) == 33_166  # ~33 k as in the paper's code
    shapes = {}
    for name in ("conv1", "nlb", "conv2", "conv3"):
        getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    attention = []
    net.nlb.register_forward_hook(lambda m, i, o: attention.append(
        (m.theta(i[0]).flatten(2).transpose(1, 2) @ m.phi(i[0]).flatten(2)).shape))
    out = net(torch.rand(3, 1, 11, 11))
    assert out.shape == (3, 2)
    assert shapes == {"conv1": (3, 64, 9, 9), "nlb": (3, 64, 9, 9), "conv2": (3, 32, 7, 7),
                      "conv3": (3, 8, 5, 5)}
    assert attention == [(3, 81, 81)]  # softmax over the 81 positions
    assert [m.out_features for m in net.dense if isinstance(m, torch.nn.Linear)] == [16, 8, 4, 2]
    assert net.dense[0].in_features == 200
    assert 4.0e6 < bnn.flops_per_patch(net) < 4.4e6


def test_predict_contract_dtypes_coordinates_and_std(model):
    # patches are centred on the brightest pixel, so true centres lie within ±1 px of 5
    truth = np.array([[4.3, 5.8], [5.0, 5.0], [5.6, 4.2]])
    clean = np.stack([20 + pseudo_voigt_2d(ROWS, COLS, r, c, 1.2, 1.0, 0.3, 0.2, 4000)
                      for r, c in truth])
    for dtype in (np.uint16, np.int32, np.float32, np.float64):
        pred = model.predict(clean.astype(dtype))
        assert pred.dtype == np.float64 and pred.shape == (3, 2)
        assert np.all(np.hypot(*(pred - truth).T) < 0.25), (dtype, pred)
    # transposing the patch swaps (row, col): the centre of patch[0, 0] is (0, 0)
    pred_t = model.predict(clean.transpose(0, 2, 1))
    assert np.allclose(pred_t[:, ::-1], model.predict(clean), atol=0.25)
    centre, std = model.predict(clean, return_std=True)
    assert std.shape == (3, 2) and np.all(std >= 0) and np.all(std < 0.5)
    # scaling the counts does not move the centre (min-max scaled input)
    assert np.allclose(model.predict(clean * 7 + 100), centre, atol=1e-4)
    assert model.predict(np.zeros((0, 11, 11))).shape == (0, 2)
    with pytest.raises(ValueError, match="11, 11"):
        model.predict(np.zeros((2, 9, 9)))


def test_shipped_weights_have_a_card_with_provenance(model):
    card = json.loads((WEIGHTS_DIR / "braggnn.json").read_text())
    assert card["sha256"] == sha256_file(WEIGHTS_DIR / "braggnn.safetensors")
    # the default: ONE network without the non-local block (one forward pass per patch)
    # with a variance head, blending an absolute centre and a corrected centroid per peak;
    # ~5× cheaper than one reference network
    arch = card["architecture"]
    assert (arch["outputs"], arch["inter"], arch["blend"]) == (4, 0, True)
    assert arch["channels"] == bnn.WIDE_BLEND["channels"]
    assert card["flops_per_patch_per_member"] < bnn.flops_per_patch() / 4
    assert card["training"]["reproduce"][0].startswith("xrdml train braggnn")
    assert card["training"]["labels"].startswith("true centres")
    assert {"streak", "saturated", "gap", "sparse"} <= set(card["training"]["recipe"]["kinds"])
    assert card["metrics"]["isolated"]["p75"] < 0.15
    assert 0.55 < card["calibration"]["within_1sigma"] < 0.85
    assert model.provenance() == {"name": "braggnn", "version": card["version"],
                                  "sha256": card["sha256"]}
    assert len(model.ensemble.members) == card["members"] == 1
    assert model.ensemble.members[0].blend
    # the v3.0 pair and the reference 5-member ensemble stay available on request, same
    # contract
    pair = load_model("braggnn-pair", device="cpu")
    assert [m.residual for m in pair.ensemble.members] == [False, True]
    ensemble = load_model("braggnn-ensemble", device="cpu")
    assert len(ensemble.ensemble.members) == 5
    assert ensemble.provenance()["name"] == "braggnn-ensemble"
    for other in (pair, ensemble):
        centre, std = other.predict(np.full((2, 11, 11), 10.0), return_std=True)
        assert centre.shape == std.shape == (2, 2)


@pytest.fixture
def one_thread():
    """Small networks train several times faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_training_beats_the_patch_centre_guess(tmp_path, one_thread):
    torch.manual_seed(0)
    train = simulate_patches(4000, seed=1, kinds=["isolated"])
    val = simulate_patches(1000, seed=2, kinds=["isolated"])
    ensemble = bnn.BraggNNEnsemble(1, seed=1, **bnn.arch_kwargs(bnn.architecture(**bnn.LEAN)))
    history = train_ensemble(ensemble, (train["patches"], train["centre"]), 8, batch=128,
                             lr=2e-3, progress=False, decay_from=0.6)
    assert len(history) == 8
    predictor = bnn.BraggNNPredictor(ensemble)
    err = np.hypot(*(predictor.predict(val["patches"]) - val["centre"]).T)
    guess = np.hypot(*(5.0 - val["centre"]).T)  # the trivial baseline: the patch centre
    # Measured ratio p75(err) / p75(guess): 0.13-0.15 over seeds 0-2 (an untrained network:
    # 1.03). 0.5 leaves a >3× margin for float32 / thread-count / BLAS differences and
    # still fails when training does nothing. (It was 0.5 with the reference network, whose
    # 8 epochs reached 0.49-0.50: no margin; issue 10.)
    assert np.percentile(err, 75) < 0.5 * np.percentile(guess, 75)
    # the variance head learned something: larger σ where the error is larger
    _, std = predictor.predict(val["patches"], return_std=True)
    big = err > np.median(err)
    assert std[big].mean() > std[~big].mean()
    # a user's own file loads the same way as the shipped one
    from bluesky_xrdml.models import weights

    weights.save(tmp_path / "mine.safetensors", bnn.tensors(ensemble),
                 {"model": "braggnn", "name": "mine", "version": "0"})
    mine = load_model(str(tmp_path / "mine.safetensors"))
    assert np.allclose(mine.predict(val["patches"][:5]), predictor.predict(val["patches"][:5]))


def test_residual_network_corrects_the_centroid_and_reloads_as_residual(tmp_path):
    sim = simulate_patches(200, seed=4, kinds=["isolated"])
    patches = sim["patches"].astype(np.float64)
    # the base: the centroid of the pixels above 10 % of the peak and 2σ of the noise over
    # the border's (lower) median
    border = np.concatenate(
        [patches[:, 0], patches[:, -1], patches[:, 1:-1, 0], patches[:, 1:-1, -1]], 1)
    bg = np.sort(border, 1)[:, 19]
    noise = 1.4826 * np.sort(np.abs(border - bg[:, None]), 1)[:, 19]
    signal = np.clip(patches - bg[:, None, None], 0, None)
    cut = np.maximum(0.1 * signal.max(axis=(1, 2)), 2 * noise)
    signal = np.clip(signal - cut[:, None, None], 0, None)
    idx = np.arange(11)
    total = signal.sum(axis=(1, 2))[:, None]
    expected = np.stack([signal.sum(2) @ idx, signal.sum(1) @ idx], 1) / np.maximum(total, 1)
    expected[total[:, 0] == 0] = 5.0  # nothing above the cut: the patch centre
    base = bnn.patch_centroid(bnn.scale_patches(patches)).double().numpy()
    assert np.allclose(base, expected, atol=1e-3)
    # a residual network whose correction is zero returns that centroid
    net = bnn.BraggNNEnsemble(1, seed=0,
                              **bnn.arch_kwargs(bnn.architecture(**bnn.LEAN_RESIDUAL)))
    assert net.members[0].residual
    with torch.no_grad():
        net.members[0].dense[-1].weight[:2] = 0
    predictor = bnn.BraggNNPredictor(net)
    assert np.allclose(predictor.predict(patches), expected, atol=1e-3)
    # the bright compact spots: the base alone is already close to the truth
    err = np.hypot(*(expected - sim["centre"]).T)[sim["snr"] > 30]
    assert np.median(err) < 0.1
    # saved without any architecture in the card, the weights still load as residual
    from bluesky_xrdml.models import weights

    torch.manual_seed(3)
    with torch.no_grad():
        net.members[0].dense[-1].weight[:2] = 0.01 * torch.randn(2, 32)
    weights.save(tmp_path / "res.safetensors", bnn.tensors(net),
                 {"model": "braggnn", "name": "res", "version": "0"})
    again = load_model(str(tmp_path / "res.safetensors"))
    assert again.ensemble.members[0].residual
    assert np.allclose(again.predict(patches), predictor.predict(patches), atol=1e-5)


def test_networks_of_two_architectures_combine_by_their_variances(tmp_path):
    from bluesky_xrdml.models import weights

    paths = []
    for i, arch in enumerate((bnn.LEAN, bnn.LEAN_RESIDUAL)):
        net = bnn.BraggNNEnsemble(1, seed=i, **bnn.arch_kwargs(bnn.architecture(**arch)))
        paths.append(tmp_path / f"part{i}.safetensors")
        weights.save(paths[-1], bnn.tensors(net), {"model": "braggnn", "name": f"part{i}",
                                                  "version": str(i)})
    out = tmp_path / "pair.safetensors"
    result = CliRunner().invoke(app, ["train", "braggnn", "--combine", str(paths[0]),
                                      "--combine", str(paths[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["members"] == 2 and [a.get("residual", False) for a in
                                     card["architecture"]["members"]] == [False, True]
    assert [p["version"] for p in card["combined_from"]] == ["0", "1"]
    assert out.with_suffix(".png").exists()
    pair = load_model(str(out))
    assert [m.residual for m in pair.ensemble.members] == [False, True]
    # each peak: the members' centres weighted by their inverse predicted variances
    patches = simulate_patches(50, seed=3)["patches"]
    y = pair.raw(patches)
    w = 1 / (np.exp(y[..., 2:]) * 121)
    expected = (w * y[..., :2]).sum(0) / w.sum(0)
    centre, std = pair.predict(patches, return_std=True)
    assert np.allclose(centre, expected, atol=1e-9) and np.all(std > 0)
    bad = CliRunner().invoke(app, ["train", "braggnn", "--combine", str(paths[0]), "--out",
                                   str(out)])
    assert bad.exit_code != 0 and "at least two" in bad.output


def test_blend_network_starts_from_a_pair_and_distils_it(tmp_path, one_thread):
    from bluesky_xrdml.models import weights

    # a pair of tiny untrained networks: absolute and residual
    paths = []
    for i, arch in enumerate((bnn.LEAN, bnn.LEAN_RESIDUAL)):
        net = bnn.BraggNNEnsemble(1, seed=i, **bnn.arch_kwargs(bnn.architecture(**arch)))
        paths.append(tmp_path / f"part{i}.safetensors")
        weights.save(paths[-1], bnn.tensors(net), {"model": "braggnn", "version": str(i)})
    pair_path = tmp_path / "pair.safetensors"
    assert CliRunner().invoke(app, ["train", "braggnn", "--combine", str(paths[0]), "--combine",
                                    str(paths[1]), "--out", str(pair_path)]).exit_code == 0
    out = tmp_path / "blend.safetensors"
    result = CliRunner().invoke(app, [
        "train", "braggnn", "--arch", "lean-blend", "--resume", str(pair_path), "--teacher",
        str(pair_path), "--faint-share", "0.2", "--epochs", "1", "--patches-per-epoch",
        "600", "--lr", "0", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["members"] == 1 and card["architecture"]["blend"]
    assert card["training"]["distilled_from"]["sha256"] == sha256_file(pair_path)
    assert card["training"]["faint_compact"]["share"] == 0.2
    assert card["training"]["command"].startswith("xrdml ")  # how to run it again
    # untrained (lr 0): the residual network's layers, its corrected centroid weighted by
    # the gate's start sigmoid(2), the rest the patch centre; its variance head unchanged
    blend = load_model(str(out))  # the blend is read from the tensors
    assert blend.ensemble.members[0].blend and len(blend.ensemble.members) == 1
    patches = simulate_patches(50, seed=3)["patches"]
    res = load_model(str(paths[1])).raw(patches)[0]
    y = blend.raw(patches)[0]
    g = 1 / (1 + np.exp(-2.0))
    assert np.allclose(y[:, :2], g * res[:, :2] + (1 - g) * 5.0, atol=1e-4)
    assert np.allclose(y[:, 2:], res[:, 2:], atol=1e-5)
    # the extra faint spots: at most that many σ of the background high
    faint = simulate_patches(300, seed=5, kinds=["isolated"], max_height_sigmas=10)
    assert np.all(faint["height"] <= np.maximum(10 * faint["noise"], 15.2))


def nearest(truth, table):
    d = np.hypot(truth["row"].to_numpy()[:, None] - table["row"].to_numpy()[None],
                 truth["col"].to_numpy()[:, None] - table["col"].to_numpy()[None])
    return d.min(axis=1)


def test_every_method_finds_isolated_spots_at_their_true_centres(model):
    sim = SpotSimulator(seed=11)
    errors = {m: [] for m in ("braggnn", "pseudo-voigt", "centroid")}
    for omega in (0.4, 3.3, 7.1):
        frame = sim.frame(omega, np.random.default_rng(4))
        truth = sim.truth(omega)
        iso = truth[truth["isolated"] & (truth["height"] > 300)]
        for method in errors:
            table = locate_peaks(frame, method=method, model=model)
            errors[method].append(nearest(iso, table))
            assert set(table["method"]) <= {method, "pseudo-voigt", "pseudo-voigt-multi",
                                            "centroid"}
    errors = {m: np.concatenate(e) for m, e in errors.items()}
    assert len(errors["braggnn"]) >= 15
    for method in ("braggnn", "pseudo-voigt", "centroid"):
        assert np.median(errors[method]) < 0.08, (method, np.median(errors[method]))
        assert np.all(errors[method] < 0.6)


def frame_with(peaks, shape=(48, 64), bg=15.0, seed=0):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    expected = np.full(shape, bg)
    for r, c, h in peaks:
        expected += pseudo_voigt_2d(rows, cols, r, c, 1.2, 1.1, 0.3, 0.2, h)
    return np.random.default_rng(seed).poisson(expected).astype(np.uint16)


def row_near(table, r, c):
    d = np.hypot(table["row"] - r, table["col"] - c)
    return table.iloc[int(np.argmin(d))], float(d.min())


def test_edge_and_multi_flags_and_who_centred_them(model):
    truth = [(24.3, 20.6, 5000), (1.8, 40.2, 5000), (30.2, 50.1, 4000), (33.1, 54.3, 3000)]
    table = locate_peaks(frame_with(truth), method="braggnn", model=model)
    clean, d0 = row_near(table, 24.3, 20.6)
    assert clean["flag"] == "" and clean["method"] == "braggnn" and d0 < 0.15
    edge, d1 = row_near(table, 1.8, 40.2)
    assert "edge" in edge["flag"] and edge["method"] == "braggnn" and d1 < 0.3
    # a doublet: BraggNN (trained on neighbours) centres both peaks itself by default ...
    for r, c, _ in truth[2:]:
        row, d = row_near(table, r, c)
        assert "multi" in row["flag"] and row["method"] == "braggnn"
        assert d < 0.3, (r, c, d)
    # ... and the multi-peak fit does it on request
    fitted = locate_peaks(frame_with(truth), method="braggnn", model=model, fit_multi=True)
    for r, c, _ in truth[2:]:
        row, d = row_near(fitted, r, c)
        assert "multi" in row["flag"] and row["method"] == "pseudo-voigt-multi"
        assert d < 0.2, (r, c, d)
    # the centroid of the same pair is pulled toward the neighbour
    cen = locate_peaks(frame_with(truth), method="centroid")
    assert row_near(cen, 30.2, 50.1)[1] > 0.2


def test_uncertain_peaks_are_redone_by_the_fit(model):
    frame = frame_with([(24.3, 20.6, 5000), (10.4, 45.2, 800)])
    # a threshold of 0 px: every peak the network centred counts as uncertain
    strict = bnn.BraggNNPredictor(model.ensemble, {**model.card, "uncertain_std_px": 0.0})
    table = locate_peaks(frame, method="braggnn", model=strict)
    assert (table["flag"] == "uncertain").all() and (table["method"] == "braggnn").all()
    table = locate_peaks(frame, method="braggnn", model=strict, refit_uncertain=True)
    assert (table["flag"] == "uncertain").all() and (table["method"] == "pseudo-voigt").all()
    assert row_near(table, 24.3, 20.6)[1] < 0.15
    # with the calibrated threshold, few bright isolated peaks are flagged, and patches of
    # pure noise (no peak to agree on) several times more often
    bright = simulate_patches(1500, seed=5, kinds=["isolated"])
    _, std_bright = model.predict(bright["patches"][bright["snr"] > 20], return_std=True)
    noise = np.random.default_rng(0).poisson(20, (500, 11, 11))
    _, std_noise = model.predict(noise, return_std=True)
    rate_bright = np.mean(std_bright.max(1) > model.uncertain_px)
    rate_noise = np.mean(std_noise.max(1) > model.uncertain_px)
    assert rate_bright < 0.08 and rate_noise > 3 * rate_bright, (rate_bright, rate_noise)
    # the calibrated std matches the error on held-out simulated patches
    held_out = simulate_patches(2000, seed=5)
    pred, std = model.predict(held_out["patches"], return_std=True)
    z = np.abs(pred - held_out["centre"]) / std
    assert 0.55 < np.mean(z < 1) < 0.95 and np.mean(z < 3) > 0.9


def test_live_callback_uses_braggnn_and_records_its_provenance(RE, beamline, collector):
    cb = XRDMLCallback()
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.scan([beamline.area], beamline.rot, 0.0, 2.0, 3))
    assert cb.wait(timeout=60)
    (start,) = collector.of("start")
    card = json.loads((WEIGHTS_DIR / "braggnn.json").read_text())
    sha = sha256_file(WEIGHTS_DIR / "braggnn.safetensors")
    assert start["xrdml"]["models"] == [{"name": "braggnn", "version": card["version"],
                                         "sha256": sha}]
    assert start["xrdml"]["config"]["bragg-peaks"]["method"] == "braggnn"
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    peaks = collector.stream("peaks")
    assert {p["method"] for p in peaks} >= {"braggnn"}
    errors = []
    for i, truth in enumerate(beamline.area.truth, start=1):
        iso = truth[truth["isolated"] & (truth["height"] > 500)]
        found = np.array([(p["row"], p["col"]) for p in peaks if p["frame"] == i])
        errors += [np.min(np.hypot(found[:, 0] - r, found[:, 1] - c))
                   for r, c in zip(iso["row"], iso["col"])]
    assert len(errors) >= 5 and np.median(errors) < 0.12


def test_missing_weights_fall_back_to_centroids_and_say_why(tmp_path):
    analysis = BraggPeaks(weights=str(tmp_path / "nowhere.safetensors"))
    assert analysis.method == "centroid"
    assert analysis.models == []
    assert "no weights" in analysis.config["fallback"]
    assert BraggPeaks(method="centroid").models == []
    with pytest.raises(ValueError, match="available"):
        BraggPeaks(method="magic")


def test_finetune_on_an_archived_run_through_the_cli(tiled_client, RE, beamline, tmp_path,
                                                     monkeypatch):
    RE.subscribe(catalog.raw_writer(tiled_client))
    (uid,) = RE(bp.scan([beamline.area], beamline.rot, 0.0, 7.0, 8))
    uri = tiled_client.uri
    monkeypatch.setenv("TILED_API_KEY", tiled_client.context.api_key or "")
    out = tmp_path / "mine.safetensors"
    result = CliRunner().invoke(app, ["train", "braggnn", "--from-run", uid, "--catalog", uri,
                                      "--out", str(out), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "labelled" in result.output and "area_image" in result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["base"]["sha256"] == sha256_file(WEIGHTS_DIR / "braggnn.safetensors")
    assert card["training"]["data"]["run"] == uid
    assert card["training"]["labelled"]["labelled"] >= 15
    assert out.with_suffix(".png").exists()
    mine = load_model(str(out))
    assert mine.provenance()["sha256"] == card["sha256"]
    # the fine-tuned model still centres isolated peaks well
    clean = simulate_patches(300, seed=9, kinds=["isolated"])
    good = clean["snr"] > 10
    err = np.hypot(*(mine.predict(clean["patches"][good]) - clean["centre"][good]).T)
    assert np.median(err) < 0.15
    # an unknown run says so
    bad = CliRunner().invoke(app, ["train", "braggnn", "--from-run", "nope", "--catalog", uri])
    assert bad.exit_code != 0 and "no run" in bad.output


RUBY = "mruby-0129_000004_ff1_000012-cachefile.npz"


def test_real_ruby_frames_braggnn_matches_whole_spot_fits(model):
    from conftest import shared_data

    from bluesky_xrdml.training.braggnn import frames_from_cache, label_spots

    frames = frames_from_cache(shared_data("ruby_dexela", RUBY))
    z = frames.z
    busiest = sorted(range(len(frames)), key=lambda i: z[f"{i}_data"].size)[-12:]
    err = {"braggnn": [], "centroid": []}
    for i in busiest:
        frame = frames[i]
        labels = label_spots(frame)[["row", "col"]].to_numpy()
        for method in err:
            table = locate_peaks(frame, method=method, model=model)
            found = table[["row", "col"]].to_numpy()
            d = np.hypot(labels[:, :1] - found[None, :, 0], labels[:, 1:] - found[None, :, 1])
            err[method].append(d.min(axis=1))
    err = {m: np.concatenate(e) for m, e in err.items()}
    assert len(err["braggnn"]) >= 10
    assert np.mean(err["braggnn"] < 1.5) >= 0.9  # recall of the labelled isolated spots
    hit = err["braggnn"][err["braggnn"] < 1.5]
    assert np.median(hit) < 0.1, np.median(hit)


def test_frame_cache_ranges_and_omega_sums():
    from conftest import shared_data

    from bluesky_xrdml.training.braggnn import ChainedFrames, frames_from_cache

    path = shared_data("ruby_dexela", RUBY)
    single = frames_from_cache(path, start=100, stop=108)
    summed = frames_from_cache(path, start=100, stop=108, summed=4)
    assert len(single) == 8 and len(summed) == 2  # frames 100-103 and 104-107
    assert summed[1].dtype == np.uint32
    assert np.array_equal(summed[1], sum(single[k].astype(np.uint32) for k in range(4, 8)))
    both = ChainedFrames([single, summed])
    assert len(both) == 10 and np.array_equal(both[9], summed[1])
    assert len(frames_from_cache(path, step=24, stop=720)) == 30


def test_finetune_on_real_frames_from_a_frame_cache(tmp_path):
    from conftest import shared_data

    path = shared_data("ruby_dexela", RUBY)
    other = path.with_name(RUBY.replace("ff1", "ff2"))  # the second panel
    out = tmp_path / "ruby.safetensors"
    result = CliRunner().invoke(app, ["train", "braggnn", "--frame-cache", str(path),
                                      "--frame-cache", str(other), "--frame-range", "0:720",
                                      "--frame-step", "24", "--max-frames", "20", "--epochs",
                                      "3", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count(": 20 frames") == 2  # frames 0, 24, .., 456 of each panel
    assert "held-out spots" in result.output
    # output captured (not a terminal): a plain progress line per epoch, with the time left
    epochs = re.findall(r"BraggNN: epoch (\d)/3 \| train rmse [\d.]+ px.* elapsed, ~\S+ left",
                        result.output)
    assert epochs == ["1", "2", "3"], result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["data"]["frame_cache"] == [str(path), str(other)]
    assert card["training"]["data"]["frame_range"] == "0:720"
    assert card["training"]["labelled"]["labelled"] >= 15
    assert card["training"]["labels"].startswith("whole-spot fits")
    m = card["metrics"]["held_out_error_vs_labels_px"]
    assert m["after"]["n"] >= 3 and m["after"]["p75"] < 0.3
    assert load_model(str(out)).provenance()["sha256"] == card["sha256"]
    bad = CliRunner().invoke(app, ["train", "braggnn", "--frame-cache", str(tmp_path / "no.npz")])
    assert bad.exit_code != 0 and "no frame cache" in bad.output
    bad = CliRunner().invoke(app, ["train", "braggnn", "--frame-cache", str(path),
                                   "--frame-range", "a:b"])
    assert bad.exit_code != 0 and "START:STOP" in bad.output


def test_train_cli_width_overrides_the_architecture():
    import typer

    from bluesky_xrdml.training.cli import _arch

    arch = _arch("lean-blend", "16,32,16/128,64")
    assert arch["channels"] == [16, 32, 16] and arch["fc"] == [128, 64] and arch["blend"]
    assert _arch("lean-blend") == bnn.LEAN_BLEND
    net = bnn.BraggNN(**bnn.arch_kwargs(bnn.architecture(**arch)))
    assert net.conv1.out_channels == 16 and net.dense[-1].in_features == 64
    for bad in ("16,32/128", "16,32,16", "a,b,c/1", "16,0,16/64"):
        with pytest.raises(typer.BadParameter, match="--width"):
            _arch("lean", bad)

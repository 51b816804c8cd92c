"""Training BraggNN: from simulation (true centres) or fine-tuned on a user's frames.

- ``train_from_simulation``: fresh simulated patches every epoch (``patches.simulate_patches``),
  the network trained against the TRUE centres (the intensity centroid of the whole spot)
  so it can beat a fit; Adam, MSE on centre / patch size, plus the Gaussian NLL of the
  variance head. One lean network by default; an ensemble on request.
- ``finetune_from_frames``: the authors' workflow on your own data: spots found in your
  frames, isolated ones labelled by whole-spot fits (``label_spots``:
  ``analysis.fitting.fit_spot``), the network fine-tuned on them (with the 8
  flips/transposes of each patch), the gain measured on held-out frames.

Both write ``.safetensors`` + a JSON model card (``models.weights.save``) and a loss-curve
PNG beside it.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..models import braggnn as bnn
from ..models import weights as weights_io
from .patches import KINDS, RECIPE, simulate_patches
from .progress import TrainingProgress

PATCH = bnn.PATCH
PAPER = "Liu et al., BraggNN, IUCrJ 9, 104-113 (2022), doi:10.1107/S2052252521011258"


def _lr_factor(progress: float, decay_from: float = 0.7, final: float = 0.1) -> float:
    """Constant, then a linear decay to ``final`` over the last ``1 - decay_from``."""
    if progress <= decay_from:
        return 1.0
    return 1.0 - (1.0 - final) * min(1.0, (progress - decay_from) / (1.0 - decay_from))


def _dihedral(patches: np.ndarray, centres: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """A random flip/transpose of each patch, with its centre moved along."""
    p, c = patches.copy(), centres.copy()
    last = PATCH - 1
    t = rng.random(len(p)) < 0.5
    p[t] = p[t].transpose(0, 2, 1)
    c[t] = c[t][:, ::-1]
    fr = rng.random(len(p)) < 0.5
    p[fr] = p[fr, ::-1, :]
    c[fr, 0] = last - c[fr, 0]
    fc = rng.random(len(p)) < 0.5
    p[fc] = p[fc, :, ::-1]
    c[fc, 1] = last - c[fc, 1]
    return p, c


def _losses(out: torch.Tensor, y: torch.Tensor):
    """``(MSE of the centre, Gaussian NLL of the variance head)``. The head learns the
    variance of the residual with the centre detached, so the centre is trained by MSE
    alone (as the reference) and the variance cannot trade accuracy for a wider σ."""
    mse = torch.nn.functional.mse_loss(out[:, :2], y)
    if out.shape[1] == 2:
        return mse, torch.zeros((), dtype=out.dtype)
    logvar = out[:, 2:].clamp(-30, 10)
    resid2 = (out[:, :2].detach() - y) ** 2
    nll = 0.5 * (logvar + resid2 * torch.exp(-logvar)).mean()
    # NLL is O(10) while the MSE of centre / patch size is O(1e-3): weight it down so the
    # shared layers keep serving the centre first
    return mse, 1e-3 * nll


def train_ensemble(ensemble: bnn.BraggNNEnsemble, data, epochs: int, *, batch: int = 512,
                   lr: float = 3e-4, seed: int = 0, val=None, minutes: float | None = None,
                   progress: bool = True, decay_from: float = 0.7, augment: bool = False,
                   log=print) -> list[dict]:
    """Train every member on ``data``: a function ``epoch -> (patches, centres)`` (fresh
    patches each epoch) or a fixed ``(patches, centres)``. ``val`` = ``(patches, centres)``
    is evaluated after each epoch. ``minutes`` caps the time (the learning-rate decay then
    follows the clock). Returns the history: one dict per epoch."""
    rng = np.random.default_rng(seed)
    members = list(ensemble.members)
    for m in members:
        m.train().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(ensemble.parameters(), lr=lr)
    history: list[dict] = []
    budget = minutes * 60 if minutes else None
    t0 = time.perf_counter()
    step, total_steps = 0, None
    val_x = bnn.scale_patches(val[0]).contiguous(memory_format=torch.channels_last) if val else None
    with TrainingProgress("BraggNN", total=epochs, unit="epoch", log=log, enabled=progress,
                          budget_s=budget) as bar:
        for epoch in range(epochs):
            patches, centres = data(epoch) if callable(data) else data
            if augment:
                patches, centres = _dihedral(np.asarray(patches), np.asarray(centres), rng)
            x = bnn.scale_patches(patches).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(np.asarray(centres) / PATCH, dtype=torch.float32)
            n = len(x)
            steps = max(1, n // batch) if n >= batch else 1
            if total_steps is None:
                total_steps = steps * epochs
            perms = [torch.from_numpy(rng.permutation(n)) for _ in members]
            losses = []
            for s in range(steps):
                progress_frac = step / total_steps
                if budget:
                    progress_frac = max(progress_frac, (time.perf_counter() - t0) / budget)
                for group in opt.param_groups:
                    group["lr"] = lr * _lr_factor(progress_frac, decay_from)
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                mse_sum = 0.0
                for m, perm in zip(members, perms):
                    idx = perm[s * batch:(s + 1) * batch]
                    mse, nll = _losses(m(x[idx]), y[idx])
                    loss = loss + mse + nll
                    mse_sum += mse.item()
                loss.backward()
                opt.step()
                losses.append(mse_sum / len(members))
                step += 1
                if s + 1 < steps:  # a line now and then within long epochs
                    bar.update(epoch + (s + 1) / steps,
                               info=f"train rmse {np.sqrt(np.mean(losses)) * PATCH:.3f} px")
                if budget and time.perf_counter() - t0 > budget:
                    break
            record = {"epoch": epoch + 1, "train_rmse_px": float(np.sqrt(np.mean(losses)) * PATCH),
                      "seconds": time.perf_counter() - t0, "patches": n,
                      "lr": opt.param_groups[0]["lr"]}
            if val is not None:
                with torch.inference_mode():
                    ensemble.eval()
                    pred = ensemble(val_x)[..., :2].mean(0).double().numpy() * PATCH
                    ensemble.train()
                err = np.hypot(*(pred - np.asarray(val[1])).T)
                record.update(val_p50_px=float(np.percentile(err, 50)),
                              val_p75_px=float(np.percentile(err, 75)),
                              val_p95_px=float(np.percentile(err, 95)))
            history.append(record)
            desc = f"train rmse {record['train_rmse_px']:.3f} px"
            if "val_p75_px" in record:
                desc += f", val p75 {record['val_p75_px']:.3f} px"
            bar.update(epoch + 1, info=desc, force=True)
            if budget and time.perf_counter() - t0 > budget:
                log(f"time budget of {minutes} min reached after {epoch + 1} epochs")
                break
    ensemble.eval()
    return history


def _weights(path: str | Path) -> Path:
    """A weights file, or the shipped weights of that name (``braggnn-pair``)."""
    shipped = weights_io.WEIGHTS_DIR / f"{path}.safetensors"
    return Path(path) if Path(path).exists() or not shipped.exists() else shipped


def _start_blend(net: bnn.BraggNN, previous: bnn.BraggNNPredictor) -> str:
    """Start a blend network from one network of ``previous`` (its residual member where it
    has one): its convolutions and hidden dense layers as they are, its centre output as
    the blend's correction (residual) or absolute branch, its variance head as the blend's,
    the other branch at zero weights and the gate leaning to the network's own branch."""
    members = list(previous.ensemble.members)
    i = next((k for k, m in enumerate(members) if m.residual), 0)
    src = members[i]
    if getattr(src, "blend", False) or src.outputs != 4:
        raise ValueError("a blend network starts from a lean or lean-residual network with a "
                         "variance head")
    state = {k: v for k, v in src.state_dict().items() if k != "centroid_base"}
    last = f"dense.{len(net.dense) - 1}"
    w, b = state.pop(f"{last}.weight"), state.pop(f"{last}.bias")
    own = net.state_dict()
    own.update(state)
    new_w, new_b = own[f"{last}.weight"].clone(), own[f"{last}.bias"].clone()
    new_w[:5] = 0.0
    new_b[:2] = (net.patch - 1) / 2 / net.patch  # absolute branch: the patch centre
    new_b[2:4] = 0.0
    rows = slice(2, 4) if src.residual else slice(0, 2)
    new_w[rows], new_b[rows] = w[:2], b[:2]
    new_w[5:], new_b[5:] = w[2:], b[2:]
    new_b[4] = 2.0 if src.residual else -2.0
    own[f"{last}.weight"], own[f"{last}.bias"] = new_w, new_b
    net.load_state_dict(own)
    return (f"layers of its network {i + 1} ({'residual' if src.residual else 'absolute'}), "
            "the other branch and the gate new")


def percentiles(err: np.ndarray) -> dict:
    if len(err) == 0:
        return {}
    p = np.percentile(err, [50, 75, 95, 99])
    return {"p50": float(p[0]), "p75": float(p[1]), "p95": float(p[2]), "p99": float(p[3]),
            "n": int(len(err))}


def coverage(diff: np.ndarray, std: np.ndarray) -> dict:
    """Fraction of per-coordinate errors within 1σ and 2σ (0.683 / 0.954 for a Gaussian)."""
    z = np.abs(np.asarray(diff)) / np.maximum(np.asarray(std), 1e-12)
    return {"within_1sigma": float(np.mean(z < 1)), "within_2sigma": float(np.mean(z < 2)),
            "n": int(z.size)}


def calibrate(predictor: bnn.BraggNNPredictor, patches, centres, kinds=None,
              flag_quantile: float = 0.97) -> dict:
    """``std_scale`` (predicted σ → error σ, one factor) and the ``uncertain`` threshold,
    measured on held-out patches, plus the error percentiles vs truth overall and per kind
    and the coverage (fraction within 1σ / 2σ) after scaling."""
    predictor.std_scale = 1.0
    pred, spread = predictor.predict(patches, return_std=True)
    diff = pred - np.asarray(centres)
    scale = float(np.sqrt(np.mean(diff**2) / max(np.mean(spread**2), 1e-12)))
    err = np.hypot(*diff.T)
    out = {"std_scale": scale,
           "uncertain_std_px": float(np.quantile(spread.max(axis=1) * scale, flag_quantile)),
           "error_vs_truth_px": {"all": percentiles(err)},
           "calibration": coverage(diff, spread * scale)}
    if kinds is not None:
        for k in np.unique(kinds):
            out["error_vs_truth_px"][str(k)] = percentiles(err[np.asarray(kinds) == k])
    predictor.std_scale = scale
    return out


def plot_history(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_rmse_px"] for h in history], "o-", label="train RMSE (members)")
    if history and "val_p75_px" in history[0]:
        ax.plot(epochs, [h["val_p75_px"] for h in history], "s-", label="validation p75 error")
        ax.plot(epochs, [h["val_p95_px"] for h in history], "^-", label="validation p95 error")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("px")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path).with_suffix(".png")
    fig.savefig(path)
    plt.close(fig)
    return path


def _card(kind: str, members: int, seed: int, extra: dict) -> dict:
    return {
        "model": bnn.NAME,
        "name": bnn.NAME,
        "architecture": bnn.architecture(),
        "members": members,
        "parameters_per_member": bnn.n_parameters(bnn.BraggNN()),
        "flops_per_patch_per_member": bnn.flops_per_patch(),
        "reference": PAPER,
        "trained": kind,
        "seed": seed,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        **extra,
    }


def train_from_simulation(out: str | Path, *, epochs: int = 40, patches_per_epoch: int = 50_000,
                          members: int = 1, seed: int = 0, n_val: int = 20_000,
                          minutes: float | None = None, trunk_fraction: float = 0.75,
                          resume: str | Path | None = None, progress: bool = True,
                          version: str = "2.0", arch: dict | None = None, lr: float = 1e-3,
                          faint_share: float = 0.0, faint_sigmas: float = 40.0,
                          teacher: str | Path | None = None, distil: float = 0.5,
                          command: str | None = None, log=print) -> dict:
    """Train BraggNN on simulated patches and save it (+ card, + loss-curve PNG).

    The default is one lean network with a variance head (``bnn.LEAN``). With
    ``members > 1`` an ensemble is grown from a trunk (a 2-core CPU cannot train 5 networks
    from scratch in minutes): one network is trained for ``trunk_fraction`` of the epochs
    (or of ``minutes``), then forked into ``members`` copies that each continue on their
    own fresh patches and shuffles at a tenth of the learning rate; ``trunk_fraction=0``
    trains independent members. ``resume``: a weights file whose members' average starts
    the training (continuing an earlier run; same architecture); a blend network
    (``bnn.LEAN_BLEND``) starts from the layers of a residual (else an absolute) network of
    the file, e.g. of the v3.0 pair. ``faint_share``: that share of each epoch's patches
    are extra compact spots at most ``faint_sigmas`` σ of the background high (the faint
    spots that make the tail of the error). ``teacher``: a weights file (e.g. the v3.0 pair)
    whose predictions are distilled: the target of each patch is ``distil`` × the
    teacher's centre + (1 - ``distil``) × the true one. ``command``: the command line that
    ran this, recorded in the card (``training.command``) so that it can be run again."""
    torch.manual_seed(seed)
    arch_card = bnn.architecture(**(bnn.LEAN if arch is None else arch))
    kwargs = bnn.arch_kwargs(arch_card)
    val = simulate_patches(n_val, seed=[seed, 10_000_000])
    val_small = (val["patches"][:4000], val["centre"][:4000])

    n_faint = int(round(faint_share * patches_per_epoch))
    teacher_model = bnn.load(_weights(teacher)) if teacher else None

    def data(offset):
        def make(epoch):
            d = simulate_patches(patches_per_epoch - n_faint, seed=[seed, offset + epoch])
            patches, centres = d["patches"], d["centre"]
            if n_faint:
                f = simulate_patches(n_faint, seed=[seed, offset + epoch, 1],
                                     kinds=["isolated"], max_height_sigmas=faint_sigmas)
                patches = np.concatenate([patches, f["patches"]])
                centres = np.concatenate([centres, f["centre"]])
            if teacher_model is not None:
                centres = distil * teacher_model.predict(patches) + (1 - distil) * centres
            return patches, centres
        return make

    t0 = time.perf_counter()
    history = []
    trunk_epochs = int(round(trunk_fraction * epochs)) if members > 1 else epochs
    resumed = None
    trunk = bnn.BraggNNEnsemble(1, seed=seed, **kwargs)
    resume = _weights(resume) if resume else None
    previous = bnn.load(resume) if resume else None
    if resume and trunk.members[0].blend and not previous.ensemble.members[0].blend:
        said = _start_blend(trunk.members[0], previous)
        resumed = {**weights_io.provenance(previous.card), "layers_from": said,
                   "training_seconds": previous.card.get("training", {}).get("seconds")}
        log(f"starting from {resume}: {said}")
    elif resume:
        if len({(m.residual, m.blend) for m in previous.ensemble.members}) > 1:
            raise ValueError(f"{resume} combines networks of different architectures; resume "
                             "from one of the files it was combined from")
        states = [m.state_dict() for m in previous.ensemble.members]
        start = trunk.members[0].state_dict()  # (a residual trunk's own buffer)
        start.update({k: sum(st[k] for st in states) / len(states) for k in states[0]})
        trunk.members[0].load_state_dict(start)
        if trunk.members[0].residual and not previous.ensemble.members[0].residual:
            # its layers start as they were; its centre output now corrects the centroid
            with torch.no_grad():
                last = trunk.members[0].dense[-1]
                last.weight[:2] = 0.0
                last.bias[:2] = 0.0
        resumed = {**weights_io.provenance(previous.card),
                   "training_seconds": previous.card.get("training", {}).get("seconds")}
        log(f"resuming from {resume}: the average of its {len(states)} member(s)")
    share = trunk_epochs / epochs
    history = train_ensemble(trunk, data(0 if not resume else 5000), trunk_epochs, seed=seed,
                             lr=lr, minutes=minutes * share if minutes else None,
                             val=val_small, progress=progress,
                             decay_from=0.6 if members > 1 else 0.5, log=log)
    for h in history:
        h["phase"] = "trunk" if members > 1 else "network"
    ensemble = trunk
    if members > 1:
        ensemble = bnn.BraggNNEnsemble(members, seed=seed, **kwargs)
        for m in ensemble.members:
            m.load_state_dict(trunk.members[0].state_dict())
        done = len(history)
        spent = (time.perf_counter() - t0) / 60
        tail = train_ensemble(ensemble, data(1000 + done + (5000 if resume else 0)),
                              epochs - trunk_epochs, seed=seed + 1, lr=lr / 10,
                              minutes=max(minutes - spent, 0.5) if minutes else None,
                              val=val_small, progress=progress, decay_from=1.0, log=log)
        for h in tail:
            h["epoch"] += done
            h["phase"] = "members"
            h["seconds"] += spent * 60
        history += tail
    seconds = time.perf_counter() - t0
    predictor = bnn.BraggNNPredictor(ensemble)
    cal = calibrate(predictor, val["patches"], val["centre"], val["kind"])
    card = _card("simulation", members, seed, {
        "version": version,
        "architecture": arch_card,
        "parameters_per_member": bnn.n_parameters(ensemble.members[0]),
        "flops_per_patch_per_member": bnn.flops_per_patch(ensemble.members[0]),
        "training": {"data": "simulated patches, fresh each epoch", "recipe": RECIPE,
                     "labels": "true centres (intensity centroid of the whole spot)",
                     "epochs_run": len(history),
                     "ensemble": ("one trunk network, forked into the members for the last "
                                  "epochs (own patches and shuffles each)") if members > 1
                     else "one network; per-peak σ from its variance head",
                     "patches_per_epoch": patches_per_epoch, "batch": 512, "optimizer": "Adam",
                     "lr": lr, "lr_schedule": "constant, then a linear decay to 0.1x",
                     "loss": "MSE on centre / patch size + 1e-3 × Gaussian NLL of the "
                     "variance head (centre detached)", "minutes_limit": minutes,
                     "resumed_from": resumed, "command": command,
                     "distilled_from": {**weights_io.provenance(teacher_model.card),
                                        "target": f"{distil:g} × the teacher's centre + "
                                        f"{1 - distil:g} × the true one"}
                     if teacher_model is not None else None,
                     "faint_compact": {"share": faint_share, "max_height_sigmas": faint_sigmas,
                                       "kind": "isolated"} if n_faint else None,
                     "seconds": round(seconds, 1), "device": "cpu",
                     "threads": torch.get_num_threads()},
        "validation": {"patches": n_val, "seed": [seed, 10_000_000], "kinds": list(KINDS)},
        "metrics": cal["error_vs_truth_px"],
        "calibration": cal["calibration"],
        "std_scale": cal["std_scale"],
        "uncertain_std_px": cal["uncertain_std_px"],
        "history": history,
    })
    card = weights_io.save(out, bnn.tensors(ensemble), card)
    plot_history(history, Path(out).with_suffix(".png"),
                 f"BraggNN ({members} network{'s' if members > 1 else ''}), simulated patches")
    return card


def combine(paths, out: str | Path, *, seed: int = 0, n_val: int = 20_000,
            version: str = "3.0", log=print) -> dict:
    """One model of the networks of several weights files (e.g. the lean network and the
    lean residual one), combined per peak by their learned variances (inverse-variance
    weighted mean: ``BraggNNPredictor.predict``), calibrated on ``n_val`` held-out
    simulated patches, saved with a card that records each part's provenance, training
    and per-kind metrics beside the combination's."""
    parts = [bnn.load(p) for p in paths]
    if len(parts) < 2:
        raise ValueError("combine needs at least two weights files")
    nets, archs = [], []
    for part in parts:
        if part.ensemble.outputs != 4:
            raise ValueError(f"{part.name} has no variance head; only networks with one "
                             "(--arch lean, lean-residual) can be combined by their variances")
        for i, net in enumerate(part.ensemble.members):
            nets.append(bnn.copy_ensemble(net).to(memory_format=torch.contiguous_format))
            archs.append(bnn.architecture(**{k: v for k, v in bnn.arch_of(
                bnn.tensors(part.ensemble), part.card, i).items()
                if k in ("channels", "fc", "inter", "outputs", "residual", "patch", "slope")}))
    ensemble = bnn.BraggNNEnsemble(nets=nets)
    predictor = bnn.BraggNNPredictor(ensemble)
    val = simulate_patches(n_val, seed=[seed, 10_000_000])
    cal = calibrate(predictor, val["patches"], val["centre"], val["kind"])
    part_metrics = {}
    for part in parts:
        part.std_scale = 1.0
        err = np.hypot(*(part.predict(val["patches"]) - val["centre"]).T)
        part_metrics[part.card.get("version", part.name)] = {
            k: percentiles(err[val["kind"] == k]) for k in np.unique(val["kind"])}
    card = _card("simulation", len(nets), seed, {
        "version": version,
        "architecture": {"class": "BraggNN ensemble", "members": archs,
                         "combination": "inverse-variance weighted mean of the members' "
                         "centres (their variance heads)"},
        "parameters_per_member": [bnn.n_parameters(n) for n in nets],
        "flops_per_patch_per_member": [bnn.flops_per_patch(n) for n in nets],
        "flops_per_patch": sum(bnn.flops_per_patch(n) for n in nets),
        "combined_from": [{**weights_io.provenance(p.card), "file": str(path),
                           "architecture": p.card.get("architecture"),
                           "training": p.card.get("training"), "history": p.card.get("history")}
                          for p, path in zip(parts, paths)],
        "training": {"data": "simulated patches (each part's own training; see combined_from)",
                     "recipe": RECIPE, "labels": "true centres (intensity centroid of the "
                     "whole spot)", "ensemble": "networks of different architectures, "
                     "combined by their learned variances"},
        "validation": {"patches": n_val, "seed": [seed, 10_000_000], "kinds": list(KINDS)},
        "metrics": cal["error_vs_truth_px"],
        "metrics_of_parts": part_metrics,
        "calibration": cal["calibration"],
        "std_scale": cal["std_scale"],
        "uncertain_std_px": cal["uncertain_std_px"],
    })
    card = weights_io.save(out, bnn.tensors(ensemble), card)
    histories = [p.card.get("history") or [] for p in parts]
    _plot_parts(histories, [p.card.get("architecture", {}).get("output", "") for p in parts],
                Path(out).with_suffix(".png"))
    log(f"combined {len(nets)} networks; validation vs truth p75 "
        f"{cal['error_vs_truth_px']['all']['p75']:.3f} px")
    return card


def _plot_parts(histories, outputs, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for i, (history, output) in enumerate(zip(histories, outputs)):
        what = "residual" if "learned correction" in output else "absolute"
        x = np.arange(1, len(history) + 1)
        if history and "val_p75_px" in history[0]:
            ax.plot(x, [h["val_p75_px"] for h in history], "-", label=f"network {i + 1} "
                    f"({what}) validation p75")
            ax.plot(x, [h["val_p95_px"] for h in history], ":", label=f"network {i + 1} p95")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (each network's last session)")
    ax.set_ylabel("px")
    ax.set_title("BraggNN networks combined by their variances", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def label_spots(frame, k: float = 6.0, min_pixels: int = 8, isolation_px: int = 10,
                max_std: float = 0.1, max_chi2: float = 30.0, margin: int = 3):
    """Whole-spot fit labels of the isolated spots of one frame.

    Spots are connected components (8-connectivity) of the pixels above the frame's
    threshold, with at least ``min_pixels`` pixels, no other component within
    ``isolation_px`` of their box and at least ``margin`` px from the frame's border. Each is
    fitted in its box + ``margin`` by ``analysis.fitting.fit_spot`` (a rotated pseudo-Voigt,
    zeros of a frame cache and saturated pixels treated as censored); fits that failed, moved
    outside the box, have a standard error above ``max_std`` px or a reduced χ² above
    ``max_chi2`` are dropped. Returns a DataFrame: ``row``, ``col`` (the fitted centre, the
    intensity centroid of the whole spot), ``row_std``, ``col_std``, ``chi2``, ``pixels``,
    ``extent``."""
    import pandas as pd

    from ..analysis.fitting import fit_spot
    from ..analysis.peaks import _components, check_frame, threshold

    frame = check_frame(frame)
    comps = _components(frame > threshold(frame, k), min_pixels=3)
    nr, nc = frame.shape
    boxes = np.array([(rr.min(), cc.min(), rr.max(), cc.max()) for rr, cc in comps]).reshape(-1, 4)
    out = []
    for i, (rr, _) in enumerate(comps):
        if len(rr) < min_pixels:
            continue
        r0, c0, r1, c1 = boxes[i]
        if r0 < margin or c0 < margin or r1 >= nr - margin or c1 >= nc - margin:
            continue
        gap_r = np.maximum(boxes[:, 0] - r1, r0 - boxes[:, 2])
        gap_c = np.maximum(boxes[:, 1] - c1, c0 - boxes[:, 3])
        near = np.maximum(gap_r, gap_c) <= isolation_px
        near[i] = False
        if near.any():
            continue
        window = frame[r0 - margin:r1 + margin + 1, c0 - margin:c1 + margin + 1]
        f = fit_spot(window, origin=(r0 - margin, c0 - margin))
        if not (f.success and r0 - 0.5 <= f.row <= r1 + 0.5 and c0 - 0.5 <= f.col <= c1 + 0.5
                and max(f.row_std, f.col_std) < max_std and f.chi2 < max_chi2):
            continue
        out.append((f.row, f.col, f.row_std, f.col_std, f.chi2, len(rr),
                    int(max(r1 - r0, c1 - c0) + 1)))
    return pd.DataFrame(out, columns=["row", "col", "row_std", "col_std", "chi2", "pixels",
                                      "extent"])


def label_frames(frames, k: float = 6.0, match_px: float = 1.5):
    """Patches of the pipeline (``analysis.peaks.prepare``, whole-spot windows) for the
    isolated spots of ``frames``, labelled by whole-spot fits (``label_spots``).

    Returns ``(patches (N, 11, 11), centres (N, 2) in patch pixels, info)``; ``info`` has
    ``peaks`` (candidates found), ``labelled``, ``frame`` (N,) index of each patch's frame,
    and ``origin``/``scale`` of each patch."""
    from ..analysis.peaks import prepare

    kept_p, kept_c, kept_f, kept_o, kept_s = [], [], [], [], []
    found = 0
    for index, frame in enumerate(frames):
        labels = label_spots(frame, k=k)
        fp = prepare(frame, index, k=k)
        found += len(fp.rows)
        if not len(labels) or not len(fp.rows):
            continue
        # the candidate nearest each label (by its window centre), alone in its window
        centre = fp.origin + fp.scale[:, None] * (PATCH - 1) / 2 + (fp.scale[:, None] - 1) / 2
        d = np.hypot(labels["row"].to_numpy()[:, None] - fp.rows[None],
                     labels["col"].to_numpy()[:, None] - fp.cols[None])
        j = d.argmin(axis=1)
        ok = (d[np.arange(len(j)), j] < 3 * match_px) & (fp.n_near[j] == 0) & ~fp.edge[j]
        ok &= np.hypot(labels["row"].to_numpy() - centre[j, 0],
                       labels["col"].to_numpy() - centre[j, 1]) < 2.0 * fp.scale[j]
        j = j[ok]
        lab = labels[ok][["row", "col"]].to_numpy()
        s = fp.scale[j, None]
        kept_p.append(fp.patches[j])
        kept_c.append((lab - fp.origin[j] - (s - 1) / 2) / s)
        kept_f.append(np.full(len(j), index))
        kept_o.append(fp.origin[j])
        kept_s.append(fp.scale[j])
    if not kept_p:
        return (np.zeros((0, PATCH, PATCH)), np.zeros((0, 2)),
                {"peaks": found, "labelled": 0, "frame": np.zeros(0, int)})
    patches, centres = np.concatenate(kept_p), np.concatenate(kept_c)
    return patches, centres, {"peaks": found, "labelled": len(patches),
                              "frame": np.concatenate(kept_f), "origin": np.concatenate(kept_o),
                              "scale": np.concatenate(kept_s)}


def frames_from_cache(path: str | Path, max_frames: int | None = None, step: int = 1,
                      start: int = 0, stop: int | None = None, summed: int = 1):
    """Frames of a sparse "frame cache" (``.npz`` with ``shape``, ``nframes`` and, per
    frame i, ``i_row``, ``i_col``, ``i_data``; as written by HEXRD), as dense uint16 arrays,
    lazily: a list-like that builds each frame when it is read. Every ``step``-th frame of
    frames ``start`` to ``stop`` (exclusive; default: the last), at most ``max_frames``.
    ``summed > 1``: images of ``summed`` consecutive frames added up (uint32; an ω range,
    what grain fitting takes the centroid of), the next one ``step × summed`` frames on."""

    class Frames:
        def __init__(self):
            self.z = np.load(path)
            if "shape" not in self.z.files or "nframes" not in self.z.files:
                raise ValueError(f"{path} is not a frame cache (no 'shape'/'nframes' arrays)")
            n = int(self.z["nframes"])
            end = n if stop is None else min(stop, n)
            self.index = list(range(start, end - summed + 1, step * summed))[:max_frames]

        def __len__(self):
            return len(self.index)

        def __getitem__(self, k):
            i = self.index[k]
            f = np.zeros(tuple(self.z["shape"]), np.uint16 if summed == 1 else np.uint32)
            for j in range(i, i + summed):
                np.add.at(f, (self.z[f"{j}_row"], self.z[f"{j}_col"]), self.z[f"{j}_data"])
            return f

        def __iter__(self):
            return (self[k] for k in range(len(self)))

    return Frames()


class ChainedFrames:
    """Several list-likes of frames (e.g. the frame caches of two detector panels) read as
    one, in order."""

    def __init__(self, parts):
        self.parts = list(parts)

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def __getitem__(self, k):
        for p in self.parts:
            if k < len(p):
                return p[k]
            k -= len(p)
        raise IndexError(k)

    def __iter__(self):
        for p in self.parts:
            yield from p


def finetune_from_frames(frames, out: str | Path, *, base: str | Path | None = None,
                         epochs: int = 60, lr: float = 2e-4, seed: int = 0,
                         val_fraction: float = 0.25, source: dict | None = None,
                         progress: bool = True, log=print) -> dict:
    """Fine-tune BraggNN (``base``: weights file; default the shipped one) on the isolated
    spots of your ``frames`` labelled by whole-spot fits (``label_frames``), and save it
    with its card.

    The last ``val_fraction`` of the frames (in order: a contiguous ω range, so no spot is
    seen in training and held out) is held out; the card records the error vs the labels
    there before and after fine-tuning, for the network and for the 11×11 centroid.

    The defaults (60 epochs, learning rate 2e-4, batch ≤ 256, 8 flips) were chosen on the
    ruby frame caches of ``../shared/data`` with frames 540–719 of each panel held out of
    frames 0–719: ~670 training spots, p75 vs the labels 0.040 px (centroid 0.059); 30
    epochs at 3e-4 gave 0.051, 60 at 1e-4 0.042, 80 at 1e-3 0.07 (too high a rate undoes
    the pretraining)."""
    patches, centres, stats = label_frames(frames)
    if len(patches) < 10:
        raise ValueError(f"only {len(patches)} isolated spots could be labelled by a whole-spot "
                         f"fit ({stats['peaks']} peaks found); fine-tuning needs at least 10. "
                         "Use more frames, or frames with more spots.")
    log(f"labelled {stats['labelled']} of {stats['peaks']} peaks by whole-spot fits")
    base_model = bnn.load(base, device="cpu")
    ensemble = bnn.copy_ensemble(base_model.ensemble).to(memory_format=torch.contiguous_format)
    n_frames = len(frames)
    # the last frames of each part (panel, ω sum) of ChainedFrames: the same ω range of
    # every part is held out, so no spot is trained on in one part and held out in another
    sizes = [len(p) for p in getattr(frames, "parts", [frames])]
    held = np.zeros(n_frames, bool)
    for first, size in zip(np.cumsum([0, *sizes[:-1]]), sizes):
        held[first + int(np.floor((1 - val_fraction) * size)):first + size] = True
    cut = int(np.floor((1 - val_fraction) * sizes[0]))
    held_said = (f"spots of frames {cut}..{n_frames - 1}" if len(sizes) == 1 else
                 f"spots of the last {val_fraction:.0%} of the frames of each of the "
                 f"{len(sizes)} frame sets")
    va, tr = np.flatnonzero(held[stats["frame"]]), np.flatnonzero(~held[stats["frame"]])
    if len(va) < 3 or len(tr) < 5:  # too few spots in the last frames: split the spots
        order = np.argsort(stats["frame"], kind="stable")
        n_val = max(3, int(round(val_fraction * len(order))))
        va, tr = order[-n_val:], order[:-n_val]

    def err(pred):
        return np.hypot(*(pred - centres[va]).T)

    from ..analysis.peaks import centroid

    before = percentiles(err(base_model.predict(patches[va])))
    cen = percentiles(err(centroid(patches[va])[0]))
    t0 = time.perf_counter()
    history = train_ensemble(ensemble, (patches[tr], centres[tr]), epochs,
                             batch=min(256, len(tr)), lr=lr, seed=seed, augment=True,
                             val=(patches[va], centres[va]), progress=progress,
                             decay_from=0.5, log=log)
    tuned = bnn.BraggNNPredictor(ensemble, base_model.card)
    pred, std = tuned.predict(patches[va], return_std=True)
    after = percentiles(err(pred))
    log(f"held-out spots ({len(va)}, {held_said}): p75 error vs whole-spot fits "
        f"{before['p75']:.3f} -> {after['p75']:.3f} px (11×11 centroid {cen['p75']:.3f})")
    card = _card("fine-tuned on whole-spot-fit labels of real frames", len(ensemble.members),
                 seed, {
        "version": f"{base_model.card.get('version', '?')}+ft",
        "architecture": base_model.card.get("architecture", bnn.architecture()),
        "base": weights_io.provenance(base_model.card),
        "training": {"data": source or {"frames": n_frames},
                     "labels": "whole-spot fits (analysis.fitting.fit_spot: rotated "
                     "pseudo-Voigt, cache zeros and saturated pixels censored) of isolated "
                     "spots",
                     "labelled": {k: int(stats[k]) for k in ("peaks", "labelled")},
                     "train_patches": int(len(tr)), "held_out_patches": int(len(va)),
                     "held_out": held_said,
                     "augment": "8 flips", "epochs_run": len(history), "optimizer": "Adam",
                     "lr": lr, "loss": "MSE on centre / patch size (+ variance head NLL)",
                     "seconds": round(time.perf_counter() - t0, 1)},
        "metrics": {"held_out_error_vs_labels_px": {"before": before, "after": after,
                                                    "centroid": cen},
                    "calibration": coverage(pred - centres[va], std)},
        "std_scale": base_model.std_scale,
        "uncertain_std_px": base_model.uncertain_px,
        "history": history,
    })
    card = weights_io.save(out, bnn.tensors(ensemble), card)
    plot_history(history, Path(out).with_suffix(".png"), "BraggNN fine-tuned on your frames")
    return card

"""Training BraggNN ensembles: from simulation (true centres) or fine-tuned on a user's frames.

- ``train_from_simulation``: fresh simulated patches every epoch (``patches.simulate_patches``),
  the network trained against the TRUE centres so it can beat a fit; Adam (lr 3e-4,
  batch 512), MSE on centre / patch size; every member of the deep ensemble starts from
  its own seed and sees its own shuffles.
- ``finetune_from_frames``: the authors' workflow on your own data: peaks found in your
  frames, isolated ones labelled by 2D pseudo-Voigt fits (``analysis.fitting``), the
  ensemble fine-tuned on them (with the 8 flips/transposes of each patch).

Both write ``.safetensors`` + a JSON model card (``models.weights.save``) and a loss-curve
PNG beside it.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..analysis.fitting import fit_patches
from ..models import braggnn as bnn
from ..models import weights as weights_io
from .patches import KINDS, RECIPE, simulate_patches

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


def train_ensemble(ensemble: bnn.BraggNNEnsemble, data, epochs: int, *, batch: int = 512,
                   lr: float = 3e-4, seed: int = 0, val=None, minutes: float | None = None,
                   progress: bool = True, decay_from: float = 0.7, augment: bool = False,
                   log=print) -> list[dict]:
    """Train every member on ``data``: a function ``epoch -> (patches, centres)`` (fresh
    patches each epoch) or a fixed ``(patches, centres)``. ``val`` = ``(patches, centres)``
    is evaluated after each epoch. ``minutes`` caps the time (the learning-rate decay then
    follows the clock). Returns the history: one dict per epoch."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

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
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total} epochs"), TimeElapsedColumn(),
            disable=not progress) as bar:
        task = bar.add_task("training BraggNN", total=epochs)
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
                for m, perm in zip(members, perms):
                    idx = perm[s * batch:(s + 1) * batch]
                    loss = loss + torch.nn.functional.mse_loss(m(x[idx]), y[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item() / len(members))
                step += 1
                if budget and time.perf_counter() - t0 > budget:
                    break
            record = {"epoch": epoch + 1, "train_rmse_px": float(np.sqrt(np.mean(losses)) * PATCH),
                      "seconds": time.perf_counter() - t0, "patches": n,
                      "lr": opt.param_groups[0]["lr"]}
            if val is not None:
                with torch.inference_mode():
                    ensemble.eval()
                    pred = ensemble(val_x).mean(0).double().numpy() * PATCH
                    ensemble.train()
                err = np.hypot(*(pred - np.asarray(val[1])).T)
                record.update(val_p50_px=float(np.percentile(err, 50)),
                              val_p75_px=float(np.percentile(err, 75)),
                              val_p95_px=float(np.percentile(err, 95)))
            history.append(record)
            desc = f"epoch {epoch + 1}: train rmse {record['train_rmse_px']:.3f} px"
            if "val_p75_px" in record:
                desc += f", val p75 {record['val_p75_px']:.3f} px"
            bar.update(task, advance=1, description=desc)
            if budget and time.perf_counter() - t0 > budget:
                log(f"time budget of {minutes} min reached after {epoch + 1} epochs")
                break
    ensemble.eval()
    return history


def percentiles(err: np.ndarray) -> dict:
    if len(err) == 0:
        return {}
    p = np.percentile(err, [50, 75, 95, 99])
    return {"p50": float(p[0]), "p75": float(p[1]), "p95": float(p[2]), "p99": float(p[3]),
            "n": int(len(err))}


def calibrate(predictor: bnn.BraggNNPredictor, patches, centres, kinds=None,
              flag_quantile: float = 0.97) -> dict:
    """``std_scale`` (ensemble spread → error σ) and the ``uncertain`` threshold, measured on
    held-out patches, plus the error percentiles vs truth overall and per kind."""
    predictor.std_scale = 1.0
    pred, spread = predictor.predict(patches, return_std=True)
    diff = pred - np.asarray(centres)
    scale = float(np.sqrt(np.mean(diff**2) / max(np.mean(spread**2), 1e-12)))
    err = np.hypot(*diff.T)
    out = {"std_scale": scale,
           "uncertain_std_px": float(np.quantile(spread.max(axis=1) * scale, flag_quantile)),
           "error_vs_truth_px": {"all": percentiles(err)}}
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
                          members: int = 5, seed: int = 0, n_val: int = 20_000,
                          minutes: float | None = None, trunk_fraction: float = 0.75,
                          resume: str | Path | None = None, progress: bool = True,
                          version: str = "1.0", log=print) -> dict:
    """Train an ensemble on simulated patches and save it (+ card, + loss-curve PNG).

    A 2-core CPU cannot train 5 networks from scratch in minutes, so the ensemble is
    grown from a trunk: one network is trained for ``trunk_fraction`` of the epochs (or of
    ``minutes``) at constant lr, then forked into ``members`` copies that each continue on
    their own fresh patches and shuffles at a tenth of the learning rate. The trunk's
    learning rate decays over its last 40 %. ``trunk_fraction=0`` trains independent
    members from scratch (a classic deep ensemble). ``resume``: a weights file whose
    members' average starts the trunk (continuing an earlier run)."""
    torch.manual_seed(seed)
    val = simulate_patches(n_val, seed=[seed, 10_000_000])
    val_small = (val["patches"][:4000], val["centre"][:4000])

    def data(offset):
        def make(epoch):
            d = simulate_patches(patches_per_epoch, seed=[seed, offset + epoch])
            return d["patches"], d["centre"]
        return make

    t0 = time.perf_counter()
    history = []
    trunk_epochs = int(round(trunk_fraction * epochs))
    resumed = None
    if trunk_epochs:
        trunk = bnn.BraggNNEnsemble(1, seed=seed)
        if resume:
            previous = bnn.load(resume)
            states = [m.state_dict() for m in previous.ensemble.members]
            trunk.members[0].load_state_dict(
                {k: sum(st[k] for st in states) / len(states) for k in states[0]})
            resumed = {**weights_io.provenance(previous.card),
                       "training_seconds": previous.card.get("training", {}).get("seconds"),
                       "training": previous.card.get("training", {}).get("ensemble")}
            log(f"resuming from {resume}: the average of its {len(states)} members")
        history = train_ensemble(trunk, data(0 if not resume else 5000), trunk_epochs, seed=seed,
                                 minutes=minutes * trunk_fraction if minutes else None,
                                 val=val_small, progress=progress, decay_from=0.6, log=log)
        for h in history:
            h["phase"] = "trunk"
        ensemble = bnn.BraggNNEnsemble(members, seed=seed)
        for m in ensemble.members:
            m.load_state_dict(trunk.members[0].state_dict())
    else:
        ensemble = bnn.BraggNNEnsemble(members, seed=seed)
    done = len(history)
    spent = (time.perf_counter() - t0) / 60
    tail = train_ensemble(ensemble, data(1000 + done + (5000 if resume else 0)),
                          epochs - trunk_epochs, seed=seed + 1,
                          lr=3e-5 if trunk_epochs else 3e-4,
                          minutes=max(minutes - spent, 0.5) if minutes else None,
                          val=val_small, progress=progress, decay_from=1.0 if trunk_epochs
                          else 0.7, log=log)
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
        "training": {"data": "simulated patches, fresh each epoch", "recipe": RECIPE,
                     "labels": "true centres", "epochs_run": len(history),
                     "trunk_epochs": sum(h["phase"] == "trunk" for h in history),
                     "ensemble": "one trunk network, forked into the members for the last "
                     "epochs (own patches and shuffles each)" if trunk_epochs else
                     "independent members from their own seeds",
                     "patches_per_epoch": patches_per_epoch, "batch": 512, "optimizer": "Adam",
                     "lr": 3e-4, "lr_schedule": "trunk: constant, linear decay to 0.1x over "
                     "its last 40 %; members: 3e-5" if trunk_epochs else
                     "constant, linear decay to 0.1x over the last 30 % of steps",
                     "loss": "MSE on centre / patch size", "minutes_limit": minutes,
                     "resumed_from": resumed,
                     "seconds": round(seconds, 1), "device": "cpu",
                     "threads": torch.get_num_threads()},
        "validation": {"patches": n_val, "seed": [seed, 10_000_000], "kinds": list(KINDS)},
        "metrics": cal["error_vs_truth_px"],
        "std_scale": cal["std_scale"],
        "uncertain_std_px": cal["uncertain_std_px"],
        "history": history,
    })
    card = weights_io.save(out, bnn.tensors(ensemble), card)
    plot_history(history, Path(out).with_suffix(".png"),
                 f"BraggNN: trunk, then {members} members, simulated patches")
    return card


def label_frames(frames, k: float = 6.0, max_std: float = 0.25):
    """Patches of isolated, non-edge peaks in ``frames`` with pseudo-Voigt fit centres.

    Returns ``(patches (N, 11, 11), centres (N, 2), stats)``; fits that failed, have a
    standard error above ``max_std`` px or moved more than 1.5 px are left out."""
    from ..analysis.peaks import check_frame, extract_patches, find_peaks

    kept_p, kept_c = [], []
    found = 0
    for frame in frames:
        frame = check_frame(frame)
        cand = find_peaks(frame, k=k)
        found += len(cand)
        patches, edge = extract_patches(frame, cand["row"], cand["col"])
        clean = (cand["n_near"].to_numpy() == 0) & ~edge
        if not clean.any():
            continue
        centre, std, ok = fit_patches(patches[clean])
        mid = (PATCH - 1) / 2
        good = ok & (std.max(axis=1) < max_std) & (np.abs(centre - mid).max(axis=1) < 1.5)
        kept_p.append(patches[clean][good])
        kept_c.append(centre[good])
    if not kept_p:
        return np.zeros((0, PATCH, PATCH)), np.zeros((0, 2)), {"peaks": found, "labelled": 0}
    patches, centres = np.concatenate(kept_p), np.concatenate(kept_c)
    return patches, centres, {"peaks": found, "labelled": len(patches)}


def finetune_from_frames(frames, out: str | Path, *, base: str | Path | None = None,
                         epochs: int = 30, lr: float = 1e-4, seed: int = 0,
                         val_fraction: float = 0.2, source: dict | None = None,
                         progress: bool = True, log=print) -> dict:
    """Fine-tune an ensemble (``base``: weights file; default the shipped ones) on the peaks
    of ``frames`` labelled by pseudo-Voigt fits, and save it with its card."""
    patches, centres, stats = label_frames(frames)
    if len(patches) < 10:
        raise ValueError(f"only {len(patches)} isolated peaks could be labelled by a fit "
                         f"({stats['peaks']} found); fine-tuning needs at least 10. Use more "
                         "frames, or frames with more spots.")
    log(f"labelled {stats['labelled']} of {stats['peaks']} peaks by pseudo-Voigt fits")
    base_model = bnn.load(base, device="cpu")
    ensemble = bnn.copy_ensemble(base_model.ensemble).to(memory_format=torch.contiguous_format)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patches))
    n_val = max(2, int(round(val_fraction * len(patches))))
    va, tr = order[:n_val], order[n_val:]

    def err_vs_fit(model):
        return np.hypot(*(model.predict(patches[va]) - centres[va]).T)

    before = percentiles(err_vs_fit(base_model))
    t0 = time.perf_counter()
    history = train_ensemble(ensemble, (patches[tr], centres[tr]), epochs,
                             batch=min(512, len(tr)), lr=lr, seed=seed, augment=True,
                             val=(patches[va], centres[va]), progress=progress,
                             decay_from=0.5, log=log)
    tuned = bnn.BraggNNPredictor(ensemble, base_model.card)
    after = percentiles(err_vs_fit(tuned))
    log(f"held-out error vs fit labels: p75 {before['p75']:.3f} -> {after['p75']:.3f} px")
    card = _card("fine-tuned on fit-labelled frames", len(ensemble.members), seed, {
        "version": f"{base_model.card.get('version', '?')}+ft",
        "base": weights_io.provenance(base_model.card),
        "training": {"data": source or {"frames": len(frames)}, "labels":
                     "2D pseudo-Voigt fits (scipy least_squares) of isolated, non-edge peaks",
                     "labelled": stats, "train_patches": int(len(tr)), "augment": "8 flips",
                     "epochs_run": len(history), "optimizer": "Adam", "lr": lr,
                     "loss": "MSE on centre / patch size",
                     "seconds": round(time.perf_counter() - t0, 1)},
        "metrics": {"held_out_error_vs_fit_px": {"before": before, "after": after}},
        "std_scale": base_model.std_scale,
        "uncertain_std_px": base_model.uncertain_px,
        "history": history,
    })
    card = weights_io.save(out, bnn.tensors(ensemble), card)
    plot_history(history, Path(out).with_suffix(".png"), "BraggNN fine-tuned on fit labels")
    return card

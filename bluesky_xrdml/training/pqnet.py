"""Training PQ-Net ensembles on simulated patterns (``xrdml train pqnet``).

Patterns are drawn fresh from ``PowderSimulator.sample`` (the batched Fourier path) in
pools; every member sees every pool in its own order (a deep ensemble: same data, own
initialisation and shuffling). Loss per phase and output: squared error of the mean, plus
the Gaussian negative log-likelihood of the log-variance with the mean held fixed, on
normalised targets. Lattice parameters and sizes count only where the phase is present
with a fraction ≥ ``MIN_FRACTION``; shares count everywhere (0 for an absent phase).
After training, the ensemble's spread is calibrated per output on held-out patterns
simulated with the exact (every peak evaluated) path, and the card records the metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from ..models import pqnet as pq
from ..models import weights as weights_io
from ..simulation.powder import PowderSimulator, Ranges, Sample
from .progress import TrainingProgress

MIN_FRACTION = 0.05  # lattice/size targets count where the phase has at least this fraction
METRIC_FRACTION = 0.1  # lattice/size metrics: phases with fraction >= this
MIN_PRESENT = 0.03  # presence targets: 1 above this fraction, 0 when absent, none between
PRESENT = 0.05  # presence metrics: a phase counts as present above this fraction


def labels(sim: PowderSimulator, sample: Sample, targets: pq.Targets):
    """Normalised targets (N, P, n_out) and masks (N, P, n_out) of a sample."""
    total = sample.counts.sum(axis=1).astype(float) * sim.step
    share = sample.scale / np.clip(total, 1e-9, None)[:, None]
    n, p = share.shape
    lattice = np.zeros((n, p, targets.max_free))
    for j, name in enumerate(sim.names):
        lattice[:, j, :targets.n_free[j]] = sample.lattice[name]
    y = targets.encode(share, lattice, sample.size_nm)
    mask = np.zeros_like(y)
    mask[..., 0] = 1.0
    visible = (sample.present & (sample.fraction >= MIN_FRACTION)).astype(float)
    for j in range(p):
        mask[:, j, 1:1 + targets.n_free[j]] = visible[:, j, None]
    mask[..., -1] = visible
    return y.astype(np.float32), mask.astype(np.float32)


def presence_labels(sample: Sample):
    """Presence targets (N, P) and their mask: 1 for a phase at ≥ ``MIN_PRESENT`` of the
    fraction, 0 for an absent one, no target in between."""
    pres = (sample.present & (sample.fraction >= MIN_PRESENT)).astype(np.float32)
    mask = (~sample.present | (sample.fraction >= MIN_PRESENT)).astype(np.float32)
    return pres, mask


def loss_fn(out, y, mask):
    """out (N, P, n_out, 2) → mean squared error + Gaussian NLL of the variance."""
    mean, logvar = out[..., 0], out[..., 1].clamp(-14, 6)
    err2 = (mean - y) ** 2
    nll = 0.5 * (logvar + err2.detach() * torch.exp(-logvar))
    denom = mask.sum().clamp_min(1.0)
    return (err2 * mask).sum() / denom, (nll * mask).sum() / denom


def presence_loss(logits, target, mask):
    """Binary cross-entropy of presence logits (N, P) on the masked entries."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp_min(1.0)


def _lr_factor(progress: float, warmup: float = 0.03, final: float = 0.02) -> float:
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return final + (1 - final) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))


def _pool(sim, targets, ranges, n, rng):
    """A pool of fresh simulated patterns as tensors: x, logc, y, mask, presence, its mask."""
    sample = sim.sample(n, rng, ranges)
    y_np, m_np = labels(sim, sample, targets)
    p_np, pm_np = presence_labels(sample)
    x, logc = pq.prepare(sample.counts)
    return [x, logc, *(torch.from_numpy(v) for v in (y_np, m_np, p_np, pm_np))]


def train_ensemble(ensemble: pq.PQNetEnsemble, sim: PowderSimulator, targets: pq.Targets,
                   ranges: Ranges, *, steps: int, batch: int = 128, pool: int = 4096,
                   lr: float = 2e-3, minutes: float | None = None, seed: int = 0,
                   reuse: int = 2, log=print, progress: bool = True,
                   extra=None) -> list[dict]:
    """Train every member for ``steps`` optimiser steps (or until ``minutes`` run out).

    Each pool of ``pool`` simulated patterns is used ``reuse`` times (simulation costs more
    than a pass of the network). ``extra(rng, n)``, when given, returns a batch of the same
    tensors to append to every batch (e.g. augmented reference measurements). Progress:
    a rich bar on a terminal, else a log line per pool. Returns the history: one dict per
    pool pass (step, mse, nll, bce, seconds)."""
    rng = np.random.default_rng(seed)
    members = list(ensemble.members)
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4) for m in members]
    for m in members:
        m.train()
    history, step, t0 = [], 0, time.monotonic()
    budget = None if minutes is None else 60.0 * minutes
    data, passes = None, 0
    with TrainingProgress("PQ-Net", total=steps, unit="step", log=log, enabled=progress,
                          budget_s=budget) as bar:
        while step < steps:
            if data is None or passes >= reuse:
                data, passes = _pool(sim, targets, ranges, pool, rng), 0
            passes += 1
            x, logc, y, mask, pres, pmask = data
            n_batches = pool // batch
            orders = [torch.from_numpy(rng.permutation(pool)) for _ in members]
            acc = np.zeros(3)
            done_b = 0
            for b in range(n_batches):
                elapsed = time.monotonic() - t0
                prog = step / steps if budget is None else max(step / steps, elapsed / budget)
                if prog >= 1.0:
                    break
                factor = _lr_factor(prog)
                ext = extra(rng, batch) if extra is not None else None
                for k, (net, opt) in enumerate(zip(members, opts)):
                    idx = orders[k][b * batch:(b + 1) * batch]
                    parts = [t[idx] for t in data]
                    if ext is not None:
                        parts = [torch.cat([p_, e_]) for p_, e_ in zip(parts, ext)]
                    bx, blogc, by, bmask, bpres, bpmask = parts
                    for g in opt.param_groups:
                        g["lr"] = lr * factor
                    out, logits = net(bx, blogc)
                    mse, nll = loss_fn(out, by, bmask)
                    loss = mse + 0.1 * nll
                    bce = torch.zeros(())
                    if logits is not None:
                        bce = presence_loss(logits, bpres, bpmask)
                        loss = loss + 0.2 * bce
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                    opt.step()
                    acc += np.array([float(mse.detach()), float(nll.detach()),
                                     float(bce.detach())]) / len(members)
                step += 1
                done_b += 1
            acc /= max(1, done_b)
            elapsed = time.monotonic() - t0
            if done_b == 0:  # the time ran out before this pass began
                log(f"time budget of {minutes} min reached at step {step}/{steps}")
                break
            history.append({"step": step, "mse": acc[0], "nll": acc[1], "bce": acc[2],
                            "seconds": round(elapsed, 1)})
            info = f"mse {acc[0]:.4f} bce {acc[2]:.3f}"
            bar.update(step, info=info)
            if budget is not None and time.monotonic() - t0 >= budget:
                log(f"time budget of {minutes} min reached at step {step}/{steps}")
                break
    for m in members:
        m.eval()
    return history


def truth_arrays(sim: PowderSimulator, sample: Sample):
    """Truth as (N, P) arrays: scale, fraction, size, and lattice_<axis> (NaN where absent)."""
    out = {"scale": sample.scale, "fraction": sample.fraction, "size_nm": sample.size_nm}
    for j, name in enumerate(sim.names):
        for i, axis in enumerate(sim.free[name]):
            key = f"lattice_{axis}"
            out.setdefault(key, np.full(sample.scale.shape, np.nan))[:, j] = \
                sample.lattice[name][:, i]
    return out


def evaluate(pred: dict, truth: dict, fraction: np.ndarray, present: np.ndarray,
             min_fraction: float = METRIC_FRACTION) -> dict:
    """Metrics of predictions ``pred`` (name -> (mean, std) arrays (N, P)) against ``truth``.

    fraction MAE over every phase of every pattern (absent phases have fraction 0);
    lattice MAE (Å) and size MAPE (%) over phases with fraction ≥ ``min_fraction``;
    ±2σ coverage over the same entries, per parameter and pooled.
    """
    sel = present & (fraction >= min_fraction)
    res = {"n_patterns": int(len(fraction)), "n_phase_entries": int(sel.sum())}
    mu, sd = pred["fraction"]
    res["fraction_mae"] = float(np.mean(np.abs(mu - truth["fraction"])))
    inside = {"fraction": np.abs(mu - truth["fraction"])[sel] <= 2 * sd[sel]}
    lat_err, lat_in = [], []
    for key in truth:
        if key.startswith("lattice_"):
            m, s = pred[key]
            ok = sel & np.isfinite(truth[key])
            lat_err.append(np.abs(m - truth[key])[ok])
            lat_in.append(np.abs(m - truth[key])[ok] <= 2 * s[ok])
    lat_err, lat_in = np.concatenate(lat_err), np.concatenate(lat_in)
    res["lattice_mae_A"] = float(lat_err.mean())
    inside["lattice"] = lat_in
    m, s = pred["size_nm"]
    res["size_mape_pct"] = float(100 * np.mean(np.abs(m - truth["size_nm"])[sel]
                                               / truth["size_nm"][sel]))
    inside["size_nm"] = np.abs(m - truth["size_nm"])[sel] <= 2 * s[sel]
    res["coverage_2sigma"] = {k: float(v.mean()) for k, v in inside.items()}
    res["coverage_2sigma"]["all"] = float(np.concatenate(list(inside.values())).mean())
    return res


def predictions(ds) -> dict:
    """An ``xarray.Dataset`` from ``PQNetPredictor.predict`` → name -> (mean, std)."""
    return {k: (ds[k].values, ds[f"{k}_std"].values) for k in ds.data_vars
            if not k.endswith("_std") and f"{k}_std" in ds and ds[k].ndim == 2}


def calibrate(predictor: pq.PQNetPredictor, sim: PowderSimulator, sample: Sample,
              target: float = 0.95) -> dict:
    """Per-output factors on the ensemble spread so that ``target`` of held-out truths lie
    within ±2σ (fraction/lattice/size over the entries the metrics use; scale over all)."""
    predictor.std_scale = {}
    pred = predictions(predictor.predict(sample.counts))
    truth = truth_arrays(sim, sample)
    sel = sample.present & (sample.fraction >= METRIC_FRACTION)
    scales = {}
    for key, (mu, sd) in pred.items():
        if key not in truth:  # presence: calibrated on its own (calibrate_presence)
            continue
        use = np.ones_like(sel) if key == "scale" else sel
        use = use & np.isfinite(truth[key]) & (sd > 0)
        z = np.abs(mu - truth[key])[use] / (2 * sd[use])
        scales[key] = float(np.quantile(z, target)) if z.size else 1.0
    predictor.std_scale = scales
    return scales


def calibrate_refinement(predictor: pq.PQNetPredictor, sim: PowderSimulator, sample: Sample,
                         target: float = 0.95, **options) -> dict:
    """Per-output factors on the refinement's covariance standard deviations (like
    ``calibrate`` for the ensemble) so that ``target`` of held-out truths lie within ±2σ:
    lattice, size and fraction over the refined phases with fraction ≥ ``METRIC_FRACTION``,
    scale over every refined phase. Sets the predictor's card ``refinement`` entry
    (``std_scale``, ``n_patterns``, ``options``) and returns it."""
    predictor.card["refinement"] = {"std_scale": {}}
    predictor._refiners = {}
    ds = predictor.refine(sample.counts, **options)
    pred = predictions(ds)
    truth = truth_arrays(sim, sample)
    use = ds["refined"].values
    sel = use & sample.present & (sample.fraction >= METRIC_FRACTION)
    scales = {}
    for key, (mu, sd) in pred.items():
        if key not in truth:
            continue
        ok = (use if key == "scale" else sel) & np.isfinite(truth[key]) & (sd > 0)
        z = np.abs(mu - truth[key])[ok] / (2 * sd[ok])
        scales[key] = float(np.quantile(z, target)) if z.size else 1.0
    entry = {"std_scale": scales, "n_patterns": int(len(sample.counts)),
             "target_coverage_2sigma": target, "options": dict(options)}
    predictor.card["refinement"] = entry
    predictor._refiners = {}
    return entry


def presence_metrics(probability: np.ndarray, fraction: np.ndarray, present: np.ndarray,
                     threshold: float = 0.5) -> dict:
    """Precision and recall of "present" (probability ≥ ``threshold``) against the truth
    "fraction > ``PRESENT``"; phases present below that fraction are left out."""
    truth = present & (fraction > PRESENT)
    use = truth | ~present
    pred = probability >= threshold
    tp = float((pred & truth & use).sum())
    fp = float((pred & ~truth & use).sum())
    fn = float((~pred & truth & use).sum())
    return {"precision": tp / max(tp + fp, 1.0), "recall": tp / max(tp + fn, 1.0),
            "threshold": threshold, "present_above": PRESENT}


def calibrate_presence(predictor: pq.PQNetPredictor, sample: Sample) -> float:
    """Temperature T of the presence logits minimising the held-out cross-entropy of the
    ensemble's mean probability (temperature scaling)."""
    _, logits = predictor.members_output(sample.counts)
    target, mask = presence_labels(sample)
    best, best_t = np.inf, 1.0
    for t in np.geomspace(0.25, 8.0, 41):
        p = np.clip((1 / (1 + np.exp(-np.clip(logits / t, -40, 40)))).mean(axis=0), 1e-7,
                    1 - 1e-7)
        nll = -(mask * (target * np.log(p) + (1 - target) * np.log(1 - p))).sum()
        if nll < best:
            best, best_t = nll, float(t)
    predictor.temperature = best_t
    return best_t


def plot_history(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    steps = [h["step"] for h in history]
    ax.semilogy(steps, [h["mse"] for h in history], label="squared error (normalised)")
    ax.set_xlabel("optimiser step (per member)")
    ax.set_ylabel("training loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["nll"] for h in history], color="tab:orange", alpha=0.6,
             label="variance NLL")
    ax2.set_ylabel("variance NLL")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_two_theta(spec: str) -> tuple[float, float, int]:
    """``"1:11:2048"`` → (1.0, 11.0, 2048): numpy.linspace(start, stop, n) in degrees."""
    try:
        start, stop, n = spec.split(":")
        out = (float(start), float(stop), int(n))
    except ValueError:
        raise ValueError(f"--two-theta {spec!r}: expected START:STOP:N, e.g. 1:11:2048") from None
    if out[2] < 64 or out[1] <= out[0]:
        raise ValueError(f"--two-theta {spec!r}: need STOP > START and N >= 64")
    return out


def load_phases(cifs: list[Path] | None, demo: bool, builtin: list[str] | None = None) -> dict:
    """name -> pymatgen Structure (conventional standard cell) from CIF files, the demo
    phases and/or built-in phases by name (``simulation.structures``)."""
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from ..simulation import structures as known

    phases = {}
    if demo:
        phases.update(known.demo_structures())
    for name in builtin or []:
        if name in known.OXIDE_PHASES:
            phases[name] = known.oxide_structures([name])[name]
        elif name in known.DEMO_PHASES:
            phases[name] = known.demo_structures()[name]
        else:
            raise ValueError(f"--phase {name!r}: not a built-in phase; built in: "
                             f"{sorted(set(known.OXIDE_PHASES) | set(known.DEMO_PHASES))}")
    for path in cifs or []:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no CIF at {path}")
        s = Structure.from_file(str(path))
        s = SpacegroupAnalyzer(s).get_conventional_standard_structure()
        name = s.composition.reduced_formula
        if name in phases:
            name = path.stem
        phases[name] = s
    if not phases:
        raise ValueError("no phases: pass --cif FILE (repeatable), --phase NAME or "
                         "--demo-phases")
    return phases


def train(phases: dict, out: str | Path, *, wavelength: float = 0.1771,
          two_theta: tuple[float, float, int] = (1.0, 11.0, 2048), instrument_fwhm: float = 0.03,
          instrument=None, ranges: Ranges | None = None, members: int = 5, steps: int = 6000,
          batch: int = 128, pool: int = 4096, reuse: int = 2, lr: float = 2e-3,
          minutes: float | None = None, seed: int = 0, arch: dict | None = None,
          n_validation: int = 2000, name: str | None = None, version: str = "1.0",
          presence: bool = True, references: dict | None = None, reference_steps: int = 300,
          runs: dict | None = None, run_steps: int = 300,
          resume: str | Path | None = None, calibration: dict | None = None, log=print,
          progress: bool = True) -> dict:
    """Train an ensemble for ``phases`` (name -> Structure), save weights + card + loss
    curve at ``out`` (.safetensors, .json, .png). Returns the card.

    ``instrument``: a ``simulation.instrument.Instrument`` (e.g. from a calibrant, ``xrdml
    calibrate profile``); default a constant Gaussian FWHM ``instrument_fwhm``.
    ``presence``: train presence heads (per-phase probabilities; absent phases take no
    share). ``references``: phase -> (two_theta, counts) measured pure-phase patterns to
    fine-tune on afterwards for ``reference_steps`` steps (see ``finetune_references``).
    ``resume``: weights of an earlier run of the same phases, grid and architecture to
    continue from (pass a lower ``lr``). ``calibration``: where the instrument profile came
    from (file, calibrant, fit quality), recorded in the card. ``runs``: labelled measured
    patterns (``pqnet_runs.runs_dataset``) to fine-tune on for ``run_steps`` steps last."""
    from ..simulation.instrument import Instrument

    t_start = time.monotonic()
    ranges = ranges or Ranges()
    out = Path(out).with_suffix(".safetensors")
    grid = np.linspace(*two_theta)
    instrument = instrument or Instrument.constant(wavelength, instrument_fwhm)
    sim = PowderSimulator(phases, wavelength, grid, instrument_fwhm=instrument_fwhm,
                          instrument=instrument)
    nominal = {n: sim.peaks[n].nominal.tolist() for n in sim.names}
    targets = pq.Targets([nominal[n] for n in sim.names], ranges.lattice_rel, ranges.size_nm)
    arch = {**pq.DEFAULT_ARCH, **(arch or {})}
    ensemble = pq.PQNetEnsemble(grid.size, len(sim.names), targets.n_out, members, arch,
                                seed=seed, presence=presence)
    previous = None
    if resume:
        state, previous = weights_io.load(resume)
        if previous.get("phases") != list(sim.names) or previous.get("two_theta") != [
                float(two_theta[0]), float(two_theta[1]), int(two_theta[2])]:
            raise ValueError(f"--resume {resume}: made for other phases or another 2θ grid")
        ensemble.load_state_dict(state)
        log(f"continuing from {resume} ({previous['training']['steps']} steps)")
    log(f"PQ-Net for {', '.join(f'{n} ({sim.peaks[n].system})' for n in sim.names)}; "
        f"λ = {wavelength} Å, 2θ = linspace{two_theta}; {members} members × "
        f"{pq.n_parameters(ensemble.members[0]):,} parameters; instrument "
        f"{instrument.source or 'constant FWHM'}; effects {'on' if ranges.effects else 'off'}")
    history = train_ensemble(ensemble, sim, targets, ranges, steps=steps, batch=batch,
                             pool=pool, lr=lr, minutes=minutes, seed=seed, reuse=reuse,
                             log=log, progress=progress)
    if previous is not None:
        history = [*previous["training"]["history"], *[
            {**h, "step": h["step"] + previous["training"]["steps"]} for h in history]]
    card = {
        "model": pq.NAME, "name": name or out.stem, "version": version,
        "phases": list(sim.names),
        "structures": {n: {"system": sim.peaks[n].system,
                           "formula": phases[n].composition.reduced_formula,
                           "lattice": [round(v, 5) for v in phases[n].lattice.abc]
                           + [round(v, 3) for v in phases[n].lattice.angles]}
                       for n in sim.names},
        "free": {n: list(sim.free[n]) for n in sim.names},
        "nominal": nominal,
        "wavelength": float(wavelength),
        "two_theta": [float(two_theta[0]), float(two_theta[1]), int(two_theta[2])],
        "instrument_fwhm": float(instrument_fwhm),
        "instrument": instrument.as_dict(),
        "instrument_calibration": calibration or {
            "note": "no calibrant: a constant Gaussian FWHM" if not instrument.source else ""},
        "peaks": {n: sim.peaks[n].as_dict() for n in sim.names},
        "presence": bool(presence),
        "ranges": ranges.as_dict(),
        "seed": int(seed),
        "members": int(members),
        "architecture": {
            "class": "PQNet", **arch,
            "input": "counts / mean count (1 channel) + log10 total counts to the parameter "
                     "blocks; patterns on another 2θ grid are resampled (linear) onto this one",
            "stem_note": "stem = [channels, kernel, stride]: a strided learned filter bank",
            "outputs_per_phase": ["share of integrated counts", *[f"free lattice ({'/'.join(f)})"
                                  for f in [["a", "b", "c"][:targets.max_free]]], "log size",
                                  *(["presence logit"] if presence else [])],
            "heads": "mean + log-variance per output",
            "n_parameters_per_member": pq.n_parameters(ensemble.members[0]),
        },
        "training": {"steps": history[-1]["step"] if history else 0, "batch": batch,
                     "resumed_from": (previous or {}).get("sha256"),
                     "minutes_before": (previous or {}).get("training", {}).get("minutes", 0),
                     "pool": pool, "pool_reuse": reuse, "lr": lr,
                     "optimizer": "AdamW, warm-up + cosine",
                     "loss": "MSE + 0.1 × Gaussian NLL (mean detached) + 0.2 × presence BCE",
                     "min_fraction_for_lattice_size": MIN_FRACTION,
                     "min_fraction_for_presence": MIN_PRESENT,
                     "simulator": "PowderSimulator fast path (Fourier, 2× oversampled, "
                                  "profile interpolated between 5 points over 2θ)",
                     "threads": torch.get_num_threads(),
                     "history": history},
    }
    if references:
        log(f"fine-tuning on measured references: {', '.join(references)}")
        card["training"]["references"] = finetune_references(
            ensemble, sim, targets, ranges, references, steps=reference_steps, batch=batch,
            lr=lr / 5, seed=seed + 1, log=log, progress=progress)
    if runs:
        from .pqnet_runs import finetune_runs

        log(f"fine-tuning on {len(runs['patterns'])} labelled patterns of "
            f"{len(runs['uids'])} run(s)")
        card["training"]["runs"] = finetune_runs(
            ensemble, sim, targets, ranges, runs, steps=run_steps, batch=batch, lr=lr / 5,
            seed=seed + 2, log=log, progress=progress)
    predictor = pq.PQNetPredictor(ensemble, card)
    rng = np.random.default_rng(seed + 10_000)
    log(f"calibrating and validating on {n_validation} held-out patterns (exact simulator)")
    calib = sim.sample(n_validation, rng, ranges, exact=True)
    card["std_scale"] = calibrate(predictor, sim, calib)
    if presence:
        card["presence_temperature"] = calibrate_presence(predictor, calib)
    valid = sim.sample(n_validation, rng, ranges, exact=True)
    ds = predictor.predict(valid.counts)
    metrics = evaluate(predictions(ds), truth_arrays(sim, valid), valid.fraction, valid.present)
    if presence:
        metrics["presence"] = presence_metrics(ds["presence"].values, valid.fraction,
                                               valid.present)
    card["metrics"] = metrics
    card["training"]["minutes"] = round((time.monotonic() - t_start) / 60, 2)
    state = {k: v for k, v in ensemble.state_dict().items()}
    card = weights_io.save(out, state, card)
    plot_history(history, out.with_suffix(".png"), f"PQ-Net {out.stem}: {', '.join(sim.names)}")
    return card


def finetune_references(ensemble: pq.PQNetEnsemble, sim: PowderSimulator, targets: pq.Targets,
                        ranges: Ranges, references: dict, *, steps: int = 300,
                        batch: int = 128, lr: float = 4e-4, seed: int = 1, log=print,
                        progress: bool = True) -> dict:
    """Fine-tune on measured pure-phase patterns: ``references`` phase -> (two_theta, y).

    Every batch is half simulated patterns (as in training) and half augmented references:
    a reference (resampled onto the model's grid, its background kept), at a random total
    count with Poisson noise, mixed with up to 50 % of a simulated pattern of the other
    phases. Targets: the reference's phase is present, its share, lattice and size are
    unknown (no loss); the other phases have their simulated shares and presence. So the
    network learns what the measured phase really looks like on this instrument (intensity
    ratios, profile, background) and that it is no other phase."""
    names = list(sim.names)
    unknown = [p for p in references if p not in names]
    if unknown:
        raise ValueError(f"reference for {unknown}, not phases of the model ({names})")
    ref_grid = {}
    helper = pq.PQNetPredictor.__new__(pq.PQNetPredictor)
    helper.two_theta = sim.two_theta
    for p, (tt, y) in references.items():
        y = np.clip(np.asarray(y, float), 0, None)
        ref_grid[p] = pq.PQNetPredictor.resample(helper, y[None], tt)[0]
    keys = list(ref_grid)

    def extra(rng, n):
        n = max(1, n // 2)
        j = rng.integers(0, len(keys), n)
        other_share = rng.uniform(0.0, 0.5, n) * (rng.random(n) < 0.5)
        total = np.exp(rng.uniform(np.log(ranges.counts[0]), np.log(ranges.counts[1]), n))
        sample = sim.sample(n, rng, ranges)
        counts = np.empty((n, sim.two_theta.size), np.float32)
        for i in range(n):
            ref = ref_grid[keys[j[i]]]
            ref = ref / ref.sum() * total[i] * (1 - other_share[i])
            oth = sample.counts[i].astype(float)
            oth = oth / max(oth.sum(), 1.0) * total[i] * other_share[i]
            counts[i] = rng.poisson(np.clip(ref + oth, 0, None))
        # labels: other phases from the simulation scaled by their share of the mixture
        y_np, m_np = labels(sim, sample, targets)
        frac = sample.fraction * other_share[:, None]
        present = sample.present & (frac > 0)
        tot_sim = sample.counts.sum(axis=1).astype(float) * sim.step
        share = sample.scale / np.clip(tot_sim, 1e-9, None)[:, None] * other_share[:, None]
        y_np[..., 0] = share * 4 - 2
        m_np[..., 1:] *= (frac >= MIN_FRACTION)[..., None]
        pres = (present & (frac >= MIN_PRESENT)).astype(np.float32)
        pmask = (~present | (frac >= MIN_PRESENT)).astype(np.float32)
        for i in range(n):
            jj = names.index(keys[j[i]])
            m_np[i, jj, :] = 0.0  # the reference's own share/lattice/size: unknown
            pres[i, jj], pmask[i, jj] = 1.0, 1.0
        x, logc = pq.prepare(counts)
        return [x, logc, torch.from_numpy(y_np), torch.from_numpy(m_np),
                torch.from_numpy(pres), torch.from_numpy(pmask)]

    hist = train_ensemble(ensemble, sim, targets, ranges, steps=steps, batch=batch,
                          pool=max(batch * 8, 1024), lr=lr, seed=seed, reuse=1, log=log,
                          progress=progress, extra=extra)
    return {"phases": keys, "steps": steps, "history": hist}


def lab_anode(anode: str, wavelength: float):
    """The ``Instrument`` of a lab tube's Kα1/Kα2 doublet for ``--anode`` (a name, 'auto':
    the anode whose Kα1 or mean Kα is within 0.002 Å of ``wavelength``, 'none'), or None."""
    from ..simulation.instrument import ANODES, Instrument

    if anode.lower() == "none":
        return None
    if anode.lower() != "auto":
        return Instrument.lab(anode.capitalize())
    for name, (k1, k2) in ANODES.items():
        if min(abs(wavelength - k1), abs(wavelength - (2 * k1 + k2) / 3)) < 0.002:
            return Instrument.lab(name)
    return None


def parse_references(specs: list[str] | None) -> dict:
    """``["CeO2=ceo2.xy", ...]`` → phase -> (two_theta, intensity) from two-column files."""
    from ..analysis.calibrate import read_xy

    out = {}
    for spec in specs or []:
        if "=" not in spec:
            raise ValueError(f"--reference {spec!r}: expected PHASE=FILE, e.g. CeO2=ceo2.xy")
        phase, path = spec.split("=", 1)
        if not Path(path).exists():
            raise FileNotFoundError(f"--reference {spec!r}: no file at {path}")
        out[phase.strip()] = read_xy(path)
    return out


def train_pqnet_command(
    cif: Annotated[list[Path] | None, typer.Option(
        help="CIF file of a phase (repeat for each phase)")] = None,
    phase: Annotated[list[str] | None, typer.Option(
        help="a built-in phase by name (repeatable): CeO2, NiO, ZnO, TiO2, Al2O3, Ni, Pd")] = None,
    demo_phases: Annotated[bool, typer.Option(
        help="add the four demo phases (Ni, NiO, CeO2, Pd; no CIF needed)")] = False,
    wavelength: Annotated[float, typer.Option(help="X-ray wavelength in Å")] = 0.1771,
    two_theta: Annotated[str, typer.Option(
        help="the detector's 2θ grid START:STOP:N in degrees (numpy.linspace)")] = "1:11:2048",
    out: Annotated[Path | None, typer.Option(
        help="weights file to write (.safetensors; card .json and loss curve .png beside "
             "it); default pqnet.safetensors")] = None,
    profile: Annotated[Path | None, typer.Option(
        help="instrument profile from a calibrant (xrdml calibrate profile); default a "
             "constant Gaussian FWHM (--instrument-fwhm)")] = None,
    anode: Annotated[str, typer.Option(
        help="lab tube anode (Cu, Mo, Co, Fe, Cr, Ag): simulate its Kα1/Kα2 doublet; 'auto' "
             "(default): when --wavelength is an anode's Kα1 or mean Kα; 'none': a "
             "monochromatic beam")] = "auto",
    effects: Annotated[bool, typer.Option(
        help="simulate what measured patterns show: zero shift, sample displacement, "
             "intensity fall-off, March-Dollase texture, capillary absorption, amorphous "
             "humps, impurity phases")] = True,
    presence: Annotated[bool, typer.Option(
        help="presence heads: a calibrated probability per phase, absent phases take no "
             "share")] = True,
    reference: Annotated[list[str] | None, typer.Option(
        help="PHASE=FILE: a measured pure-phase pattern (2θ, intensity columns) to "
             "fine-tune on after training (repeatable)")] = None,
    reference_steps: Annotated[int, typer.Option(
        help="fine-tuning steps on the references")] = 300,
    from_runs: Annotated[list[str] | None, typer.Option(
        "--from-runs", help="uid of a labelled run in --catalog to fine-tune on (its start "
                            "document's sample.phases or <phase>_fraction keys); further "
                            "uids may follow it (--from-runs UID [UID ...])")] = None,
    more_uids: Annotated[list[str] | None, typer.Argument(
        metavar="[UID ...]", help="further run uids for --from-runs", show_default=False)] = None,
    catalog_uri: Annotated[str | None, typer.Option(
        "--catalog", help="Tiled URI of the runs' catalog (API key from $TILED_API_KEY)")] = None,
    pattern: Annotated[str | None, typer.Option(
        help="data key of the 1D pattern in the runs (default: the one with a 2θ axis)")] = None,
    run_steps: Annotated[int, typer.Option(
        help="fine-tuning steps on the runs' patterns")] = 300,
    resume: Annotated[Path | None, typer.Option(
        help="continue training these weights (same phases and grid)")] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-3,
    members: Annotated[int, typer.Option(help="ensemble members")] = 5,
    steps: Annotated[int, typer.Option(help="optimiser steps per member")] = 3000,
    minutes: Annotated[float | None, typer.Option(
        help="stop training after this many minutes")] = None,
    batch: Annotated[int, typer.Option(help="patterns per step")] = 128,
    pool: Annotated[int, typer.Option(help="simulated patterns per pool")] = 4096,
    reuse: Annotated[int, typer.Option(help="passes over each pool")] = 2,
    instrument_fwhm: Annotated[float, typer.Option(
        help="instrumental Gaussian FWHM in degrees (without --profile)")] = 0.03,
    lattice_range: Annotated[float, typer.Option(
        help="lattice parameters within ± this share of nominal")] = 0.01,
    size_min: Annotated[float, typer.Option(help="smallest crystallite size, nm")] = 5.0,
    size_max: Annotated[float, typer.Option(help="largest crystallite size, nm")] = 100.0,
    counts_min: Annotated[float, typer.Option(help="fewest total counts a pattern")] = 1e4,
    counts_max: Annotated[float, typer.Option(help="most total counts a pattern")] = 1e6,
    background_max: Annotated[float, typer.Option(
        help="largest share of the counts in the background")] = 0.5,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch")] = 2,
    name: Annotated[str | None, typer.Option(help="model name in the card")] = None,
    version: Annotated[str, typer.Option(help="version recorded in the model card")] = "1.0",
    validation: Annotated[int, typer.Option(
        help="held-out patterns for calibration and metrics (each, exact simulator)")] = 2000,
):
    """Train a PQ-Net ensemble on patterns simulated from your phases (CIF files).

    Typer-ready: register with ``train_app.command("pqnet")(train_pqnet_command)``;
    the options are read from the annotations. Callable from Python with plain values.
    """
    from rich.console import Console

    from ..simulation.instrument import Instrument

    console = Console(soft_wrap=True)
    torch.set_num_threads(threads)
    try:
        tt = parse_two_theta(two_theta)
        phases = load_phases(cif, demo_phases, phase)
        calibration = None
        if profile is not None:
            inst = Instrument.load(profile, wavelength)
            info = json.loads(Path(profile).read_text())
            calibration = {
                "profile_file": Path(profile).name, "calibrant": info.get("calibrant"),
                "measurement": inst.source, "rwp": info.get("rwp"),
                "fwhm_rms_deg": info.get("fwhm_rms_deg"), "peaks": len(info.get("peaks", [])),
                "note": f"instrument profile fitted by `xrdml calibrate profile` to the "
                        f"{info.get('calibrant')} measurement {inst.source}; that pattern "
                        "entered training only through this profile"}
        else:
            inst = Instrument.constant(wavelength, instrument_fwhm)
        lab = lab_anode(anode, wavelength)
        if lab is not None and not inst.wavelength2:
            wavelength = lab.wavelength
            inst = inst.with_(wavelength=lab.wavelength, wavelength2=lab.wavelength2)
            console.print(f"lab source: {anode if anode != 'auto' else 'detected'} Kα1 "
                          f"{lab.wavelength} Å + Kα2 {lab.wavelength2} Å (ratio "
                          f"{lab.ratio2}); --anode none for a monochromatic beam")
        refs = parse_references(reference)
        runs = None
        if more_uids and not from_runs:
            raise ValueError(f"unexpected argument(s) {more_uids}: uids follow --from-runs")
        if from_runs:
            from .pqnet_runs import runs_dataset

            if not catalog_uri:
                raise ValueError("--from-runs needs --catalog URI (the Tiled server of the runs)")
            uids = [u for arg in [*from_runs, *(more_uids or [])]
                    for u in arg.replace(",", " ").split()]
            runs = runs_dataset(catalog_uri, uids, list(phases), np.linspace(*tt), wavelength,
                                pattern=pattern, log=console.print)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    out = Path(out or "pqnet.safetensors")
    base = dict(lattice_rel=lattice_range, size_nm=(size_min, size_max),
                counts=(counts_min, counts_max), background_max=background_max)
    ranges = Ranges.measured(**base) if effects else Ranges(**base)
    try:
        card = train(phases, out, wavelength=wavelength, two_theta=tt,
                     instrument_fwhm=instrument_fwhm, instrument=inst, ranges=ranges,
                     members=members, steps=steps, batch=batch, pool=pool, reuse=reuse,
                     minutes=minutes, seed=seed, n_validation=validation, name=name,
                     version=version, presence=presence, references=refs,
                     reference_steps=reference_steps, resume=resume, lr=lr, runs=runs,
                     run_steps=run_steps,
                     calibration=calibration,
                     log=console.print)
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    m = card["metrics"]
    console.print(f"held-out ({m['n_patterns']} exact patterns): fraction MAE "
                  f"{m['fraction_mae']:.4f}, lattice MAE {m['lattice_mae_A']:.5f} Å, size MAPE "
                  f"{m['size_mape_pct']:.1f} %, ±2σ coverage {m['coverage_2sigma']['all']:.3f}")
    if "presence" in m:
        console.print(f"presence (> {PRESENT:.0%} of the fraction): precision "
                      f"{m['presence']['precision']:.3f}, recall {m['presence']['recall']:.3f}")
    out = out.with_suffix(".safetensors")
    console.print(f"wrote {out} (sha256 {card['sha256'][:12]}…), {out.with_suffix('.json')}, "
                  f"{out.with_suffix('.png')}")
    console.print(f"use it: load_model({str(out)!r}) or PhaseQuantification(weights={str(out)!r})")
    return card

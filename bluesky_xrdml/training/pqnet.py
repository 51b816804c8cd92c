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

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from ..models import pqnet as pq
from ..models import weights as weights_io
from ..simulation.powder import PowderSimulator, Ranges, Sample

MIN_FRACTION = 0.05  # lattice/size targets count where the phase has at least this fraction
METRIC_FRACTION = 0.1  # lattice/size metrics: phases with fraction >= this


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


def loss_fn(out, y, mask):
    """out (N, P, n_out, 2) → mean squared error + Gaussian NLL of the variance."""
    mean, logvar = out[..., 0], out[..., 1].clamp(-14, 6)
    err2 = (mean - y) ** 2
    nll = 0.5 * (logvar + err2.detach() * torch.exp(-logvar))
    denom = mask.sum().clamp_min(1.0)
    return (err2 * mask).sum() / denom, (nll * mask).sum() / denom


def _lr_factor(progress: float, warmup: float = 0.03, final: float = 0.02) -> float:
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return final + (1 - final) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))


def train_ensemble(ensemble: pq.PQNetEnsemble, sim: PowderSimulator, targets: pq.Targets,
                   ranges: Ranges, *, steps: int, batch: int = 128, pool: int = 4096,
                   lr: float = 2e-3, minutes: float | None = None, seed: int = 0,
                   log=print, progress: bool = True) -> list[dict]:
    """Train every member for ``steps`` optimiser steps (or until ``minutes`` run out).
    Returns the history: one dict per pool (step, mse, nll, seconds)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rng = np.random.default_rng(seed)
    members = list(ensemble.members)
    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4) for m in members]
    for m in members:
        m.train()
    history, step, t0 = [], 0, time.monotonic()
    budget = None if minutes is None else 60.0 * minutes
    cols = (TextColumn("[bold]PQ-Net"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=steps, info="")
        while step < steps:
            sample = sim.sample(pool, rng, ranges)
            y_np, m_np = labels(sim, sample, targets)
            x, logc = pq.prepare(sample.counts)
            y, mask = torch.from_numpy(y_np), torch.from_numpy(m_np)
            n_batches = pool // batch
            orders = [torch.from_numpy(rng.permutation(pool)) for _ in members]
            mse_acc, nll_acc = 0.0, 0.0
            for b in range(n_batches):
                elapsed = time.monotonic() - t0
                prog = step / steps if budget is None else max(step / steps, elapsed / budget)
                if prog >= 1.0:
                    break
                factor = _lr_factor(prog)
                for k, (net, opt) in enumerate(zip(members, opts)):
                    idx = orders[k][b * batch:(b + 1) * batch]
                    for g in opt.param_groups:
                        g["lr"] = lr * factor
                    mse, nll = loss_fn(net(x[idx], logc[idx]), y[idx], mask[idx])
                    opt.zero_grad(set_to_none=True)
                    (mse + 0.1 * nll).backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                    opt.step()
                    mse_acc += float(mse.detach()) / len(members)
                    nll_acc += float(nll.detach()) / len(members)
                step += 1
            done_b = max(1, b if prog >= 1.0 else n_batches)
            history.append({"step": step, "mse": mse_acc / done_b, "nll": nll_acc / done_b,
                            "seconds": round(time.monotonic() - t0, 1)})
            bar.update(task, completed=min(step, steps),
                       info=f"mse {history[-1]['mse']:.4f}")
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
            if not k.endswith("_std")}


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
        use = np.ones_like(sel) if key == "scale" else sel
        use = use & np.isfinite(truth[key]) & (sd > 0)
        z = np.abs(mu - truth[key])[use] / (2 * sd[use])
        scales[key] = float(np.quantile(z, target)) if z.size else 1.0
    predictor.std_scale = scales
    return scales


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


def load_phases(cifs: list[Path] | None, demo: bool) -> dict:
    """name -> pymatgen Structure (conventional standard cell) from CIF files and/or the
    demo phases."""
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    phases = {}
    if demo:
        from ..simulation.structures import demo_structures

        phases.update(demo_structures())
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
        raise ValueError("no phases: pass --cif FILE (repeatable) or --demo-phases")
    return phases


def train(phases: dict, out: str | Path, *, wavelength: float = 0.1771,
          two_theta: tuple[float, float, int] = (1.0, 11.0, 2048), instrument_fwhm: float = 0.03,
          ranges: Ranges | None = None, members: int = 5, steps: int = 6000, batch: int = 128,
          pool: int = 4096, lr: float = 2e-3, minutes: float | None = None, seed: int = 0,
          arch: dict | None = None, n_validation: int = 2000, name: str | None = None,
          version: str = "1.0", log=print, progress: bool = True) -> dict:
    """Train an ensemble for ``phases`` (name -> Structure), save weights + card + loss
    curve at ``out`` (.safetensors, .json, .png). Returns the card."""
    t_start = time.monotonic()
    ranges = ranges or Ranges()
    out = Path(out).with_suffix(".safetensors")
    grid = np.linspace(*two_theta)
    sim = PowderSimulator(phases, wavelength, grid, instrument_fwhm=instrument_fwhm)
    nominal = {n: sim.peaks[n].nominal.tolist() for n in sim.names}
    targets = pq.Targets([nominal[n] for n in sim.names], ranges.lattice_rel, ranges.size_nm)
    arch = {**pq.DEFAULT_ARCH, **(arch or {})}
    ensemble = pq.PQNetEnsemble(grid.size, len(sim.names), targets.n_out, members, arch,
                                seed=seed)
    log(f"PQ-Net for {', '.join(f'{n} ({sim.peaks[n].system})' for n in sim.names)}; "
        f"λ = {wavelength} Å, 2θ = linspace{two_theta}; {members} members × "
        f"{pq.n_parameters(ensemble.members[0]):,} parameters")
    history = train_ensemble(ensemble, sim, targets, ranges, steps=steps, batch=batch,
                             pool=pool, lr=lr, minutes=minutes, seed=seed, log=log,
                             progress=progress)
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
        "ranges": ranges.as_dict(),
        "seed": int(seed),
        "members": int(members),
        "architecture": {
            "class": "PQNet", **arch,
            "input": "counts / mean count (1 channel) + log10 total counts to the parameter "
                     "blocks",
            "stem_note": "stem = [channels, kernel, stride]: a strided learned filter bank",
            "outputs_per_phase": ["share of integrated counts", *[f"free lattice ({'/'.join(f)})"
                                  for f in [["a", "b", "c"][:targets.max_free]]], "log size"],
            "heads": "mean + log-variance per output",
            "n_parameters_per_member": pq.n_parameters(ensemble.members[0]),
        },
        "training": {"steps": history[-1]["step"] if history else 0, "batch": batch,
                     "pool": pool, "lr": lr, "optimizer": "AdamW, warm-up + cosine",
                     "loss": "MSE + 0.1 × Gaussian NLL (mean detached)",
                     "min_fraction_for_lattice_size": MIN_FRACTION,
                     "simulator": "PowderSimulator fast path (Fourier, 4× oversampled)",
                     "threads": torch.get_num_threads(),
                     "history": history},
    }
    predictor = pq.PQNetPredictor(ensemble, card)
    rng = np.random.default_rng(seed + 10_000)
    log(f"calibrating and validating on {n_validation} held-out patterns (exact simulator)")
    calib = sim.sample(n_validation, rng, ranges, exact=True)
    card["std_scale"] = calibrate(predictor, sim, calib)
    valid = sim.sample(n_validation, rng, ranges, exact=True)
    metrics = evaluate(predictions(predictor.predict(valid.counts)), truth_arrays(sim, valid),
                       valid.fraction, valid.present)
    card["metrics"] = metrics
    card["training"]["minutes"] = round((time.monotonic() - t_start) / 60, 2)
    state = {k: v for k, v in ensemble.state_dict().items()}
    card = weights_io.save(out, state, card)
    plot_history(history, out.with_suffix(".png"), f"PQ-Net {out.stem}: {', '.join(sim.names)}")
    return card


def train_pqnet_command(
    cif: Annotated[list[Path] | None, typer.Option(
        help="CIF file of a phase (repeat for each phase)")] = None,
    demo_phases: Annotated[bool, typer.Option(
        help="add the four demo phases (Ni, NiO, CeO2, Pd; no CIF needed)")] = False,
    wavelength: Annotated[float, typer.Option(help="X-ray wavelength in Å")] = 0.1771,
    two_theta: Annotated[str, typer.Option(
        help="the detector's 2θ grid START:STOP:N in degrees (numpy.linspace)")] = "1:11:2048",
    out: Annotated[Path | None, typer.Option(
        help="weights file to write (.safetensors; card .json and loss curve .png beside "
             "it); default pqnet.safetensors")] = None,
    members: Annotated[int, typer.Option(help="ensemble members")] = 5,
    steps: Annotated[int, typer.Option(help="optimiser steps per member")] = 3000,
    minutes: Annotated[float | None, typer.Option(
        help="stop training after this many minutes")] = None,
    batch: Annotated[int, typer.Option(help="patterns per step")] = 128,
    instrument_fwhm: Annotated[float, typer.Option(
        help="instrumental Gaussian FWHM in degrees")] = 0.03,
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

    console = Console(soft_wrap=True)
    torch.set_num_threads(threads)
    try:
        tt = parse_two_theta(two_theta)
        phases = load_phases(cif, demo_phases)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    out = Path(out or "pqnet.safetensors")
    ranges = Ranges(lattice_rel=lattice_range, size_nm=(size_min, size_max),
                    counts=(counts_min, counts_max), background_max=background_max)
    card = train(phases, out, wavelength=wavelength, two_theta=tt,
                 instrument_fwhm=instrument_fwhm, ranges=ranges, members=members, steps=steps,
                 batch=batch, minutes=minutes, seed=seed, n_validation=validation, name=name,
                 version=version, log=console.print)
    m = card["metrics"]
    console.print(f"held-out ({m['n_patterns']} exact patterns): fraction MAE "
                  f"{m['fraction_mae']:.4f}, lattice MAE {m['lattice_mae_A']:.5f} Å, size MAPE "
                  f"{m['size_mape_pct']:.1f} %, ±2σ coverage {m['coverage_2sigma']['all']:.3f}")
    out = out.with_suffix(".safetensors")
    console.print(f"wrote {out} (sha256 {card['sha256'][:12]}…), {out.with_suffix('.json')}, "
                  f"{out.with_suffix('.png')}")
    console.print(f"use it: load_model({str(out)!r}) or PhaseQuantification(weights={str(out)!r})")
    return card

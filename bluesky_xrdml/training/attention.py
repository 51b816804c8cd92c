"""Training the operando attention model (``xrdml train attention``).

Data: labelled operando patterns — a pattern, the cell's voltage, mode and C-rate per
event — from the simulator (``--simulate``) or from the user's own archived runs in a
Tiled catalog (``--from-runs``). Neighbouring patterns of a run are nearly identical, so
the held-out set is whole cycles (``split_by_cycle``), never random patterns.

Loss: log-cosh of the normalised voltage error + 0.1 × Gaussian negative log-likelihood of
the learned variance (mean detached) + ``w_mode`` × cross-entropy(mode) + ``w_rate`` ×
cross-entropy(rate), class-balanced. After training, the voltage σ is scaled so that 95 %
of the held-out cycles' voltages lie within ±2σ (``std_scale`` in the card).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from ..models import attention as am
from ..models import weights as weights_io
from .progress import TrainingProgress

W_MODE, W_RATE = 0.3, 0.3
GATE_LR_SCALE = 20.0
# the recipe of the shipped model (benchmarks/attention.py: voltage MAE 0.0089 V with 73.7 %
# of the VAW on the moving peaks)
EPOCHS, AUGMENT, VAW_PENALTY, QUERY_PENALTY = 50, 0.3, 0.1, 0.3
# the common Q resolution (Å⁻¹ FWHM) patterns are brought to before the network: coarser
# than a 0.08° 2θ detector at Cu Kα (0.0055) and at Mo Kα (0.012), so one model reads both
DEFAULT_RESOLUTION = 0.015


@dataclass
class Dataset:
    """Labelled operando patterns, already on the model's Q grid."""

    x: np.ndarray  # (N, 256) float32 network input
    voltage: np.ndarray  # (N,) V
    mode: np.ndarray  # (N,) 0 charge / 1 discharge
    rate: np.ndarray  # (N,) index into ``rates``
    cycle: np.ndarray  # (N,) int, the unit of the train/validation split
    rates: list[float]
    resolution: float | None = None  # the Q resolution x was brought to (Å⁻¹ FWHM)
    instrument_fwhm: float = 0.0  # the measuring instrument's FWHM, degrees 2θ

    def subset(self, mask) -> Dataset:
        return Dataset(self.x[mask], self.voltage[mask], self.mode[mask], self.rate[mask],
                       self.cycle[mask], self.rates, self.resolution, self.instrument_fwhm)

    def __len__(self) -> int:
        return len(self.voltage)


def labels_from(mode_values, rate_values, rates: list[float] | None = None):
    """Mode strings/numbers and C-rates → (mode index (N,), rate index (N,), rates)."""
    modes = []
    for m in np.asarray(mode_values).ravel():
        key = m.decode() if isinstance(m, bytes) else m
        if isinstance(key, str):
            key = key.strip().lower()
            if key not in am.MODES:
                raise ValueError(f"mode {m!r}: expected 'charge' or 'discharge'")
            modes.append(am.MODES.index(key))
        else:  # a signed current or 0/1: > 0 charging
            modes.append(0 if float(key) > 0 else 1)
    r = np.array([float(str(v).rstrip("Cc")) if isinstance(v, (str, bytes)) else float(v)
                  for v in np.asarray(rate_values).ravel()])
    if rates is None:
        rates = sorted({round(v, 6) for v in r}, reverse=True)
    rates = [float(v) for v in rates]
    idx = np.abs(r[:, None] - np.asarray(rates)[None, :]).argmin(axis=1)
    return np.asarray(modes, np.int64), idx.astype(np.int64), rates


def cycles_from_mode(mode_idx: np.ndarray) -> np.ndarray:
    """A cycle number per pattern when a run has none: a new cycle at every switch from
    discharge to charge."""
    starts = np.r_[False, (mode_idx[1:] == 0) & (mode_idx[:-1] == 1)]
    return np.cumsum(starts)


def make_dataset(patterns, two_theta, wavelength, voltage, mode, rate, cycle, q_range,
                 rates=None, instrument_fwhm: float = 0.0,
                 resolution: float | None = DEFAULT_RESOLUTION) -> Dataset:
    """Labelled patterns on the model's Q grid, brought to ``resolution`` (Å⁻¹ FWHM; None:
    as measured) from an instrument of ``instrument_fwhm`` degrees 2θ."""
    m, r, rates = labels_from(mode, rate, rates)
    x = am.resample(patterns, two_theta, wavelength, q_range, instrument_fwhm=instrument_fwhm,
                    resolution=resolution)
    return Dataset(x, np.asarray(voltage, float), m, r, np.asarray(cycle, int), rates,
                   resolution, float(instrument_fwhm))


def split_by_cycle(data: Dataset, n_validation: int = 2, seed: int = 0):
    """(train, validation): ``n_validation`` whole cycles held out, one per rate class where
    possible (each cycle's most common rate)."""
    cycles = np.unique(data.cycle)
    if len(cycles) < 2:
        raise ValueError(f"need at least 2 cycles to hold one out, got {len(cycles)}; "
                         "record more cycles (or pass cycle numbers)")
    rng = np.random.default_rng(seed)
    main = {c: np.bincount(data.rate[data.cycle == c]).argmax() for c in cycles}
    chosen = []
    for r in rng.permutation(sorted(set(main.values()))):
        options = [c for c in cycles if main[c] == r and c not in chosen]
        if options and len(chosen) < n_validation:
            chosen.append(rng.choice(options))
    rest = [c for c in cycles if c not in chosen]
    while len(chosen) < min(n_validation, len(cycles) - 1):
        chosen.append(rest.pop(int(rng.integers(len(rest)))))
    val = np.isin(data.cycle, chosen)
    return data.subset(~val), data.subset(val)


def _logcosh(x):
    return x + torch.nn.functional.softplus(-2 * x) - np.log(2.0)


def loss_terms(out, v, m, r, mode_w, rate_w):
    vpred, mlog, rlog, _ = out
    mean, logvar = vpred[:, 0], vpred[:, 1].clamp(-14, 6)
    err = mean - v
    lv = _logcosh(err).mean()
    nll = 0.5 * (logvar + err.detach() ** 2 * torch.exp(-logvar)).mean()
    lm = torch.nn.functional.cross_entropy(mlog, m, weight=mode_w)
    lr = torch.nn.functional.cross_entropy(rlog, r, weight=rate_w)
    return lv, nll, lm, lr


def _class_weights(idx: np.ndarray, k: int) -> torch.Tensor:
    counts = np.bincount(idx, minlength=k).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / k, 0.0)
    return torch.tensor(w, dtype=torch.float32)


def evaluate(predictor: am.AttentionPredictor, data: Dataset) -> dict:
    """Voltage MAE (V), ±2σ coverage, mode and rate accuracy on a prepared dataset."""
    out = predictor.forward(data.x)
    v = out["v"].astype(float)
    volt = v[:, 0] * predictor.voltage_scale + predictor.voltage_offset
    std = np.sqrt(np.exp(np.clip(v[:, 1], -20, 10))) * predictor.voltage_scale * \
        predictor.std_scale
    err = np.abs(volt - data.voltage)
    return {"n": int(len(data)), "voltage_mae_V": float(err.mean()),
            "voltage_p95_V": float(np.quantile(err, 0.95)) if len(err) else 0.0,
            "coverage_2sigma": float(np.mean(err <= 2 * std)),
            "mode_accuracy": float(np.mean(out["mode"].argmax(1) == data.mode)),
            "rate_accuracy": float(np.mean(out["rate"].argmax(1) == data.rate))}


def calibrate(predictor: am.AttentionPredictor, data: Dataset, target: float = 0.95) -> float:
    """The factor on σ that puts ``target`` of ``data``'s voltages within ±2σ."""
    predictor.std_scale = 1.0
    v = predictor.forward(data.x)["v"].astype(float)
    volt = v[:, 0] * predictor.voltage_scale + predictor.voltage_offset
    std = np.sqrt(np.exp(np.clip(v[:, 1], -20, 10))) * predictor.voltage_scale
    z = np.abs(volt - data.voltage) / (2 * std)
    predictor.std_scale = float(np.quantile(z, target))
    return predictor.std_scale


def _lr_factor(progress: float, warmup: float = 0.05, final: float = 0.02) -> float:
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return final + (1 - final) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))


def tilt(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Inputs (N, 1, L) times a smooth random factor ``exp(a t + b (t² - 1/3))`` over the Q
    grid (t ∈ [-1, 1], |a| ≤ strength, |b| ≤ strength / 2), min-max scaled again: the
    changes of relative peak heights that texture, absorption and the Lorentz factor at
    another wavelength make, so the network reads positions and shapes rather than exact
    intensity ratios."""
    t = torch.linspace(-1.0, 1.0, x.shape[-1])
    a = (2 * torch.rand(len(x), 1, 1, generator=gen) - 1) * strength
    b = (torch.rand(len(x), 1, 1, generator=gen) - 0.5) * strength
    y = x * torch.exp(a * t + b * (t * t - 1.0 / 3.0))
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    return (y - lo) / (hi - lo).clamp_min(1e-6)


def fit(net: am.AttentionNet, train: Dataset, norm: tuple[float, float], *, epochs: int,
        batch: int = 64, lr: float = 2e-3, minutes: float | None = None, seed: int = 0,
        validation: Dataset | None = None, augment: float = 0.0, vaw_penalty: float = 0.0,
        query_penalty: float = 0.0, log=print, progress: bool = True) -> list[dict]:
    """Train ``net`` on ``train``; one history entry per epoch. ``augment``: strength of the
    random intensity tilt (``tilt``; 0 = none). ``vaw_penalty``: λ of a sparsity prior on
    the attention, λ × the mean VAW (a query that needs no particular key then spreads its
    attention instead of fixing on one). ``query_penalty``: λ of an L1 prior on the queries
    (the VAW saturates at 1 where a query fixes on a key, and its gradient with it; the
    query's size does not)."""
    gen = torch.Generator().manual_seed(seed)
    # the query gate's logits get one small gradient each (a per-bin weight): a larger step
    gate = [p for n, p in net.named_parameters() if n == "gate_logit"]
    rest = [p for n, p in net.named_parameters() if n != "gate_logit"]
    opt = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0},
                             {"params": gate, "lr_scale": GATE_LR_SCALE, "weight_decay": 0.0}],
                            lr=lr, weight_decay=1e-4)
    x = torch.from_numpy(train.x)[:, None, :]
    v = torch.from_numpy(((train.voltage - norm[0]) / norm[1]).astype(np.float32))
    m, r = torch.from_numpy(train.mode), torch.from_numpy(train.rate)
    mode_w = _class_weights(train.mode, 2)
    rate_w = _class_weights(train.rate, len(train.rates))
    n = len(train)
    steps_per_epoch = max(1, n // batch)
    total = epochs * steps_per_epoch
    budget = None if minutes is None else 60.0 * minutes
    history, step, t0 = [], 0, time.monotonic()
    with TrainingProgress("attention", total=epochs, unit="epoch", log=log, enabled=progress,
                          budget_s=budget) as bar:
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(n, generator=gen)
            acc = np.zeros(4)
            done = 0
            for b in range(steps_per_epoch):
                elapsed = time.monotonic() - t0
                prog = step / total if budget is None else max(step / total, elapsed / budget)
                if prog >= 1.0:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"] * _lr_factor(prog)
                idx = perm[b * batch:(b + 1) * batch]
                xb = tilt(x[idx], gen, augment) if augment > 0 else x[idx]
                out = net(xb, with_query=True)
                terms = loss_terms(out[:4], v[idx], m[idx], r[idx], mode_w, rate_w)
                loss = terms[0] + 0.1 * terms[1] + W_MODE * terms[2] + W_RATE * terms[3]
                if vaw_penalty > 0:
                    loss = loss + vaw_penalty * out[3].amax(dim=-1).mean()
                if query_penalty > 0:  # the queries are ReLU outputs: their mean is their L1
                    loss = loss + query_penalty * out[4].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                opt.step()
                acc += [float(t.detach()) for t in terms]
                step += 1
                done += 1
            entry = {"epoch": epoch + 1, "step": step,
                     "seconds": round(time.monotonic() - t0, 1),
                     **dict(zip(("voltage_logcosh", "voltage_nll", "mode_ce", "rate_ce"),
                                (acc / max(done, 1)).round(5).tolist()))}
            if validation is not None and len(validation):
                net.eval()
                with torch.inference_mode():
                    out = net(torch.from_numpy(validation.x)[:, None, :])
                vv = torch.from_numpy(((validation.voltage - norm[0]) / norm[1])
                                      .astype(np.float32))
                terms = loss_terms(out, vv, torch.from_numpy(validation.mode),
                                   torch.from_numpy(validation.rate), mode_w, rate_w)
                entry.update({f"val_{k}": round(float(t), 5) for k, t in
                              zip(("voltage_logcosh", "voltage_nll", "mode_ce", "rate_ce"), terms)})
                entry["val_voltage_mae_V"] = round(float(
                    (out[0][:, 0] - vv).abs().mean()) * norm[1], 5)
            history.append(entry)
            info = f"logcosh {entry['voltage_logcosh']:.4f}"
            if "val_voltage_mae_V" in entry:
                info += f"  val MAE {entry['val_voltage_mae_V']:.4f} V"
            bar.update(epoch + 1, info=info)
            if done < steps_per_epoch or (budget is not None and time.monotonic() - t0 >= budget):
                if budget is not None:
                    log(f"time budget of {minutes} min reached in epoch {epoch + 1}")
                break
    net.eval()
    return history


def plot_history(history: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), constrained_layout=True)
    ep = [h["epoch"] for h in history]
    for ax, key, label in zip(axes, ("voltage_logcosh", "mode_ce", "rate_ce"),
                              ("voltage log-cosh (normalised)", "mode cross-entropy",
                               "rate cross-entropy")):
        ax.semilogy(ep, [max(h[key], 1e-8) for h in history], label="training")
        if f"val_{key}" in history[0]:
            ax.semilogy(ep, [max(h[f"val_{key}"], 1e-8) for h in history],
                        label="held-out cycles")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(data: Dataset, out: str | Path, *, q_range, wavelength: float, two_theta,
          epochs: int = EPOCHS, batch: int = 64, lr: float = 2e-3, minutes: float | None = None,
          seed: int = 0, arch: dict | None = None, n_validation_cycles: int = 2,
          name: str | None = None, version: str = "1.0", source: dict | None = None,
          augment: float = AUGMENT, vaw_penalty: float = VAW_PENALTY,
          query_penalty: float = QUERY_PENALTY, log=print, progress: bool = True) -> dict:
    """Train on ``data`` (split by cycle), calibrate σ on the held-out cycles, save weights,
    card and loss curves at ``out`` (.safetensors, .json, .png). Returns the card."""
    t_start = time.monotonic()
    out = Path(out).with_suffix(".safetensors")
    train_set, val_set = split_by_cycle(data, n_validation_cycles, seed)
    norm = (float(np.mean(train_set.voltage)), float(max(np.std(train_set.voltage), 1e-3)))
    torch.manual_seed(seed)
    net = am.AttentionNet(len(data.rates), arch)
    arch = net.arch
    log(f"attention model: {am.n_parameters(net):,} parameters; {len(train_set)} training "
        f"patterns ({len(np.unique(train_set.cycle))} cycles), {len(val_set)} held-out "
        f"({len(np.unique(val_set.cycle))} cycles); rates {data.rates} C")
    history = fit(net, train_set, norm, epochs=epochs, batch=batch, lr=lr, minutes=minutes,
                  seed=seed, validation=val_set, augment=augment, vaw_penalty=vaw_penalty,
                  query_penalty=query_penalty, log=log, progress=progress)
    card = {
        "model": am.NAME, "name": name or out.stem, "version": version,
        "q_range": [float(q_range[0]), float(q_range[1])], "n_points": am.N_POINTS,
        "input": "2θ at the caller's wavelength → Q = 4π sin θ / λ; counts convolved to the "
                 "Q resolution resolution_q_fwhm from the caller's instrument_fwhm (degrees "
                 "2θ; default instrument_fwhm_deg); PCHIP spline of the cumulative counts "
                 "differenced on 256 Q bins; min-max scaled per pattern. Any wavelength "
                 "whose 2θ range covers q_range.",
        "wavelength": float(wavelength),
        "resolution_q_fwhm": data.resolution,
        "instrument_fwhm_deg": float(data.instrument_fwhm),
        "two_theta": [float(np.min(two_theta)), float(np.max(two_theta)), int(np.size(two_theta))],
        "modes": list(am.MODES), "rates": list(data.rates),
        "rate_labels": [f"{r:g}C" for r in data.rates],
        "voltage_norm": list(norm),
        "seed": int(seed),
        "architecture": {"class": "AttentionNet", **arch,
                         "n_parameters": am.n_parameters(net),
                         "attention": "weights = softmax(scale · Q·Kᵀ), Q = layer 6, K = V = "
                                      "layer 10; combination = tanh(weights·V)",
                         "heads": "per task: 1×1 conv → flatten → 64 → out"},
        "training": {"epochs": history[-1]["epoch"] if history else 0, "batch": batch,
                     "lr": lr, "optimizer": "AdamW, warm-up + cosine",
                     "loss": f"logcosh(voltage) + 0.1 NLL(variance) + {W_MODE} CE(mode) + "
                             f"{W_RATE} CE(rate), class-balanced"
                             + (f" + {vaw_penalty} mean(VAW)" if vaw_penalty else "")
                             + (f" + {query_penalty} mean(query)" if query_penalty else ""),
                     "augment_tilt": augment, "vaw_penalty": vaw_penalty,
                     "query_penalty": query_penalty,
                     "split": "by cycle", "train_cycles": sorted(map(int, np.unique(
                         train_set.cycle))), "validation_cycles": sorted(map(int, np.unique(
                             val_set.cycle))),
                     "n_train": len(train_set), "n_validation": len(val_set),
                     "threads": torch.get_num_threads(), "history": history,
                     "source": source or {}},
    }
    predictor = am.AttentionPredictor(net, card)
    card["std_scale"] = calibrate(predictor, val_set)
    card["metrics"] = {"validation_cycles": evaluate(predictor, val_set)}
    card["training"]["minutes"] = round((time.monotonic() - t_start) / 60, 2)
    card["training"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    card = weights_io.save(out, net.state_dict(), card)
    plot_history(history, out.with_suffix(".png"), f"attention {out.stem}")
    return card


# --- data sources ----------------------------------------------------------------------
def simulated_dataset(cycles: int = 10, rates=(1.0, 0.2), *, interval: float = 60.0,
                      seed: int = 0, settings=None, q_range=None, first_cycle: int = 0,
                      resolution: float | None = DEFAULT_RESOLUTION):
    """(dataset, run, q_range) of ``cycles`` simulated cycles, brought to ``resolution``
    (Å⁻¹ FWHM) from the simulated instrument's FWHM; ``q_range`` defaults to the Q span of
    the detector's 2θ grid."""
    from ..simulation.operando import PatternSettings, simulate_run

    settings = settings or PatternSettings()
    all_rates = sorted(set(map(float, _flat(rates))), reverse=True)
    run = simulate_run(cycles, rates, interval=interval, seed=seed, settings=settings,
                       first_cycle=first_cycle)
    if q_range is None:
        q = am.q_of(run.two_theta[[0, -1]], run.wavelength)
        q_range = (float(q[0]), float(q[1]))
    data = make_dataset(run.patterns, run.two_theta, run.wavelength, run.voltage, run.mode,
                        run.rate, run.cycle, q_range, rates=all_rates,
                        instrument_fwhm=settings.instrument_fwhm, resolution=resolution)
    return data, run, q_range


def _flat(rates):
    for r in rates:
        if np.isscalar(r):
            yield r
        else:
            yield from r


def runs_dataset(catalog_uri: str, uids: list[str], *, pattern: str, voltage: str, mode: str,
                 rate: str, cycle: str | None = None, two_theta=None,
                 wavelength: float | None = None, instrument_fwhm: float | None = None,
                 log=print):
    """Patterns and labels of archived runs' primary streams (one cycle numbering across
    runs) → (patterns, two_theta, wavelength, voltage, mode, rate, cycle, instrument FWHM in
    degrees 2θ: the argument, else the configuration's ``instrument_fwhm``, else 0)."""
    from .. import catalog
    from ..archive import primary_stream

    client = catalog.connect(catalog_uri)
    ys, vs, ms, rs, cs = [], [], [], [], []
    tt_all, wl_all = None, None
    offset = 0
    for uid in uids:
        _, stream, config = primary_stream(client, uid, catalog_uri)
        keys = list(stream.descriptor["data_keys"])
        for k in (pattern, voltage, mode, rate):
            if k not in keys:
                raise ValueError(f"run {uid}: no data key {k!r} in 'primary' (it has: "
                                 f"{sorted(keys)})")
        tt, wl = two_theta, wavelength
        if tt is None:
            tt = next((v for k, v in config.items() if k.endswith("two_theta")), None)
        if wl is None:
            wl = next((v for k, v in config.items() if k.endswith("wavelength")), None)
        if instrument_fwhm is None:
            instrument_fwhm = next((float(v) for k, v in config.items()
                                    if k.endswith("instrument_fwhm")), None)
        if tt is None or wl is None:
            raise ValueError(f"run {uid}: no 2θ axis or wavelength in the descriptor's "
                             "configuration; pass --two-theta START:STOP:N and --wavelength")
        tt = np.asarray(tt, float)
        if tt_all is not None and (tt.shape != tt_all.shape or not np.allclose(tt, tt_all)
                                   or abs(float(wl) - wl_all) > 1e-6):
            raise ValueError(f"run {uid}: its 2θ grid or wavelength differs from the first "
                             "run's; train on runs of one detector setting")
        tt_all, wl_all = tt, float(wl)
        data: dict[str, list] = {k: [] for k in (pattern, voltage, mode, rate, cycle) if k}
        for _, chunk, _ in stream.chunks(256):
            for k in data:
                if k in chunk:
                    data[k].extend(chunk[k])
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"run {uid}: the keys hold different numbers of events "
                             f"({lengths}); is the run still being written?")
        y = np.asarray(data[pattern], float)
        ys.append(y.reshape(len(y), -1))
        vs.append(np.asarray(data[voltage], float))
        ms.append(np.asarray(data[mode]))
        rs.append(np.asarray(data[rate]))
        if cycle and cycle in keys:
            c = np.asarray(data[cycle], int)
        else:
            c = cycles_from_mode(labels_from(ms[-1], rs[-1])[0])
        c = c - c.min() + offset
        offset = int(c.max()) + 1
        cs.append(c)
        log(f"run {uid[:8]}: {len(y)} patterns, {len(np.unique(c))} cycles")
    if instrument_fwhm is None:
        log("no instrument FWHM in the runs' configuration or --instrument-fwhm: peaks are "
            "taken as measured (instrument FWHM 0)")
    return (np.concatenate(ys), tt_all, wl_all, np.concatenate(vs), np.concatenate(ms),
            np.concatenate(rs), np.concatenate(cs), float(instrument_fwhm or 0.0))


def parse_two_theta(spec: str | None):
    if spec is None:
        return None
    from .pqnet import parse_two_theta as parse

    return np.linspace(*parse(spec))


def train_attention_command(
    out: Annotated[Path, typer.Option(help="weights file to write (.safetensors; card .json "
                                      "and loss curves .png beside it)")] = Path(
                                          "attention.safetensors"),
    simulate: Annotated[bool, typer.Option(
        "--simulate", help="train on simulated NMC | graphite cycling")] = False,
    from_runs: Annotated[list[str] | None, typer.Option(
        "--from-runs", help="uid of an archived operando run; further uids may follow it "
                            "(--from-runs UID [UID ...])")] = None,
    more_uids: Annotated[list[str] | None, typer.Argument(
        metavar="[UID ...]", help="further run uids for --from-runs", show_default=False)] = None,
    catalog_uri: Annotated[str | None, typer.Option(
        "--catalog", help="Tiled URI of the runs' catalog (API key from $TILED_API_KEY)")] = None,
    pattern: Annotated[str, typer.Option(help="data key of the 1D pattern")] = "operando_pattern",
    voltage: Annotated[str, typer.Option(help="data key of the cell voltage (V)")] = "cell_voltage",
    mode: Annotated[str, typer.Option(help="data key of the mode ('charge'/'discharge' or a "
                                      "signed current)")] = "cell_mode",
    rate: Annotated[str, typer.Option(help="data key of the C-rate")] = "cell_rate",
    cycle: Annotated[str | None, typer.Option(
        help="data key of the cycle number (default: a new cycle at every discharge → charge "
             "switch)")] = "cell_cycle",
    two_theta: Annotated[str | None, typer.Option(
        help="2θ grid START:STOP:N when the runs' configuration has none")] = None,
    wavelength: Annotated[float | None, typer.Option(
        help="wavelength in Å when the runs' configuration has none")] = None,
    cycles: Annotated[int, typer.Option(help="simulated cycles (--simulate)")] = 10,
    rates: Annotated[str, typer.Option(help="simulated C-rates per cycle, comma-separated "
                                       "(--simulate)")] = "1,0.2",
    interval: Annotated[float, typer.Option(help="simulated seconds between patterns")] = 60.0,
    fwhm: Annotated[float, typer.Option(
        help="simulated instrumental FWHM in degrees 2θ (--simulate)")] = 0.08,
    instrument_fwhm: Annotated[float | None, typer.Option(
        help="your instrument's FWHM in degrees 2θ when the runs' configuration has no "
             "'instrument_fwhm' (--from-runs; default 0: peaks taken as measured)")] = None,
    resolution: Annotated[float, typer.Option(
        help="common Q resolution (Å⁻¹ FWHM) every pattern is brought to before the network, "
             "so that the model reads other wavelengths and instruments; must be coarser "
             "than every instrument you will use it on; 0: none")] = DEFAULT_RESOLUTION,
    augment: Annotated[float, typer.Option(
        help="strength of a random smooth intensity tilt over Q applied to training inputs "
             "(relative peak heights change between instruments and wavelengths); 0: none")
    ] = AUGMENT,
    vaw_penalty: Annotated[float, typer.Option(
        help="λ of a sparsity prior on the attention (λ × mean VAW) in the loss; 0: none")
    ] = VAW_PENALTY,
    query_penalty: Annotated[float, typer.Option(
        help="λ of an L1 prior on the attention queries (λ × mean query) in the loss; "
             "0: none")] = QUERY_PENALTY,
    epochs: Annotated[int, typer.Option(help="passes over the training cycles")] = EPOCHS,
    minutes: Annotated[float | None, typer.Option(help="stop after this many minutes")] = None,
    batch: Annotated[int, typer.Option(help="patterns per step")] = 64,
    validation_cycles: Annotated[int, typer.Option(help="cycles held out")] = 2,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch")] = 2,
    name: Annotated[str | None, typer.Option(help="model name in the card")] = None,
    version: Annotated[str, typer.Option(help="version recorded in the card")] = "1.0",
):
    """Train the operando attention model (voltage, mode, rate + attention over 2θ) on
    simulated cycling or on your own labelled runs."""
    from rich.console import Console

    console = Console(soft_wrap=True)
    torch.set_num_threads(threads)
    try:
        if simulate == bool(from_runs):
            raise ValueError("choose one: --simulate or --from-runs UID [UID ...]")
        if more_uids and not from_runs:
            raise ValueError(f"unexpected argument(s) {more_uids}: uids follow --from-runs")
        if simulate:
            rate_list = [float(r) for r in rates.split(",") if r.strip()]
            if fwhm <= 0:
                raise ValueError(f"--fwhm {fwhm}: a width in degrees, > 0")
            console.print(f"simulating {cycles} cycles at {rate_list} C …")
            from ..simulation.operando import PatternSettings

            data, run, q_range = simulated_dataset(
                cycles, rate_list, interval=interval, seed=seed,
                settings=PatternSettings(instrument_fwhm=fwhm), resolution=resolution or None)
            tt, wl = run.two_theta, run.wavelength
            source = {"simulated": {"cycles": cycles, "rates": rate_list, "interval_s": interval,
                                    "seed": seed, "instrument_fwhm_deg": fwhm}}
        else:
            if not catalog_uri:
                raise ValueError("--from-runs needs --catalog URI (the Tiled server of the runs)")
            uids = [u for arg in [*from_runs, *(more_uids or [])]
                    for u in arg.replace(",", " ").split()]
            y, tt, wl, v, m, r, c, width = runs_dataset(
                catalog_uri, uids, pattern=pattern, voltage=voltage, mode=mode, rate=rate,
                cycle=cycle, two_theta=parse_two_theta(two_theta), wavelength=wavelength,
                instrument_fwhm=instrument_fwhm, log=console.print)
            q = am.q_of(np.asarray(tt)[[0, -1]], wl)
            q_range = (float(q[0]), float(q[1]))
            data = make_dataset(y, tt, wl, v, m, r, c, q_range, instrument_fwhm=width,
                                resolution=resolution or None)
            source = {"runs": uids, "catalog": catalog_uri.split("?")[0],
                      "keys": {"pattern": pattern, "voltage": voltage, "mode": mode,
                               "rate": rate, "cycle": cycle}}
        card = train(data, out, q_range=q_range, wavelength=wl, two_theta=tt, epochs=epochs,
                     batch=batch, minutes=minutes, seed=seed,
                     n_validation_cycles=validation_cycles, name=name, version=version,
                     source=source, augment=augment, vaw_penalty=vaw_penalty,
                     query_penalty=query_penalty, log=console.print)
    except (ValueError, am.PatternError) as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    m = card["metrics"]["validation_cycles"]
    console.print(f"held-out cycles ({m['n']} patterns): voltage MAE {m['voltage_mae_V']:.4f} V, "
                  f"±2σ coverage {m['coverage_2sigma']:.3f}, mode {100 * m['mode_accuracy']:.1f} "
                  f"%, rate {100 * m['rate_accuracy']:.1f} %")
    out = Path(out).with_suffix(".safetensors")
    console.print(f"wrote {out} (sha256 {card['sha256'][:12]}…), {out.with_suffix('.json')}, "
                  f"{out.with_suffix('.png')} in {card['training']['minutes']} min")
    console.print(f"use it: load_model({str(out)!r}) or OperandoAttention(weights={str(out)!r})")
    return card

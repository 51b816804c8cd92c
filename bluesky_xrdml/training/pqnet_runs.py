"""PQ-Net from labelled runs in a Tiled catalog (``xrdml train pqnet --from-runs UID ...``).

A run is labelled by what its sample holds, in one of two ways:

- the start document's ``sample.phases``: ``{"CeO2": 0.7, "NiO": 0.3}`` (fractions; they
  are normalised) or ``["CeO2", "NiO"]`` (which phases are there, not how much), the same
  for every pattern of the run (``RE(plan, sample={"phases": {...}})``);
- per event, data keys ``<phase>_fraction`` beside the pattern (e.g. from a sample
  changer's recipe); they take precedence.

A labelled phase list is taken as complete: the model's phases it does not name are
absent. Patterns are read from the primary stream (``--pattern KEY``, by default the one
1D array with a 2θ axis in its configuration), resampled onto the model's grid.

Fine-tuning (``finetune_runs``) mixes every batch half simulated (as in training), half
measured patterns, thinned binomially to a random share of their counts (so the network
sees them at lower counts too, with Poisson statistics kept). Targets of a measured
pattern: presence of every phase; where fractions are known, each phase's share of the
counts = its fraction × the phases' total share that the model estimated before the
fine-tuning (the labels say how the phases split, not how much is background); lattice
and size are unknown (no loss).
"""

from __future__ import annotations

import numpy as np
import torch

from ..models import pqnet as pq
from .pqnet import MIN_PRESENT, train_ensemble

LABEL = "phases"  # start["sample"][LABEL]


def labels_from_start(start: dict, phases: list[str], uid: str = "") -> tuple:
    """(fraction (P,) NaN where unknown, present (P,)) from ``start["sample"]["phases"]``,
    or None when the run carries no such label."""
    sample = start.get("sample")
    spec = sample.get(LABEL) if isinstance(sample, dict) else None
    if spec is None:
        return None
    names = list(spec) if isinstance(spec, (dict, list, tuple)) else None
    if names is None:
        raise ValueError(f"run {uid[:8]}: sample.{LABEL} must be a dict phase -> fraction or "
                         f"a list of phases, not {spec!r}")
    unknown = [n for n in names if n not in phases]
    if unknown:
        raise ValueError(f"run {uid[:8]}: labelled with {unknown}, not phases of the model "
                         f"({phases})")
    present = np.array([float(p in names) for p in phases])
    fraction = np.full(len(phases), np.nan)
    if isinstance(spec, dict):
        w = np.array([float(spec.get(p, 0.0)) for p in phases])
        if w.sum() <= 0 or (w < 0).any():
            raise ValueError(f"run {uid[:8]}: sample.{LABEL} fractions must be >= 0, not all 0")
        fraction = w / w.sum()
        present = (fraction > 0).astype(float)
    return fraction, present


def runs_dataset(catalog_uri: str, uids: list[str], phases: list[str], two_theta,
                 wavelength: float, *, pattern: str | None = None, log=print) -> dict:
    """Patterns and labels of archived runs → dict ``patterns`` (N, M) on ``two_theta``,
    ``fraction`` (N, P) (NaN: unknown), ``present`` (N, P), ``uids``, ``counts`` per run."""
    from .. import catalog
    from ..archive import primary_stream

    two_theta = np.asarray(two_theta, float)
    helper = pq.PQNetPredictor.__new__(pq.PQNetPredictor)
    helper.two_theta = two_theta
    client = catalog.connect(catalog_uri)
    ys, fs, ps, per_run = [], [], [], {}
    for uid in uids:
        run, stream, config = primary_stream(client, uid, catalog_uri)
        keys = stream.descriptor["data_keys"]
        if pattern is None:
            cands = [k for k, dk in keys.items() if len(dk.get("shape") or []) == 1
                     and any(c.endswith("two_theta") for c in config)]
            if len(cands) != 1:
                raise ValueError(f"run {uid}: pass --pattern KEY (1D data keys: {cands})")
            key = cands[0]
        elif pattern not in keys:
            raise ValueError(f"run {uid}: no data key {pattern!r} in 'primary' (it has: "
                             f"{sorted(keys)})")
        else:
            key = pattern
        obj = keys[key].get("object_name", "")
        tt = config.get(f"{obj}_two_theta", next(
            (v for k, v in config.items() if k.endswith("two_theta")), None))
        wl = config.get(f"{obj}_wavelength", next(
            (v for k, v in config.items() if k.endswith("wavelength")), None))
        if tt is None or wl is None:
            raise ValueError(f"run {uid}: no 2θ axis or wavelength in the configuration of "
                             f"{key!r}")
        if abs(float(wl) - wavelength) > 1e-4:
            raise ValueError(f"run {uid}: measured at λ = {float(wl)} Å, the model is for "
                             f"{wavelength} Å")
        frac_keys = {p: f"{p}_fraction" for p in phases if f"{p}_fraction" in keys}
        data: dict[str, list] = {k: [] for k in [key, *frac_keys.values()]}
        for _, chunk, _ in stream.chunks(256):
            for k in data:
                data[k].extend(chunk.get(k, []))
        y = np.asarray(data[key], float)
        y = y.reshape(len(y), -1)
        if not len(y):
            raise ValueError(f"run {uid}: no patterns in 'primary'")
        y = helper.resample(np.clip(y, 0, None), np.asarray(tt, float))
        start_labels = labels_from_start(run.start, phases, uid)
        if frac_keys:
            w = np.stack([np.asarray(data[frac_keys[p]], float) if p in frac_keys
                          else np.zeros(len(y)) for p in phases], axis=1)
            f = w / np.clip(w.sum(axis=1, keepdims=True), 1e-12, None)
            pres = (f > 0).astype(float)
        elif start_labels is not None:
            f = np.tile(start_labels[0], (len(y), 1))
            pres = np.tile(start_labels[1], (len(y), 1))
        else:
            raise ValueError(f"run {uid}: no labels: record the sample's phases in the start "
                             f"document (RE(plan, sample={{'phases': {{'CeO2': 1.0}}}})) or "
                             f"<phase>_fraction data keys")
        ys.append(y)
        fs.append(f)
        ps.append(pres)
        per_run[uid] = int(len(y))
        log(f"run {uid[:8]}: {len(y)} patterns of {key!r}, phases "
            + ", ".join(p for p, v in zip(phases, pres[0]) if v > 0))
    return {"patterns": np.concatenate(ys), "fraction": np.concatenate(fs),
            "present": np.concatenate(ps), "uids": list(uids), "counts": per_run,
            "catalog": catalog_uri.split("?")[0]}


def phase_share(ensemble: pq.PQNetEnsemble, patterns: np.ndarray) -> np.ndarray:
    """The ensemble's estimate (N,) of the share of the counts in the model's phases."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(patterns), 256):
            x, logc = pq.prepare(patterns[start:start + 256])
            o, _ = ensemble(x, logc)
            share = ((o[..., 0, 0] + 2) / 4).clamp_min(0).mean(dim=0)  # (n, P)
            out.append(share.sum(dim=1).clamp(0.05, 1.0).double().numpy())
    return np.concatenate(out)


def finetune_runs(ensemble: pq.PQNetEnsemble, sim, targets: pq.Targets, ranges, data: dict,
                  *, steps: int = 300, batch: int = 128, lr: float = 4e-4, seed: int = 2,
                  log=print, progress: bool = True) -> dict:
    """Fine-tune on the labelled patterns of ``runs_dataset`` (see the module doc)."""
    patterns = np.asarray(data["patterns"], float)
    fraction, present = np.asarray(data["fraction"]), np.asarray(data["present"])
    ensemble.eval()
    total_share = phase_share(ensemble, patterns)
    n_out, p = targets.n_out, len(sim.names)

    def extra(rng, n):
        n = max(1, n // 2)
        i = rng.integers(0, len(patterns), n)
        keep = np.exp(rng.uniform(np.log(0.1), 0.0, n))  # share of the counts kept
        counts = rng.binomial(np.round(patterns[i]).astype(np.int64),
                              keep[:, None]).astype(np.float32)
        y = np.zeros((n, p, n_out), np.float32)
        m = np.zeros((n, p, n_out), np.float32)
        f = fraction[i]
        known = np.isfinite(f)
        y[..., 0] = np.where(known, f * total_share[i, None], 0.0) * 4 - 2
        m[..., 0] = known
        pres = present[i].astype(np.float32)
        pmask = np.ones_like(pres)
        if known.any():  # a phase labelled present below MIN_PRESENT: no presence target
            low = known & (f > 0) & (f < MIN_PRESENT)
            pmask[low] = 0.0
        x, logc = pq.prepare(counts)
        return [x, logc, torch.from_numpy(y), torch.from_numpy(m), torch.from_numpy(pres),
                torch.from_numpy(pmask)]

    hist = train_ensemble(ensemble, sim, targets, ranges, steps=steps, batch=batch,
                          pool=max(batch * 8, 1024), lr=lr, seed=seed, reuse=1, log=log,
                          progress=progress, extra=extra)
    return {"runs": data["uids"], "catalog": data.get("catalog"), "patterns": data["counts"],
            "steps": steps, "history": hist}

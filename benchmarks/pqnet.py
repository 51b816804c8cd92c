"""PQ-Net against the least-squares full-profile fit on held-out simulated patterns, a
100 × 100-voxel XRD-CT image end to end, and a measured pattern.

    .venv/bin/python benchmarks/pqnet.py [--n 2000] [--fit-n 300] [--threads 2]
                                         [--figure docs/images/pqnet-xrdct.png]
    .venv/bin/python benchmarks/pqnet.py --weights pqnet-oxides --fit-n 100 \
        --measured ../shared/data/ceo2_pilatus1m/CeO2_Pilatus1M.xy=CeO2 \
        [--refine-n 500] [--calibrate-refinement 400 --save-card] [--refined-figure F.png]

Held-out patterns are drawn from the model card's ranges, with its instrument and the
instrument/sample effects it was trained with (zero shift, displacement, intensity
fall-off and texture, amorphous humps, impurity phases outside the model). Presence
precision/recall: a phase counts as present above 5 % of the fraction (phases present
below that are left out), predicted present at probability ≥ 0.5.
``--measured FILE=PHASE``: a measured single-phase pattern (two columns), resampled onto
the model's grid: every phase's fraction and presence, the phase's lattice parameter,
and how much of the pattern the prediction leaves unexplained.

``--refine-n``: the first N held-out patterns also go through the network-initialised
full-profile refinement (``PQNetPredictor.refine``), printed beside the network alone on
the same patterns, with its time per pattern; ``--calibrate-refinement N`` first scales
its uncertainties on N other held-out patterns (``--save-card`` writes them into the
model's card).

Held-out patterns are simulated with the exact (every peak evaluated) path from a fixed
seed, drawn from the model card's ranges. Fraction MAE over every phase of every pattern;
lattice MAE (Å), size MAPE and ±2σ coverage over phases with fraction ≥ 0.1. The fit runs
on the first ``--fit-n`` of the patterns (it takes ~0.1-0.3 s each); PQ-Net's figures are
printed on the same subset too. Times per pattern are measured in this run, one after
the other, with the same torch/BLAS threads.
"""

from __future__ import annotations

import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="held-out patterns")
    ap.add_argument("--fit-n", type=int, default=300, help="patterns fitted by least squares")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None, help="model (default: shipped pqnet-demo)")
    ap.add_argument("--voxels", type=int, default=100, help="XRD-CT image side")
    ap.add_argument("--figure", default=None, help="save the XRD-CT maps as this PNG")
    ap.add_argument("--measured", action="append", default=[],
                    help="FILE=PHASE: a measured single-phase pattern (repeatable)")
    ap.add_argument("--refine-n", type=int, default=300,
                    help="patterns also refined (PQ-Net start + full-profile refinement)")
    ap.add_argument("--calibrate-refinement", type=int, default=0, metavar="N",
                    help="first calibrate the refinement's uncertainties on N other held-out "
                         "patterns; with --save-card written into the model card")
    ap.add_argument("--refined-figure", default=None,
                    help="save the refined fit of the (first) --measured pattern as this PNG")
    ap.add_argument("--save-card", action="store_true",
                    help="write the refinement calibration into the model's card (.json)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from bluesky_xrdml.analysis.profile_fit import ProfileFit
    from bluesky_xrdml.models import pqnet
    from bluesky_xrdml.simulation.powder import Ranges
    from bluesky_xrdml.training.pqnet import (
        evaluate,
        predictions,
        presence_metrics,
        truth_arrays,
    )

    model = pqnet.load(args.weights)  # a path, or a shipped name (pqnet-demo, pqnet-oxides)
    ranges = Ranges.from_dict(model.card["ranges"])
    sim = model.simulator  # the card's phases (peak lists) and instrument
    tr = model.card.get("training", {})
    print(f"model {model.name} sha256 {model.card['sha256'][:12]}…, {len(model.phases)} phases, "
          f"{model.card['members']} members, {model.two_theta.size} points; trained "
          f"{tr.get('steps')} steps in "
          f"{(tr.get('minutes') or 0) + (tr.get('minutes_before') or 0):.1f} min on "
          f"{tr.get('threads')} "
          f"thread(s); torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"instrument: {model.card.get('instrument', 'constant FWHM')}; effects "
          f"{'on' if ranges.effects else 'off'}")
    if args.calibrate_refinement:
        from bluesky_xrdml.training.pqnet import calibrate_refinement

        t = time.perf_counter()
        calib = sim.sample(args.calibrate_refinement, np.random.default_rng(args.seed + 1),
                           ranges, exact=True)
        entry = calibrate_refinement(model, sim, calib)
        print(f"refinement uncertainties calibrated on {args.calibrate_refinement} other "
              f"held-out patterns (seed {args.seed + 1}) in {time.perf_counter() - t:.0f} s: "
              + ", ".join(f"{k} ×{v:.2f}" for k, v in entry["std_scale"].items()))
        if args.save_card:
            save_refinement_card(args.weights, entry)
    for i, spec in enumerate(args.measured):
        measured(model, spec, args.refined_figure if i == 0 else None)
    t = time.perf_counter()
    test = sim.sample(args.n, np.random.default_rng(args.seed), ranges, exact=True)
    print(f"{args.n} held-out patterns (seed {args.seed}, exact simulator) in "
          f"{time.perf_counter() - t:.1f} s")
    truth = truth_arrays(sim, test)

    model.predict(test.counts[:256])  # warm-up
    t = time.perf_counter()
    ds = model.predict(test.counts)
    t_net = (time.perf_counter() - t) / args.n
    net = evaluate(predictions(ds), truth, test.fraction, test.present)

    k = min(args.fit_n, args.n)
    fit = ProfileFit(sim)
    t = time.perf_counter()
    ds_fit = fit.predict(test.counts[:k])
    t_fit = (time.perf_counter() - t) / k
    sub = {key: v[:k] for key, v in truth.items()}
    fit_m = evaluate(predictions(ds_fit), sub, test.fraction[:k], test.present[:k])
    net_sub = evaluate({key: (m[:k], s[:k]) for key, (m, s) in predictions(ds).items()}, sub,
                       test.fraction[:k], test.present[:k])

    def row(label, m, n):
        c = m["coverage_2sigma"]
        print(f"{label:28s} {n:6d} {m['fraction_mae']:10.4f} {m['lattice_mae_A']:11.5f} "
              f"{m['size_mape_pct']:9.2f} {c['fraction']:7.3f} {c['lattice']:7.3f} "
              f"{c['size_nm']:7.3f} {c['all']:7.3f}")

    print()
    print(f"{'':28s} {'N':>6s} {'frac MAE':>10s} {'latt MAE Å':>11s} {'size MAPE':>9s} "
          f"{'cov f':>7s} {'cov a':>7s} {'cov L':>7s} {'cov all':>7s}")
    row("PQ-Net (all held-out)", net, args.n)
    row(f"PQ-Net (first {k})", net_sub, k)
    row(f"least-squares fit (first {k})", fit_m, k)
    r = min(args.refine_n, args.n)
    if r:
        t = time.perf_counter()
        ds_ref = model.refine(test.counts[:r], ds.isel(pattern=slice(0, r)))
        t_ref = (time.perf_counter() - t) / r
        sub = {key: v[:r] for key, v in truth.items()}
        net_r = evaluate({key: (m[:r], s[:r]) for key, (m, s) in predictions(ds).items()}, sub,
                         test.fraction[:r], test.present[:r])
        ref_m = evaluate(predictions(ds_ref), sub, test.fraction[:r], test.present[:r])
        row(f"PQ-Net (first {r})", net_r, r)
        row(f"PQ-Net + refinement ({r})", ref_m, r)
    print("(lattice, size and coverage: phases with fraction >= 0.1; targets: fraction MAE "
          "<= 0.02, lattice MAE <= 0.002 Å, size MAPE <= 10 %, coverage 0.90-0.98)")
    print()
    print(f"time per pattern: PQ-Net ensemble {t_net * 1e3:.3f} ms "
          f"({1 / t_net:.0f} patterns/s), least-squares fit {t_fit * 1e3:.1f} ms; "
          f"PQ-Net is {t_fit / t_net:.0f}× faster (target >= 200×)"
          + (f"; PQ-Net + refinement {t_ref * 1e3:.0f} ms" if r else "")
          + f"; load average {os.getloadavg()[0]:.2f}")
    if "presence" in ds:
        pm = presence_metrics(ds["presence"].values, test.fraction, test.present)
        imp = test.impurity if test.impurity is not None else np.zeros(args.n)
        with_imp = imp > 0.05
        pm_imp = presence_metrics(ds["presence"].values[with_imp], test.fraction[with_imp],
                                  test.present[with_imp]) if with_imp.any() else None
        print(f"presence (> 5 % of the fraction, p >= 0.5): precision {pm['precision']:.3f}, "
              f"recall {pm['recall']:.3f} (all {args.n}); "
              + (f"with > 5 % of the counts from impurity phases ({int(with_imp.sum())}): "
                 f"precision {pm_imp['precision']:.3f}, recall {pm_imp['recall']:.3f}"
                 if pm_imp else ""))
    if not set(model.phases) <= {"Ni", "NiO", "CeO2", "Pd"}:
        return  # the XRD-CT phantom is made of the demo phases

    # --- XRD-CT: 100 × 100 voxels end to end (FBP of every channel + quantification) -------
    from skimage.transform import radon

    from bluesky_xrdml.callbacks.phases import PhaseQuantification
    from bluesky_xrdml.simulation import demo_phantom

    n = args.voxels
    ph = demo_phantom(n=n)
    angles = np.arange(n) * 180.0 / n
    step = ph.pixel
    unit = np.vstack([sim.phase_pattern(p, ph.lattice[p], ph.size_nm[p])[0]
                      for p in model.phases])  # (P, M)
    lines = np.stack([radon(ph.fractions[p], angles, circle=True).T * step
                      for p in model.phases], axis=-1)  # (angles, translations, P) in mm
    expected = 2e5 * lines.reshape(-1, len(model.phases)) @ unit * sim.step + 40.0
    sino = np.random.default_rng(7).poisson(expected).astype(np.float32)
    sino = sino.reshape(n, n, -1)
    analysis = PhaseQuantification(model=model)  # quantifies every voxel
    t = time.perf_counter()
    images, side = analysis.quantify_sinogram(sino, angles, step)
    t_ct = time.perf_counter() - t
    corr = []
    total = sum(ph.fractions.values())
    for p in model.phases:
        truth_map = np.where(total > 0, ph.fractions[p] / np.where(total > 0, total, 1), 0)
        img = np.nan_to_num(images[f"{p}_fraction"], nan=0.0)  # NaN: no phase there
        corr.append(f"{p} {np.corrcoef(img.ravel(), truth_map.ravel())[0, 1]:.3f}")
    print(f"XRD-CT {n}×{n} voxels ({n} angles × {n} translations × {sim.two_theta.size} "
          f"channels): FBP of every channel (rank {analysis.rank}) + PQ-Net on all "
          f"{side * side} voxels in {t_ct:.2f} s (target <= 10 s); "
          f"{int(np.isfinite(images[model.phases[0] + '_fraction']).sum())} voxels hold a "
          f"phase; fraction maps vs phantom r (all voxels): "
          f"{', '.join(corr)}")
    if args.figure:
        save_figure(images, model.phases, args.figure, ph)
        print(f"saved {args.figure}")


def measured(model, spec: str, figure: str | None = None):
    """One measured single-phase pattern through the model (see the module doc)."""

    from bluesky_xrdml.analysis.calibrate import read_xy

    path, _, phase = spec.rpartition("=")
    x, y = read_xy(path)
    ds = model.predict(y, two_theta=x)
    ex = model.explain(y, ds=ds, two_theta=x)
    j = model.phases.index(phase)
    frac = ds["fraction"].values[0]
    others = max(f for i, f in enumerate(frac) if i != j)
    print(f"measured {path} ({phase}; {x.size} points {x[0]:.3g}-{x[-1]:.3g}°, resampled to "
          f"the model's {model.two_theta.size}):")
    print("  fraction   " + "  ".join(f"{p} {f:.4f}" for p, f in zip(model.phases, frac)))
    if "presence" in ds:
        print("  presence   " + "  ".join(f"{p} {v:.3f}" for p, v in
                                          zip(model.phases, ds["presence"].values[0])))
    a, sa = ds["lattice_a"].values[0, j], ds["lattice_a_std"].values[0, j]
    print(f"  {phase}: fraction {frac[j]:.4f} (target >= 0.95), largest other "
          f"{others:.4f} (target < 0.03), a = {a:.5f} ± {sa:.5f} Å, size "
          f"{ds['size_nm'].values[0, j]:.0f} nm; Rwp {ex['rwp'][0]:.3f}, unexplained "
          f"{ex['unexplained'][0]:.3f}{' (flagged)' if ex['poor'][0] else ''}")
    if phase == "CeO2":
        print(f"  lattice vs the calibrant's certified 5.4116 Å: {a - 5.4116:+.5f} Å "
              "(target within ±0.002)")
    dr = model.refine(y, ds=ds, two_theta=x)
    fr = dr["fraction"].values[0]
    ar, sr = dr["lattice_a"].values[0, j], dr["lattice_a_std"].values[0, j]
    print(f"  refined: fraction {fr[j]:.4f}, largest other "
          f"{max(f for i, f in enumerate(fr) if i != j):.4f}, a = {ar:.5f} ± {sr:.5f} Å, "
          f"size {dr['size_nm'].values[0, j]:.0f} nm, zero shift "
          f"{dr['zero_shift'].values[0]:+.4f}°, Rwp {dr['rwp_refined'].values[0]:.3f}"
          + (f"; vs 5.4116 Å: {ar - 5.4116:+.5f} Å" if phase == "CeO2" else ""))
    if figure:
        save_fit_figure(model, y, x, ds, dr, phase, figure)
        print(f"  saved {figure}")
    return ds, ex


def save_fit_figure(model, y, x, ds, dr, phase, path):
    """Measured pattern, the pattern the network's estimate implies (``explain``: its own
    background), the refined fit, and the residuals of both (on the model's grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tt = model.two_theta
    net = model.explain(y, ds=ds, two_theta=x)
    ref = model.refine(y, ds=ds, two_theta=x, implied=True)
    meas = model.resample(y, x)[0]
    fit = ref["implied_refined"].values[0]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=[3, 2],
                               constrained_layout=True)
    a.plot(tt, meas, "k.", ms=2, label="measured")
    a.plot(tt, net["implied"][0], lw=0.8, label=f"PQ-Net (Rwp {net['rwp'][0]:.3f})")
    a.plot(tt, fit, lw=0.8, label=f"+ refinement (Rwp {ref['rwp_refined'].values[0]:.3f})")
    a.set_yscale("log")
    a.set_ylabel("counts")
    a.legend(fontsize=8)
    j = model.phases.index(phase)
    a.set_title(f"{phase}: a = {ds['lattice_a'].values[0, j]:.5f} Å (network), "
                f"{dr['lattice_a'].values[0, j]:.5f} ± {dr['lattice_a_std'].values[0, j]:.5f} Å "
                "(refined)", fontsize=9)
    b.plot(tt, net["residual"][0], lw=0.6, label="measured − PQ-Net")
    b.plot(tt, meas - fit, lw=0.6, label="measured − refined")
    b.set_xlabel("2θ (°)")
    b.set_ylabel("residual (counts)")
    b.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_refinement_card(weights, entry):
    """Write the refinement calibration into the card beside the model's weights."""
    import json
    from pathlib import Path

    from bluesky_xrdml.models import pqnet
    from bluesky_xrdml.models import weights as weights_io

    path = Path(weights or pqnet.SHIPPED)
    if not path.exists():
        path = weights_io.WEIGHTS_DIR / f"{path.stem}.safetensors"
    path = path.with_suffix(".json")
    if not path.exists():
        raise SystemExit(f"--save-card: no card at {path}")
    card = json.loads(path.read_text())
    card["refinement"] = entry
    path.write_text(json.dumps(card, indent=2, sort_keys=True))
    print(f"wrote the refinement calibration into {path}")


def save_figure(images, phases, path, phantom):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    params = [("fraction", "fraction", (0, 1)), ("fraction_std", "fraction std", None),
              ("lattice_a", "a (Å)", None), ("size_nm", "size (nm)", None)]
    fig, axes = plt.subplots(len(params), len(phases), figsize=(2.6 * len(phases), 9),
                             constrained_layout=True)
    for j, p in enumerate(phases):
        frac = images[f"{p}_fraction"]
        for i, (key, label, lim) in enumerate(params):
            img = np.array(images[f"{p}_{key}"], float)
            if key != "fraction":
                img[~(frac >= 0.3)] = np.nan  # parameters only where the phase is
            kw = {"vmin": lim[0], "vmax": lim[1]} if lim else {}
            im = axes[i, j].imshow(img, origin="lower", cmap="viridis", **kw)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            fig.colorbar(im, ax=axes[i, j], shrink=0.8)
            if i == 0:
                axes[i, j].set_title(f"{p}")
            if j == 0:
                axes[i, j].set_ylabel(label)
    fig.suptitle("PQ-Net on a simulated XRD-CT scan (every voxel; phantom "
                 + ", ".join(f"{p} a={phantom.lattice[p]} Å, {phantom.size_nm[p]:.0f} nm"
                             for p in phases) + ")", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()

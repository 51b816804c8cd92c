"""How good a PQ-Net gets in a fixed training time, for the issue's case: 7 phases (CeO2,
NiO, ZnO, TiO2, Al2O3, Ni, Pd), Cu Kα1/Kα2, 2θ 10-100° in 4501 points, instrument and
sample effects on; then the network alone and network + refinement on held-out patterns.

    nice -n 10 .venv/bin/python benchmarks/pqnet_train.py --minutes 15 --threads 1 \
        [--members 3] [--reuse 3] [--validation 300] [--n 300] [--refine-n 100] \
        [--out /tmp/pqnet7.safetensors]

``--minutes`` is the whole budget of ``train`` (simulation, optimisation, calibration and
validation on ``--validation`` exact patterns): the optimiser gets what the validation
leaves (its cost is measured on a few patterns first). Prints the steps reached, the wall
time, the load average, and fraction MAE, lattice MAE, size MAPE, ±2σ coverage and
presence precision/recall of both on ``--n`` held-out exact patterns (seed 2024; the
refinement on the first ``--refine-n``).
"""

from __future__ import annotations

import argparse
import os
import time

PHASES = ["CeO2", "NiO", "ZnO", "TiO2", "Al2O3", "Ni", "Pd"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="whole training budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--reuse", type=int, default=2, help="passes over each simulated pool")
    ap.add_argument("--pool", type=int, default=4096)
    ap.add_argument("--validation", type=int, default=300)
    ap.add_argument("--n", type=int, default=300, help="held-out patterns for the figures")
    ap.add_argument("--refine-n", type=int, default=100)
    ap.add_argument("--calibrate-refinement", type=int, default=100, metavar="N",
                    help="calibrate the refinement's uncertainties on N other patterns first")
    ap.add_argument("--out", default="/tmp/pqnet7.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evaluate-only", action="store_true",
                    help="no training: evaluate the model already at --out")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from bluesky_xrdml.models import pqnet
    from bluesky_xrdml.simulation.instrument import Instrument
    from bluesky_xrdml.simulation.powder import PowderSimulator, Ranges
    from bluesky_xrdml.training import pqnet as training

    phases = training.load_phases(None, False, PHASES)
    inst = Instrument.lab("Cu", W=0.06**2)
    tt = (10.0, 100.0, 4501)
    ranges = Ranges.measured()
    if args.evaluate_only:
        card = pqnet.load(args.out).card
        print(f"evaluating {args.out}: {card['members']} members, trained "
              f"{card['training']['steps']} steps in {card['training']['minutes']} min on "
              f"{card['training']['threads']} thread(s); load average "
              f"{os.getloadavg()[0]:.2f}")
    else:
        # the validation's cost (two sets of exact patterns + predictions): measured, then
        # taken off the optimiser's budget so that the whole run fits in --minutes
        sim = PowderSimulator(phases, inst.wavelength, np.linspace(*tt), instrument=inst)
        t = time.perf_counter()
        sim.sample(16, np.random.default_rng(0), ranges, exact=True)
        per = (time.perf_counter() - t) / 16
        reserve = (2 * args.validation * per * 1.3 + 20) / 60
        print(f"{len(PHASES)} phases, Cu Kα1/Kα2, 2θ {tt}; {args.members} members, pool "
              f"{args.pool} × {args.reuse} passes; {args.threads} thread(s); budget "
              f"{args.minutes} min of which ~{reserve:.1f} min for {2 * args.validation} "
              f"exact validation patterns; load average {os.getloadavg()[0]:.2f}", flush=True)
        train_and_report(args, training, phases, inst, tt, ranges, args.minutes - reserve,
                         time.perf_counter())
    evaluate(args, np, pqnet, training)


def train_and_report(args, training, phases, inst, tt, ranges, train_minutes, t0):
    card = training.train(phases, args.out, wavelength=inst.wavelength, two_theta=tt,
                          instrument=inst, ranges=ranges, members=args.members, steps=3000,
                          reuse=args.reuse, pool=args.pool, minutes=train_minutes,
                          seed=args.seed, n_validation=args.validation, progress=True,
                          log=lambda *a: print(*a, flush=True))
    wall = (time.perf_counter() - t0) / 60
    print(f"trained {card['training']['steps']} steps; whole run {wall:.1f} min (target <= 15); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)


def evaluate(args, np, pqnet, training):

    from bluesky_xrdml.simulation.powder import Ranges

    model = pqnet.load(args.out)
    ranges = Ranges.from_dict(model.card["ranges"])  # what the model was trained with
    print(f"held-out effects: {ranges.as_dict()}")
    if args.calibrate_refinement:
        t = time.perf_counter()
        calib = model.simulator.sample(args.calibrate_refinement, np.random.default_rng(7),
                                       ranges, exact=True)
        entry = training.calibrate_refinement(model, model.simulator, calib)
        print(f"refinement calibrated on {args.calibrate_refinement} patterns in "
              f"{(time.perf_counter() - t) / 60:.1f} min: "
              + ", ".join(f"{k} ×{v:.2f}" for k, v in entry["std_scale"].items()), flush=True)
    test = model.simulator.sample(args.n, np.random.default_rng(2024), ranges, exact=True)
    truth = training.truth_arrays(model.simulator, test)
    ds = model.predict(test.counts)
    r = min(args.refine_n, args.n)
    t = time.perf_counter()
    dr = model.refine(test.counts[:r], ds.isel(pattern=slice(0, r)))
    t_ref = (time.perf_counter() - t) / max(r, 1)

    def row(label, d, k):
        m = training.evaluate(training.predictions(d), {key: v[:k] for key, v in truth.items()},
                              test.fraction[:k], test.present[:k])
        pm = training.presence_metrics(d["presence"].values, test.fraction[:k],
                                       test.present[:k])
        c = m["coverage_2sigma"]
        print(f"{label:30s} {k:5d} {m['fraction_mae']:9.4f} {m['lattice_mae_A']:10.5f} "
              f"{m['size_mape_pct']:9.2f} {c['all']:8.3f} {pm['precision']:6.3f} "
              f"{pm['recall']:6.3f}")

    print(f"{'':30s} {'N':>5s} {'frac MAE':>9s} {'latt MAE':>10s} {'size MAPE':>9s} "
          f"{'cov 2σ':>8s} {'prec':>6s} {'recall':>6s}")
    row("PQ-Net", ds, args.n)
    row(f"PQ-Net (first {r})", ds.isel(pattern=slice(0, r)), r)
    row(f"PQ-Net + refinement (first {r})", dr, r)
    print(f"refinement {t_ref:.2f} s a pattern; load average {os.getloadavg()[0]:.2f}")
    print("(targets: fraction MAE <= 0.02, lattice MAE <= 0.002 Å, size MAPE <= 10 %, "
          "coverage 0.90-0.98)")


if __name__ == "__main__":
    main()

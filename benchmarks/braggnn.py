"""BraggNN vs the pseudo-Voigt fit vs the centroid: accuracy against the TRUE centres, speed,
and the whole frame pipeline.

1. Accuracy on a held-out simulated set (fixed seed, not used in training): error
   |estimate - truth| (px) percentiles 50/75/95/99, overall, per SNR tertile of the isolated
   peaks, and per hard case (neighbour in the patch, non-pseudo-Voigt shape, edge, sparse).
2. Speed on this CPU: peaks/s at batch 1, 64, 1024, 8192 for one reference-architecture
   network (eager and channels-last) and for the shipped ensemble's ``predict``; the fit and
   the centroid; the ratio BraggNN / fit measured in the same run.
3. Frames/s of the frame pipeline (find, patches, BraggNN, multi-peak and fallback fits) on
   2048×2048 frames with ~100 spots, frame by frame and batched as the callback does it.

    .venv/bin/python benchmarks/braggnn.py [--n 20000] [--fit-n 20000] [--threads 2]
    .venv/bin/python benchmarks/braggnn.py --figure docs/images/braggnn-peaks.png
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bluesky_xrdml.analysis.fitting import fit_patches
from bluesky_xrdml.analysis.peaks import centre_peaks, centroid, prepare
from bluesky_xrdml.models import load_model
from bluesky_xrdml.models.braggnn import BraggNN, flops_per_patch, scale_patches
from bluesky_xrdml.simulation import SpotSimulator
from bluesky_xrdml.training.patches import simulate_patches

SEED = 20240521  # the held-out set: training uses seeds [seed, epoch] and [seed, 1e7]


def pct(err) -> str:
    if len(err) == 0:
        return "   (none)"
    p = np.percentile(err, [50, 75, 95, 99])
    return "  ".join(f"{v:6.3f}" for v in p) + f"   n={len(err)}"


def rate(fn, n_items: int, min_s: float = 1.0) -> float:
    fn()  # warm up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        done += n_items
    return done / (time.perf_counter() - t0)


def accuracy(model, n: int, fit_n: int):
    sim = simulate_patches(n, seed=SEED)
    patches, truth, kind, snr = sim["patches"], sim["centre"], sim["kind"], sim["snr"]
    est = {}
    t0 = time.perf_counter()
    est["BraggNN"] = model.predict(patches)
    t_nn = time.perf_counter() - t0
    est["centroid"] = centroid(patches.astype(float))[0]
    fit_idx = np.arange(min(fit_n, n))
    t0 = time.perf_counter()
    fit_c, _, fit_ok = fit_patches(patches[fit_idx])
    t_fit = time.perf_counter() - t0
    print(f"held-out set: {n} simulated patches (seed {SEED}); fit on the first {len(fit_idx)} "
          f"({t_fit:.0f} s; {100 * (1 - fit_ok.mean()):.1f} % did not converge, kept as they "
          f"are); BraggNN {t_nn:.1f} s for all")
    errs = {k: np.hypot(*(v - truth).T) for k, v in est.items()}
    fit_err = np.full(n, np.nan)
    fit_err[fit_idx] = np.hypot(*(fit_c - truth[fit_idx]).T)
    errs["pseudo-Voigt fit"] = fit_err
    has_fit = ~np.isnan(fit_err)

    def block(title, mask):
        print(f"\n{title}  (error vs truth, px: p50 p75 p95 p99)")
        for name, e in errs.items():
            m = mask & has_fit if name == "pseudo-Voigt fit" else mask
            print(f"  {name:17s} {pct(e[m])}")

    everything = np.ones(n, bool)
    block("all patches (every kind)", everything)
    iso = kind == "isolated"
    lo, hi = np.quantile(snr[iso], [1 / 3, 2 / 3])
    for label, m in (("low", snr < lo), ("mid", (snr >= lo) & (snr < hi)), ("high", snr >= hi)):
        rng = f"SNR {snr[iso & m].min():.1f}-{snr[iso & m].max():.1f}"
        block(f"isolated, {label} SNR tertile ({rng})", iso & m)
    for k, title in (("neighbour", "neighbour peak partly inside the patch"),
                     ("irregular", "non-pseudo-Voigt shape (two close sub-peaks)"),
                     ("edge", "edge: padded rows/columns"),
                     ("sparse", "sparse frame cache (below-threshold pixels zeroed)")):
        block(f"hard case: {title}", kind == k)
    # uncertainty: how often does the calibrated std cover the error?
    _, std = model.predict(patches, return_std=True)
    z = (est["BraggNN"] - truth) / np.maximum(std, 1e-9)
    print(f"\nBraggNN std calibration: fraction of |error| within 1 std "
          f"{np.mean(np.abs(z) < 1):.2f} (0.68 for a Gaussian), within 2 std "
          f"{np.mean(np.abs(z) < 2):.2f}; flagged uncertain (std > {model.uncertain_px:.3f} px)"
          f" {np.mean(std.max(axis=1) > model.uncertain_px):.3f}")
    return patches


def speed(model, patches, threads=(2,)):
    for t in threads:
        torch.set_num_threads(t)
        _speed(model, patches)


def _speed(model, patches):
    print("\nspeed on this CPU (peaks/s), torch threads", torch.get_num_threads())
    flop = flops_per_patch()
    net = BraggNN().eval()
    net.load_state_dict(model.ensemble.members[0].state_dict())
    net_cl = BraggNN().eval().to(memory_format=torch.channels_last)
    net_cl.load_state_dict(model.ensemble.members[0].state_dict())
    batches = (1, 64, 1024, 8192)
    rows = {}
    best = (0.0, "")
    for b in batches:
        p = np.resize(patches, (b, 11, 11))
        x = scale_patches(p)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            r_eager = rate(lambda: net(x), b)  # noqa: B023
            r_cl = rate(lambda: net_cl(x_cl), b)  # noqa: B023
        r_ens = rate(lambda: model.predict(p), b)  # noqa: B023
        r_cen = rate(lambda: centroid(p), b)  # noqa: B023
        rows[b] = (r_eager, r_cl, r_ens, r_cen)
        best = max(best, (r_eager, f"eager, batch {b}"), (r_cl, f"channels-last, batch {b}"))
    n_fit = 200
    t0 = time.perf_counter()
    fit_patches(patches[:n_fit])
    r_fit = n_fit / (time.perf_counter() - t0)
    print(f"  {'batch':>6s} {'1 net eager':>12s} {'1 net NHWC':>12s} "
          f"{'ensemble':>12s} {'centroid':>12s} {'fit':>10s}")
    for b, (a, c, e, ce) in rows.items():
        print(f"  {b:6d} {a:12,.0f} {c:12,.0f} {e:12,.0f} {ce:12,.0f} {r_fit:10,.0f}")
    members = len(model.ensemble.members)
    best_ens = max(r[2] for r in rows.values())
    print(f"  reference architecture (one network), best: {best[0]:,.0f} peaks/s ({best[1]}), "
          f"{best[0] * flop / 1e9:.0f} GFLOP/s at {flop / 1e6:.2f} MFLOP/patch")
    print(f"  shipped ensemble ({members} networks, scaling + std included), best: "
          f"{best_ens:,.0f} peaks/s")
    print(f"  pseudo-Voigt fit (scipy least_squares: LM, bounded trf where LM strays; one core): "
          f"{r_fit:,.0f} peaks/s")
    print(f"  ratio BraggNN / fit: {best[0] / r_fit:,.0f}x (one network), "
          f"{best_ens / r_fit:,.0f}x (ensemble)")


def frames(model, n_frames: int, density: float):
    sim = SpotSimulator(shape=(2048, 2048), density=density, seed=7)
    rng = np.random.default_rng(3)
    omegas = np.linspace(0.3, 9.3, n_frames)
    imgs = [sim.frame(w, rng) for w in omegas]
    spots = [len(sim.truth(w)) for w in omegas]
    print(f"\nframe pipeline: {n_frames} frames 2048x2048 uint16, {np.mean(spots):.0f} spots "
          f"per frame on average (SpotSimulator density {density})")
    centre_peaks([prepare(imgs[0])], "braggnn", model)  # warm up
    t_prep = t_centre = 0.0
    found = multi = unsure = 0
    for i, img in enumerate(imgs):
        t0 = time.perf_counter()
        fp = prepare(img, frame_index=i)
        t1 = time.perf_counter()
        (table,) = centre_peaks([fp], "braggnn", model)
        t_centre += time.perf_counter() - t1
        t_prep += t1 - t0
        found += len(table)
        multi += table["flag"].str.contains("multi").sum()
        unsure += table["flag"].str.contains("uncertain").sum()
    total = t_prep + t_centre
    print(f"  frame by frame: {n_frames / total:.1f} frames/s ({1000 * t_prep / n_frames:.0f} ms "
          f"find+patches, {1000 * t_centre / n_frames:.0f} ms centring per frame); "
          f"{found / n_frames:.0f} peaks/frame, {multi / n_frames:.1f} multi, "
          f"{unsure / n_frames:.1f} uncertain")
    t0 = time.perf_counter()
    centre_peaks([prepare(img, frame_index=i) for i, img in enumerate(imgs)], "braggnn", model)
    dt = time.perf_counter() - t0
    print(f"  batched over the {n_frames} frames (as the callback does): {n_frames / dt:.1f} "
          "frames/s")
    t0 = time.perf_counter()
    centre_peaks([prepare(img, frame_index=i) for i, img in enumerate(imgs)], "centroid")
    dt = time.perf_counter() - t0
    print(f"  same frames, centroid only: {n_frames / dt:.1f} frames/s")


def figure(model, path: str):
    """A simulated frame with the peaks found, and a crop with the three estimates + truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bluesky_xrdml.analysis import locate_peaks

    sim = SpotSimulator(seed=11)
    omega = 3.3
    frame = sim.frame(omega, np.random.default_rng(4))
    truth = sim.truth(omega)
    tables = {m: locate_peaks(frame, method=m, model=model)
              for m in ("braggnn", "pseudo-voigt", "centroid")}
    bn = tables["braggnn"]
    multi = bn[bn["flag"].str.contains("multi")]
    if len(multi):  # zoom where a pair shares a patch, else on the brightest peak
        r0, c0 = multi.iloc[0][["row", "col"]]
    else:
        r0, c0 = bn.sort_values("intensity").iloc[-1][["row", "col"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4.4), dpi=80)
    a.imshow(np.log1p(frame), cmap="gray")
    flagged = bn["flag"] != ""
    a.scatter(bn["col"][~flagged], bn["row"][~flagged], s=60, facecolors="none",
              edgecolors="cyan", lw=0.8, label="found")
    a.scatter(bn["col"][flagged], bn["row"][flagged], s=60, facecolors="none",
              edgecolors="orange", lw=0.8, label="found, flagged (edge/multi/uncertain)")
    a.add_patch(plt.Rectangle((c0 - 8, r0 - 8), 16, 16, fill=False, ec="yellow", lw=1))
    a.set_title(f"simulated frame, {len(bn)} peaks found", fontsize=9)
    a.legend(fontsize=7, loc="lower right")
    lo_r, lo_c = int(r0) - 8, int(c0) - 8
    crop = frame[max(lo_r, 0):lo_r + 17, max(lo_c, 0):lo_c + 17]
    b.imshow(crop, cmap="viridis", extent=(max(lo_c, 0) - 0.5, max(lo_c, 0) + crop.shape[1] - 0.5,
                                           max(lo_r, 0) + crop.shape[0] - 0.5, max(lo_r, 0) - 0.5))
    near = truth[(abs(truth["row"] - r0) < 8) & (abs(truth["col"] - c0) < 8)]
    b.scatter(near["col"], near["row"], marker="+", s=150, c="white", lw=1.5, label="truth")
    for (m, t), (mk, col) in zip(tables.items(), (("o", "red"), ("x", "black"), ("s", "cyan"))):
        t = t[(abs(t["row"] - r0) < 8) & (abs(t["col"] - c0) < 8)]
        b.scatter(t["col"], t["row"], marker=mk, s=40, facecolors="none" if mk != "x" else col,
                  edgecolors=col if mk != "x" else None, lw=1.2, label=m)
    b.set_title("crop: truth and the three estimates", fontsize=9)
    b.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    print(f"figure written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--fit-n", type=int, default=20_000)
    parser.add_argument("--threads", default="2",
                        help="torch threads; a list (1,2) repeats the speed table for each")
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--density", type=float, default=90.0)
    parser.add_argument("--figure", help="only write the docs figure (PNG) to this path")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    model = load_model("braggnn", device="cpu")
    if args.figure:
        figure(model, args.figure)
        return
    print(f"model: {model.provenance()}")
    patches = accuracy(model, args.n, args.fit_n)
    speed(model, patches, threads)
    torch.set_num_threads(threads[0])
    frames(model, args.frames, args.density)


if __name__ == "__main__":
    main()

"""BraggNN vs the pseudo-Voigt fit vs the centroid: accuracy, calibration, speed, frames.

Every figure of issue 11's targets, measured in one run (load average printed with each):

1. Simulated patches (held-out seed): error vs the TRUE centre (intensity centroid of the
   whole spot), per kind (compact = ``isolated``; streak, doublet/neighbour, edge, ...)
   for BraggNN (default: one lean network), the 11×11 pseudo-Voigt fit and the centroid;
   calibration of BraggNN's σ (fraction of errors within 1σ / 2σ).
2. Speed: ``load_model("braggnn").predict`` peaks/s (and the ensemble on request), the fit
   and the ratio, in the same run.
3. Frame pipeline on a simulated 2048² frame with ~200 spots (doublets and streaks):
   ``prepare`` + ``centre_peaks`` vs the classical pipeline (threshold →
   ``scipy.ndimage.label`` → ``find_objects`` → per-object centroid) on the same frames.
4. Real frames (the ruby frame caches in ``../shared/data/ruby_dexela``, if present):
   labels from whole-spot fits (``training.braggnn.label_spots``), recall and error of
   each ``locate_peaks`` method on single frames and on ω-summed images (4 frames = 1°),
   per-spot time real vs simulated, calibration on real spots.

    .venv/bin/python benchmarks/braggnn.py [--n 20000] [--fit-n 3000] [--threads 1]
        [--compact-n 40000] [--real-step 6] [--model PATH] [--sections sim,speed,frames,real]
        [--real-frames 720:] [--tuned PATH]
    .venv/bin/python benchmarks/braggnn.py --figure docs/images/braggnn-peaks.png
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bluesky_xrdml.analysis.fitting import fit_patches
from bluesky_xrdml.analysis.peaks import FramePeaks, centre_peaks, centroid, prepare, threshold
from bluesky_xrdml.models import load_model
from bluesky_xrdml.simulation import SpotSimulator
from bluesky_xrdml.training.braggnn import coverage, label_spots
from bluesky_xrdml.training.patches import bound_errors, centre_bound, simulate_patches

SEED = 20240521  # the held-out set: training uses seeds [seed, epoch] and [seed, 1e7]
RUBY = Path(__file__).resolve().parents[2] / "shared" / "data" / "ruby_dexela"
METHODS = ("braggnn", "centroid", "pseudo-voigt")


def load() -> str:
    return "load avg " + "/".join(f"{v:.1f}" for v in os.getloadavg())


def pct(err, q=(50, 75, 95)) -> str:
    if len(err) == 0:
        return "   (none)"
    return "  ".join(f"{v:6.3f}" for v in np.percentile(err, q)) + f"   n={len(err)}"


def rate(fn, n_items: int, min_s: float = 1.0) -> float:
    fn()  # warm up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        done += n_items
    return done / (time.perf_counter() - t0)


def simulated(model, n: int, fit_n: int, compact_n: int = 40000):
    sim = simulate_patches(n, seed=SEED)
    patches, truth, kind = sim["patches"], sim["centre"], sim["kind"]
    t0 = time.perf_counter()
    pred, std = model.predict(patches, return_std=True)
    t_nn = time.perf_counter() - t0
    est = {"BraggNN": pred, "centroid": centroid(patches.astype(float))[0]}
    fit_idx = np.arange(min(fit_n, n))
    t0 = time.perf_counter()
    fit_c, _, fit_ok = fit_patches(patches[fit_idx])
    t_fit = time.perf_counter() - t0
    print(f"\n== 1. simulated patches: {n} held out (seed {SEED}); 11×11 fit on the first "
          f"{len(fit_idx)} ({t_fit:.0f} s, {100 * (1 - fit_ok.mean()):.1f} % not converged); "
          f"BraggNN {t_nn:.2f} s for all; {load()}")
    errs = {k: np.hypot(*(v - truth).T) for k, v in est.items()}
    fit_err = np.full(n, np.nan)
    fit_err[fit_idx] = np.hypot(*(fit_c - truth[fit_idx]).T)
    errs["pseudo-Voigt fit"] = fit_err
    print(f"  {'kind':12s} {'method':17s} {'p50':>6s}  {'p75':>6s}  {'p95':>6s}")
    for k in ("all", "isolated", "streak", "neighbour", "edge", "irregular", "saturated",
              "gap", "sparse"):
        mask = np.ones(n, bool) if k == "all" else kind == k
        for name, e in errs.items():
            m = mask & ~np.isnan(e)
            label = {"isolated": "compact", "neighbour": "doublet/nbr"}.get(k, k)
            print(f"  {label:12s} {name:17s} {pct(e[m])}")
    # spots the peak finder can see: peak height >= 6 σ of the background (its threshold)
    seen = sim["height"] >= 6 * sim["noise"]
    label = "compact, seen"
    for name, e in errs.items():
        m = (kind == "isolated") & seen & ~np.isnan(e)
        print(f"  {label:12s} {name:17s} {pct(e[m])}")
    print(f"  ('compact, seen': the compact spots at least 6σ of the background high, which the "
          f"peak finder needs; {np.mean(seen[kind == 'isolated']):.1%} of the compact ones)")
    # the tail of the compact error: faint spots (height over σ of the background)
    iso = kind == "isolated"
    fitted = iso & ~np.isnan(errs["pseudo-Voigt fit"])
    sig = sim["height"] / sim["noise"]
    # the Cramér-Rao bound: what an efficient UNBIASED estimator would reach on these spots
    bound = np.full(n, np.nan)
    bound[iso] = bound_errors(centre_bound({k: v[iso] for k, v in sim["params"].items()}))
    print(f"  compact p75 / p95 by height / σ of the background (BraggNN all; its Cramér-Rao "
          f"bound, all spot parameters unknown; BraggNN and fit on the {fitted.sum()} fitted):")
    for lo, hi in ((0, 6), (6, 10), (10, 20), (20, 50), (50, 200), (200, np.inf)):
        b = (sig >= lo) & (sig < hi)
        big = np.mean(b[iso][errs["BraggNN"][iso] > np.percentile(errs["BraggNN"][iso], 95)])
        print(f"    {lo:>4}-{hi:<4} {b[iso].mean():5.1%} of them, {big:5.1%} of BraggNN's top 5 %:"
              f" {pct(errs['BraggNN'][iso & b], (75, 95))} | bound "
              f"{pct(bound[iso & b], (75, 95))} | fitted: BraggNN "
              f"{pct(errs['BraggNN'][fitted & b], (75, 95))}, fit "
              f"{pct(errs['pseudo-Voigt fit'][fitted & b], (75, 95))}")
    print(f"  compact, Cramér-Rao bound (unbiased, all parameters unknown): {pct(bound[iso])}")
    print(f"  compact, the {fitted.sum()} fitted: BraggNN {pct(errs['BraggNN'][fitted])}; fit "
          f"{pct(errs['pseudo-Voigt fit'][fitted])}")
    def target(err, extra=""):
        p75, p95 = np.percentile(err, [75, 95])
        return (f"p75 <= 0.10 / p95 <= 0.25 px: {p75:.3f} / {p95:.3f}{extra} "
                f"({'met' if p75 <= 0.10 and p95 <= 0.25 else 'NOT met'})")

    for what, m in (("compact", kind == "isolated"),
                    ("compact, seen", (kind == "isolated") & seen)):
        print(f"  target {what} {target(errs['BraggNN'][m])}")
    # the p95 of ~6 000 compact spots moves by ~0.006 px from one sample to the next: the
    # same figures on a larger set of compact spots only, with the bootstrap spread
    more = simulate_patches(compact_n, seed=SEED + 1, kinds=["isolated"])
    e = np.hypot(*(model.predict(more["patches"]) - more["centre"]).T)
    rng = np.random.default_rng(0)
    sd = np.std([np.percentile(rng.choice(e, e.size), 95) for _ in range(500)])
    b = bound_errors(centre_bound(more["params"]))
    print(f"  target compact, {compact_n} more compact spots (seed {SEED + 1}): "
          f"{target(e, f' ± {sd:.3f} (bootstrap sd)')}; their Cramér-Rao bound "
          f"{np.percentile(b, 75):.3f} / {np.percentile(b, 95):.3f}")
    cov = coverage(pred - truth, std)
    print(f"  calibration (simulated, per coordinate): within 1σ {cov['within_1sigma']:.3f} "
          f"(0.683 Gaussian), within 2σ {cov['within_2sigma']:.3f} (0.954)")
    return patches


def speed(model, ensemble, patches):
    print(f"\n== 2. speed, torch threads {torch.get_num_threads()} (peaks/s); {load()}")
    rows = {}
    for b in (64, 1024, 8192):
        p = np.resize(patches, (b, 11, 11))
        rows[b] = (rate(lambda: model.predict(p, return_std=True), b),  # noqa: B023
                   rate(lambda: ensemble.predict(p, return_std=True), b, 0.5),  # noqa: B023
                   rate(lambda: centroid(p), b))  # noqa: B023
    n_fit = 150
    t0 = time.perf_counter()
    fit_patches(patches[:n_fit])
    r_fit = n_fit / (time.perf_counter() - t0)
    print(f"  {'batch':>6s} {'default':>10s} {'ensemble':>10s} {'centroid':>10s} {'fit':>8s}")
    for b, (d, e, c) in rows.items():
        print(f"  {b:6d} {d:10,.0f} {e:10,.0f} {c:10,.0f} {r_fit:8,.0f}")
    best = max(r[0] for r in rows.values())
    members = len(model.ensemble.members)
    print(f"  default predict ({members} network, σ included), best: {best:,.0f} peaks/s = "
          f"{best / r_fit:,.0f}× the fit; target >= 40 k: {'met' if best >= 40e3 else 'NOT met'}"
          f"; {load()}")
    return best


def classical(frame):
    """threshold → scipy.ndimage.label → find_objects → per-object centroid."""
    thr = threshold(frame)
    lab, n = ndimage.label(frame > thr)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        w = np.where(lab[sl] == i, frame[sl], 0).astype(float)
        if (w > 0).sum() < 3:
            continue
        r, c = np.indices(w.shape)
        t = w.sum()
        out.append(((r * w).sum() / t + sl[0].start, (c * w).sum() / t + sl[1].start))
    return np.array(out).reshape(-1, 2)


def frames(model, n_frames: int, density: float):
    sim = SpotSimulator(shape=(2048, 2048), density=density, seed=7, streaks=0.25)
    rng = np.random.default_rng(3)
    omegas = np.linspace(0.3, 9.3, n_frames)
    imgs = [sim.frame(w, rng) for w in omegas]
    truths = [sim.truth(w) for w in omegas]
    n_spots = np.mean([len(t[t["height"] > 20]) for t in truths])
    print(f"\n== 3. frame pipeline: {n_frames} simulated 2048² uint16 frames, {n_spots:.0f} spots "
          f"per frame (~20 % in doublets, 25 % streaked); {load()}")
    classical(imgs[0])
    centre_peaks([prepare(imgs[0])], "braggnn", model)  # warm up
    t_cls = t_prep = t_centre = 0.0
    n_found = 0
    errs = []
    for i, img in enumerate(imgs):
        t0 = time.perf_counter()
        classical(img)
        t1 = time.perf_counter()
        fp = prepare(img, frame_index=i)
        t2 = time.perf_counter()
        (table,) = centre_peaks([fp], "braggnn", model)
        t3 = time.perf_counter()
        t_cls, t_prep, t_centre = t_cls + t1 - t0, t_prep + t2 - t1, t_centre + t3 - t2
        n_found += len(table)
        tr = truths[i][truths[i]["isolated"] & (truths[i]["height"] > 300)]
        d = np.hypot(tr["row"].to_numpy()[:, None] - table["row"].to_numpy()[None],
                     tr["col"].to_numpy()[:, None] - table["col"].to_numpy()[None])
        errs.append(d.min(axis=1) if d.size else np.zeros(0))
    ours = (t_prep + t_centre) / n_frames
    cls = t_cls / n_frames
    per_spot = t_centre / max(n_found, 1)
    print(f"  classical pipeline: {1000 * cls:.0f} ms/frame; ours (find + patches + BraggNN + "
          f"table): {1000 * ours:.0f} ms/frame ({1000 * t_prep / n_frames:.0f} + "
          f"{1000 * t_centre / n_frames:.0f}), {1 / ours:.1f} frames/s, {ours / cls:.2f}× the "
          f"classical; target <= 2×: {'met' if ours <= 2 * cls else 'NOT met'}; {load()}")
    print(f"  {n_found / n_frames:.0f} peaks/frame; centring {1e6 * per_spot:.0f} µs per spot; "
          f"isolated bright spots vs truth: {pct(np.concatenate(errs))}")
    t0 = time.perf_counter()
    fps = [prepare(img, frame_index=i) for i, img in enumerate(imgs)]
    t1 = time.perf_counter()
    centre_peaks(fps, "braggnn", model)
    t2 = time.perf_counter()
    print(f"  batched over the {n_frames} frames (as the callback does): "
          f"{n_frames / (t2 - t0):.1f} frames/s; centring {1e6 * (t2 - t1) / n_found:.0f} µs "
          "per spot")
    return fps


def ruby_frames(step: int, summed: int = 1, panels=("ff1", "ff2"), span=(0, None)):
    """Frames (uint16, dense) of the ruby panels, every ``step``-th (ω-summed over
    ``summed`` consecutive frames) of frames ``span[0]`` to ``span[1]`` (exclusive; ``None``:
    the last), with their panel and first frame index."""
    for path in sorted(RUBY.glob("*-cachefile.npz")):
        if path.name.split("_")[2] not in panels:
            continue
        z = np.load(path)
        shape, n = tuple(z["shape"]), int(z["nframes"])
        stop = n if span[1] is None else min(span[1], n)
        for i in range(span[0], stop - summed + 1, step * summed):
            f = np.zeros(shape, np.float64 if summed > 1 else np.uint16)
            for j in range(i, i + summed):
                np.add.at(f, (z[f"{j}_row"], z[f"{j}_col"]), z[f"{j}_data"])
            yield path.name.split("_")[2], i, f


def real(models: dict, step: int, summed: int, sim=None, panels=("ff1", "ff2"),
         span=(0, None)):
    """``models``: label → BraggNN predictor (the shipped default, and a fine-tuned one)."""
    what = ("single frames" if summed == 1
            else f"ω-summed images ({summed} frames = {summed * 0.25:g}°)")
    end = "the last" if span[1] is None else span[1] - 1
    frames_said = "all frames" if span == (0, None) else f"frames {span[0]}..{end}"
    print(f"\n== 4. real ruby frames ({'+'.join(panels)}), {what}, every {step}th of "
          f"{frames_said}; labels: whole-spot fits; {load()}")
    for label, m in models.items():
        print(f"  {label}: {m.provenance()} ({m.card.get('trained', '?')})")
    fps, labels = [], []
    t_prep = t_cls = 0.0
    for i, (_, _, frame) in enumerate(ruby_frames(step, summed, panels, span)):
        labels.append(label_spots(frame))
        t0 = time.perf_counter()
        fps.append(prepare(frame, frame_index=i))
        t1 = time.perf_counter()
        classical(frame)
        t_prep, t_cls = t_prep + t1 - t0, t_cls + time.perf_counter() - t1
    n_labels = sum(len(lab) for lab in labels)
    n_peaks = sum(len(fp.rows) for fp in fps)
    if not n_labels:
        print("  no labelled spots")
        return None
    print(f"  {len(fps)} frames, {n_labels} isolated spots labelled, {n_peaks} candidates")
    print(f"  {'method':14s} {'recall':>6s}   p50     p75     p95   (px, matched within 1.5 px)")
    p75, t_centre, recall, cov = {}, {}, {}, {}
    rows = [(label, "braggnn", model) for label, model in models.items()]
    rows += [(m, m, None) for m in METHODS if m != "braggnn"]
    for m, method, model in rows:
        t_centre[m] = np.inf
        for _ in range(1 if method == "pseudo-voigt" else 2):  # the faster of two: warm caches
            t0 = time.perf_counter()  # all frames in one call, as the live callback does
            tables = centre_peaks(fps, method, model)
            t_centre[m] = min(t_centre[m], time.perf_counter() - t0)
        errs, diffs, stds = [], [], []
        for lab, table in zip(labels, tables):
            if not len(lab):
                continue
            lab = lab[["row", "col"]].to_numpy()
            found = table[["row", "col"]].to_numpy()
            if not len(found):
                errs.append(np.full(len(lab), np.inf))
                continue
            d = np.hypot(lab[:, :1] - found[None, :, 0], lab[:, 1:] - found[None, :, 1])
            j = d.argmin(axis=1)
            e = d[np.arange(len(lab)), j]
            errs.append(e)
            ok = e < 1.5
            diffs.append(found[j[ok]] - lab[ok])
            stds.append(table[["row_std", "col_std"]].to_numpy()[j[ok]])
        e = np.concatenate(errs)
        hit = e < 1.5
        p75[m] = np.percentile(e[hit], 75) if hit.any() else np.nan
        print(f"  {m:22s} {hit.mean():6.3f}   {pct(e[hit])}")
        if method == "braggnn":
            recall[m] = hit.mean()
            cov[m] = coverage(np.concatenate(diffs), np.concatenate(stds))
    for m in models:
        better = all(p75[m] <= 0.8 * p75[c] for c in ("centroid", "pseudo-voigt"))
        print(f"  target p75 >= 20 % below centroid and fit, recall >= 0.95, {m}: p75 "
              f"{p75[m]:.3f} vs {p75['centroid']:.3f} / {p75['pseudo-voigt']:.3f} (ratio "
              f"{p75[m] / p75['centroid']:.2f} / {p75[m] / p75['pseudo-voigt']:.2f}), recall "
              f"{recall[m]:.3f} ({'met' if better and recall[m] >= 0.95 else 'NOT met'})")
        print(f"  calibration (real, per coordinate), {m}: within 1σ "
              f"{cov[m]['within_1sigma']:.3f}, within 2σ {cov[m]['within_2sigma']:.3f}")
    first = next(iter(models))
    print(f"  find + patches {1000 * t_prep / len(fps):.0f} ms per frame (classical pipeline "
          f"{1000 * t_cls / len(fps):.0f} ms); centring per spot "
          "(all frames in one call, a table per frame): "
          + ", ".join(f"{m} {1e6 * t / max(n_peaks, 1):.0f} µs" for m, t in t_centre.items())
          + f"; {load()}")
    if sim is not None:
        per_spot(models[first], fps, sim)
    return p75


def pooled(fps) -> FramePeaks:
    """All candidates of ``fps`` as one frame's: the centring cost per spot without the
    cost per frame (its table)."""
    cat = {k: np.concatenate([getattr(fp, k) for fp in fps])
           for k in ("rows", "cols", "patches", "edge", "n_near", "origin", "scale")}
    return FramePeaks(0, **cat)


def per_spot(model, real_fps, sim_fps, repeats: int = 5):
    """BraggNN centring time per spot of real vs simulated frames, with the same number of
    spots per call: (a) all spots of as many frames as hold them, a table per frame, and
    (b) pooled into one table (the per-spot cost alone). The ruby frames hold ~1.4 spots
    each against ~170 on the simulated ones, so (a) is mostly the cost of a table per
    frame (~40 µs)."""
    n_real = sum(len(fp.rows) for fp in real_fps)
    sim_pool = pooled(sim_fps)
    k = np.arange(min(n_real, len(sim_pool.rows)))
    sim_same = FramePeaks(0, sim_pool.rows[k], sim_pool.cols[k], sim_pool.patches[k],
                          sim_pool.edge[k], sim_pool.n_near[k], sim_pool.origin[k],
                          sim_pool.scale[k])
    real_pool = pooled(real_fps)

    def best(fps, n):
        t = min(_timed(lambda: centre_peaks(fps, "braggnn", model)) for _ in range(repeats))
        return 1e6 * t / max(n, 1)

    t_frames = best(real_fps, n_real)
    t_real = best([real_pool], n_real)
    t_sim = best([sim_same], len(k))
    verdict = "met" if t_real <= 1.1 * t_sim else "NOT met"
    print(f"  BraggNN centring per spot, {len(k)} spots per call: real {t_real:.1f} vs "
          f"simulated {t_sim:.1f} µs pooled into one table ({verdict}: real must not be "
          f"slower, 10 % timing slack); real with a table per frame ({len(real_fps)} frames, "
          f"{n_real / len(real_fps):.1f} spots each): {t_frames:.1f} µs per spot = "
          f"{t_frames * n_real / len(real_fps):.0f} µs per frame; {load()}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def figure(model, path: str):
    """A simulated frame with the peaks found, and a crop with the three estimates + truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bluesky_xrdml.analysis import locate_peaks

    sim = SpotSimulator(seed=11, streaks=0.3)
    omega = 3.3
    frame = sim.frame(omega, np.random.default_rng(4))
    truth = sim.truth(omega)
    tables = {m: locate_peaks(frame, method=m, model=model) for m in METHODS}
    bn = tables["braggnn"]
    streaky = truth[(truth["streak_len"] > 3) & truth["isolated"]].sort_values("height")
    if len(streaky):  # zoom on the brightest isolated streak
        r0, c0 = streaky.iloc[-1][["row", "col"]]
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
    parser.add_argument("--compact-n", type=int, default=40_000,
                        help="extra compact spots for the compact target's figures")
    parser.add_argument("--fit-n", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--density", type=float, default=200.0)
    parser.add_argument("--real-step", type=int, default=6, help="every n-th ruby frame")
    parser.add_argument("--real-panels", default="ff1,ff2", help="ruby panels to evaluate")
    parser.add_argument("--real-frames", default=":", help="ruby frame range START:STOP "
                        "(e.g. 720: for the half a fine-tuned model did not see)")
    parser.add_argument("--tuned", help="also evaluate these BraggNN weights (e.g. fine-tuned "
                        "on other ruby frames: xrdml train braggnn --frame-cache ...) on the "
                        "real frames")
    parser.add_argument("--model", default="braggnn", help="model name or weights path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sections", default="sim,speed,frames,real")
    parser.add_argument("--figure", help="only write the docs figure (PNG) to this path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    if args.figure:
        figure(model, args.figure)
        return
    sections = set(args.sections.split(","))
    print(f"model: {model.provenance()}; device {args.device}; torch threads {args.threads}; "
          f"{load()}")
    patches = simulated(model, args.n, args.fit_n, args.compact_n) if "sim" in sections else \
        simulate_patches(4096, seed=SEED)["patches"]
    if "speed" in sections:
        speed(model, load_model("braggnn-ensemble", device=args.device), patches)
    sim_fps = frames(model, args.frames, args.density) if "frames" in sections else None
    if "real" in sections and RUBY.exists():
        panels = tuple(args.real_panels.split(","))
        start, _, stop = args.real_frames.partition(":")
        span = (int(start or 0), int(stop) if stop else None)
        models = {"braggnn (shipped)" if args.model == "braggnn" else "braggnn": model}
        if args.tuned:
            models["braggnn (fine-tuned)"] = load_model(args.tuned, device=args.device)
        real(models, args.real_step, 1, sim_fps, panels, span)
        real(models, args.real_step, 4, panels=panels, span=span)


if __name__ == "__main__":
    main()

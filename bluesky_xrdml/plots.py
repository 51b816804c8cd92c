"""PNG figures a person would rather look at than read: maps and peak overlays."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

PQNET_PARAMS = ("scale", "fraction")


def plot_maps(ds, path, title: str = "", skip_std: bool = True):
    """One panel per map variable (uncertainties left out unless ``skip_std=False``)."""
    names = [v for v in ds.data_vars if not (skip_std and v.endswith("_std"))]
    ncol = min(4, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.2 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, names):
        da = ds[name]
        ydim, xdim = da.dims
        x, y = ds[xdim].values, ds[ydim].values
        im = ax.pcolormesh(x, y, da.values, shading="nearest", cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel(xdim)
        ax.set_ylabel(ydim)
        ax.set_aspect("equal")
        fig.colorbar(im, ax=ax, shrink=0.8, label=da.attrs.get("units", ""))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_peaks(frame, table, path, title: str = "", truth=None):
    """The frame (log scale) with found peaks: circles, coloured by flag."""
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(np.log10(np.clip(np.asarray(frame, float), 1, None)), cmap="gray_r",
              origin="upper", interpolation="nearest")
    colours = {"": "tab:blue", "edge": "tab:orange", "multi": "tab:red"}
    for flag, group in table.groupby(table["flag"].str.split("|").str[-1]):
        ax.scatter(group["col"], group["row"], s=80, facecolors="none",
                   edgecolors=colours.get(flag, "tab:purple"), label=flag or "clean")
    if truth is not None and len(truth):
        ax.scatter(truth["col"], truth["row"], s=8, marker="+", c="tab:green", label="true centre")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"{len(table)} peaks")
    ax.set_xlabel("col (px)")
    ax.set_ylabel("row (px)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mask_absent(ds, names):
    """For the eye only: sizes where a phase is < 10 % are meaningless, and fractions where
    almost nothing diffracts are noise. The catalog keeps every value."""
    scales = [v for v in ds.data_vars if v.endswith("_scale")]
    total = sum(ds[v] for v in scales) if scales else None
    out = ds[names].copy()
    for v in names:
        if total is not None:
            out[v] = out[v].where(total > 0.05 * float(total.max()))
        phase = v.rsplit("_size_nm", 1)[0]
        if v.endswith("_size_nm") and f"{phase}_fraction" in ds:
            out[v] = out[v].where(ds[f"{phase}_fraction"] >= 0.1)
    return out


def save_figures(client, analysis_run, out_dir) -> list:
    """PNGs of an analysis run read back from the catalog: its maps, and the first
    analysed frame of the raw run with the peaks found on it. Returns the paths."""
    from pathlib import Path

    from . import catalog

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = analysis_run.metadata["start"]
    raw_uid, tag = start["xrdml"]["raw_uid"], start["uid"][:8]
    paths = []
    if "maps" in analysis_run:
        ds = catalog.maps(analysis_run)
        two_d = [v for v in ds.data_vars if ds[v].ndim == 2 and not v.endswith("_std")]
        pqnet = [v for v in two_d if v.rsplit("_", 1)[-1] in PQNET_PARAMS or "_lattice_" in v
                 or v.endswith("_size_nm")]
        classical = [v for v in two_d if v not in pqnet]
        if classical:
            paths.append(plot_maps(ds[classical], out_dir / f"maps_{tag}.png",
                                   title=f"maps of raw run {raw_uid[:8]} (analysis {tag})"))
        shown = [v for v in pqnet if v.endswith(("_fraction", "_size_nm"))]
        if shown:
            shown.sort(key=lambda v: not v.endswith("_fraction"))  # fractions first row
            paths.append(plot_maps(_mask_absent(ds, shown), out_dir / f"phases_{tag}.png",
                                   title=f"PQ-Net, raw run {raw_uid[:8]}: phase fractions (blank: "
                                         "almost nothing diffracts) and crystallite sizes "
                                         "(blank: fraction < 0.1)"))
    table = catalog.peaks(analysis_run)
    if len(table) and raw_uid in client:
        first = int(table["frame"].min())
        detector = table["detector"].iloc[0]
        frame = np.asarray(client[raw_uid]["primary"][detector][first - 1])
        while frame.ndim > 2:  # frames from detector files: (frames per point, rows, cols)
            frame = frame[0]
        paths.append(plot_peaks(frame, table[table["frame"] == first],
                                out_dir / f"peaks_{tag}.png",
                                title=f"raw run {raw_uid[:8]}, frame {first}: "
                                      f"{(table['frame'] == first).sum()} peaks"))
    return [str(p) for p in paths]


def plot_operando(rows: list, x, measured: dict, time: dict, vaw_two_theta, rate_labels,
                  out_dir, tag: str = "") -> list:
    """The operando attention analysis of one run, like Kano et al.'s figures: (1) predicted
    voltage ± 2σ vs the measured voltage over time, with mode and rate probabilities;
    (2) the patterns as an image (time × 2θ, on the model's grid) with the VAW beside it.
    ``rows``: the ``operando`` stream's rows (with ``vaw``); ``x``: the model inputs (N, 256)
    in the same order; ``measured``/``time``: point -> value. Returns the two paths."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort([r["point"] for r in rows], kind="stable")
    rows = [rows[i] for i in order]
    x = np.asarray(x)[order]
    points = np.array([r["point"] for r in rows])
    has_time = all(p in time for p in points)
    t = np.array([time[p] / 3600 for p in points]) if has_time else points
    t_label = "cell time (h)" if has_time else "pattern (event seq_num)"
    v = np.array([r["voltage"] for r in rows])
    s = np.array([r["voltage_std"] for r in rows])

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]},
                                  constrained_layout=True)
    ax.fill_between(t, v - 2 * s, v + 2 * s, color="tab:blue", alpha=0.25, lw=0,
                    label="predicted ± 2σ")
    ax.plot(t, v, color="tab:blue", lw=1, label="predicted")
    known = [i for i, p in enumerate(points) if p in measured]
    if known:
        vm = np.array([measured[points[i]] for i in known])
        ax.plot(t[known], vm, "k.", ms=2, label="measured")
        mae = float(np.mean(np.abs(v[known] - vm)))
        ax.set_title(f"cell voltage: predicted vs measured (MAE {1000 * mae:.1f} mV)")
    else:
        ax.set_title("predicted cell voltage")
    ax.set_ylabel("voltage (V)")
    ax.legend(loc="lower right", fontsize=8)
    ax2.plot(t, [r["p_charge"] for r in rows], label="P(charge)", lw=1)
    for label in rate_labels:
        key = "p_rate_" + label.replace(".", "p")
        ax2.plot(t, [r[key] for r in rows], lw=1, label=f"P({label})")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel(t_label)
    ax2.legend(loc="center right", fontsize=7, ncol=len(rate_labels) + 1)
    p1 = out_dir / f"operando_voltage_{tag}.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    vaw = np.array([r["vaw"] for r in rows])
    tt = np.asarray(vaw_two_theta, float)
    fig, axes = plt.subplots(1, 3, figsize=(12, 5), sharey=True, constrained_layout=True,
                             gridspec_kw={"width_ratios": [3, 3, 2]})
    extent = [tt[0], tt[-1], t[-1], t[0]]
    im = axes[0].imshow(x, aspect="auto", extent=extent, cmap="viridis")
    axes[0].set_title("patterns (min-max scaled, model grid)")
    axes[0].set_xlabel("2θ (°)")
    axes[0].set_ylabel(t_label)
    fig.colorbar(im, ax=axes[0], shrink=0.7)
    im = axes[1].imshow(vaw, aspect="auto", extent=extent, cmap="magma")
    axes[1].set_title("visualised attention weight (VAW)")
    axes[1].set_xlabel("2θ (°)")
    fig.colorbar(im, ax=axes[1], shrink=0.7)
    axes[2].plot(v, t, lw=1, label="predicted")
    if known:
        axes[2].plot(vm, t[known], "k.", ms=2, label="measured")
    axes[2].set_xlabel("voltage (V)")
    axes[2].legend(fontsize=8)
    p2 = out_dir / f"operando_vaw_{tag}.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [str(p1), str(p2)]

"""``xrdml train ...``: one sub-command per model."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

train_app = typer.Typer(help="Train a model from simulation or from your own labelled runs.",
                        no_args_is_help=True)


def _frames_from_run(catalog_uri: str, uid: str, key: str | None, max_frames: int | None):
    """The 2D frames of an archived raw run's primary stream, read from Tiled."""
    import numpy as np

    from .. import catalog

    client = catalog.connect(catalog_uri)
    try:
        run = client[uid]
    except KeyError:
        raise typer.BadParameter(f"no run {uid!r} in the catalog at {catalog_uri}") from None
    stream = run["primary"]
    descriptors = getattr(stream, "descriptors", None) or []
    data_keys = descriptors[0]["data_keys"] if descriptors else {}
    frames_keys = [k for k, v in data_keys.items()
                   if len([s for s in v.get("shape", []) if s not in (None, 1)]) == 2]
    if key is None:
        if not frames_keys:
            raise typer.BadParameter(f"run {uid} has no 2D frames in its primary stream "
                                     f"(data keys: {sorted(data_keys)}); pass --key")
        key = frames_keys[0]
    if key not in stream:
        raise typer.BadParameter(f"run {uid} has no data key {key!r} in 'primary' "
                                 f"(it has: {sorted(stream)})")
    node = stream[key]
    n = node.shape[0] if max_frames is None else min(node.shape[0], max_frames)
    frames = np.asarray(node[:n])
    return frames.reshape(len(frames), *frames.shape[-2:]), key


def _arch(name: str, width: str | None = None) -> dict:
    from ..models import braggnn as bnn

    archs = {"lean": bnn.LEAN, "lean-residual": bnn.LEAN_RESIDUAL, "lean-blend": bnn.LEAN_BLEND,
             "wide-blend": bnn.WIDE_BLEND, "reference": {}}
    if name not in archs:
        raise typer.BadParameter(f"unknown architecture {name!r}; use one of {sorted(archs)}")
    if not width:
        return archs[name]
    try:
        conv, dense = width.split("/")
        channels = [int(v) for v in conv.split(",")]
        fc = [int(v) for v in dense.split(",") if v]
    except ValueError:
        channels, fc = [], []
    if len(channels) != 3 or min(channels) < 1 or not fc or min(fc) < 1:
        raise typer.BadParameter(f"--width {width!r}: give three convolution channels and "
                                 "the dense units, e.g. '16,32,16/128,64'")
    return {**archs[name], "channels": channels, "fc": fc}


def _finetune(training, frames, out, base, epochs, seed, console, source):
    try:
        card = training.finetune_from_frames(frames, out, base=base, epochs=epochs or 60,
                                             seed=seed, log=console.print, source=source)
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    m = card["metrics"]["held_out_error_vs_labels_px"]
    console.print(f"held-out spots: p75 error vs whole-spot fits {m['before']['p75']:.3f} px "
                  f"before, {m['after']['p75']:.3f} px after fine-tuning (11×11 centroid "
                  f"{m['centroid']['p75']:.3f} px)")
    return card


@train_app.command("braggnn")
def braggnn(
    out: Path = typer.Option(None, help="weights file to write (.safetensors; card .json and "
                             "loss curve .png beside it); default braggnn.safetensors, or "
                             "braggnn-<uid>.safetensors when fine-tuning"),
    from_run: str = typer.Option(None, "--from-run", help="fine-tune on this archived raw run "
                                 "(uid), its isolated spots labelled by whole-spot fits"),
    catalog_uri: str = typer.Option(None, "--catalog", help="Tiled URI of the run's catalog "
                                    "(API key from $TILED_API_KEY)"),
    frame_cache: list[Path] = typer.Option(None, "--frame-cache", help="fine-tune on the "
                                           "frames of a sparse frame cache (.npz, as HEXRD "
                                           "writes them); repeat for several panels"),
    frame_step: int = typer.Option(1, help="use every n-th frame (--frame-cache)"),
    frame_range: str = typer.Option(":", help="frames START:STOP of each frame cache "
                                    "(e.g. 0:720 to keep the rest of the scan for testing)"),
    omega_sum: list[int] = typer.Option(None, "--omega-sum", help="also (repeat) or instead "
                                        "train on images of N consecutive frames added up "
                                        "(an ω range, as grain fitting sees spots); default 1"),
    key: str = typer.Option(None, help="2D data key of the frames (default: the first one)"),
    base: Path = typer.Option(None, help="weights to fine-tune (default: the shipped ones)"),
    epochs: int = typer.Option(None, help="epochs (default 40 from simulation, 60 fine-tuning)"),
    patches_per_epoch: int = typer.Option(50_000, help="fresh simulated patches per epoch"),
    trunk_fraction: float = typer.Option(0.75, help="share of the epochs/minutes spent on one "
                                         "trunk network before it is forked into the members "
                                         "(0: independent members)"),
    members: int = typer.Option(1, help="networks: 1 (default, σ from its variance head) or "
                                "an ensemble of several"),
    arch: str = typer.Option("lean", help="architecture: 'lean' (no non-local block, variance "
                             "head), 'lean-residual' (the same, "
                             "correcting the patch's centroid), 'lean-blend' (one network "
                             "blending both per peak: v4), 'wide-blend' (the same, twice as "
                             "wide: the shipped v5) or 'reference' "
                             "(Liu et al. 2022)"),
    width: str = typer.Option(None, help="widths of the architecture's layers, overriding its "
                              "own: convolution channels / dense units, e.g. '16,32,16/128,64' "
                              "(the lean networks: '8,16,8/64,32')"),
    resume: Path = typer.Option(None, help="continue training from these weights "
                                "(simulation only; the average of their members starts the trunk; "
                                "a lean-blend network starts from their residual network)"),
    faint_share: float = typer.Option(0.0, help="share of each epoch's simulated patches that "
                                      "are extra faint compact spots (at most --faint-sigmas "
                                      "σ of the background high)"),
    faint_sigmas: float = typer.Option(40.0, help="height limit of those faint spots, in σ of "
                                       "the background"),
    lr: float = typer.Option(1e-3, help="learning rate (simulation)"),
    teacher: Path = typer.Option(None, help="distil these weights (e.g. the v3.0 pair, "
                                 "braggnn-pair): targets mix their centres with the true ones"),
    distil: float = typer.Option(0.5, help="weight of the teacher's centre in the target"),
    minutes: float = typer.Option(None, help="stop training after this many minutes"),
    combine: list[Path] = typer.Option(None, "--combine", help="instead of training: one "
                                       "model of the networks of these weights files "
                                       "(repeat), combined by their learned variances"),
    max_frames: int = typer.Option(None, help="use at most this many frames of the run"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(2, help="CPU threads for torch"),
    version: str = typer.Option("2.0", help="version recorded in the model card"),
):
    """Train BraggNN: from simulated patches (true centres), or fine-tune on an archived run."""
    import torch
    from rich.console import Console

    from . import braggnn as training

    console = Console(soft_wrap=True)
    torch.set_num_threads(threads)
    if combine:
        out = out or Path("braggnn.safetensors")
        try:
            card = training.combine(combine, out, seed=seed, version=version,
                                    log=console.print)
        except (ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err)) from None
    elif frame_cache:
        try:
            start, _, stop = frame_range.partition(":")
            span = int(start or 0), int(stop) if stop else None
        except ValueError:
            raise typer.BadParameter(f"--frame-range {frame_range!r} is not START:STOP") from None
        parts = []
        for summed in omega_sum or [1]:
            for path in frame_cache:
                if not Path(path).exists():
                    raise typer.BadParameter(f"no frame cache at {path}")
                if summed < 1:
                    raise typer.BadParameter(f"--omega-sum {summed}: must be 1 or more")
                try:
                    parts.append(training.frames_from_cache(path, max_frames, frame_step, *span,
                                                            summed=summed))
                except ValueError as err:
                    raise typer.BadParameter(str(err)) from None
                what = "frames" if summed == 1 else f"images of {summed} frames added up"
                console.print(f"{path}: {len(parts[-1])} {what}")
        frames = parts[0] if len(parts) == 1 else training.ChainedFrames(parts)
        out = out or Path(f"braggnn-{Path(frame_cache[0]).stem[:24]}.safetensors")
        source = {"frame_cache": str(frame_cache[0]) if len(parts) == 1
                  else [str(p) for p in frame_cache],
                  "frames": len(frames), "step": frame_step, "frame_range": frame_range,
                  "omega_sum": omega_sum or [1]}
        card = _finetune(training, frames, out, base, epochs, seed, console, source)
    elif from_run:
        if not catalog_uri:
            raise typer.BadParameter("--from-run needs --catalog URI (the Tiled server of the run)")
        from ..catalog import CatalogError

        try:
            frames, key = _frames_from_run(catalog_uri, from_run, key, max_frames)
        except CatalogError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
        console.print(f"run {from_run}: {len(frames)} frames of {key!r} {frames.shape[1:]}")
        out = out or Path(f"braggnn-{from_run[:8]}.safetensors")
        card = _finetune(training, frames, out, base, epochs, seed, console,
                         {"run": from_run, "catalog": catalog_uri.split("?")[0], "key": key,
                          "frames": len(frames)})
    else:
        out = out or Path("braggnn.safetensors")
        card = training.train_from_simulation(
            out, epochs=epochs or 40, patches_per_epoch=patches_per_epoch, members=members,
            seed=seed, minutes=minutes, trunk_fraction=trunk_fraction, resume=resume,
            version=version, arch=_arch(arch, width), faint_share=faint_share,
            faint_sigmas=faint_sigmas, lr=lr, teacher=teacher, distil=distil,
            command=shlex.join(["xrdml", *sys.argv[1:]]), log=console.print)
        m = card["metrics"]["all"]
        console.print(f"validation vs truth: p50 {m['p50']:.3f}  p75 {m['p75']:.3f}  "
                      f"p95 {m['p95']:.3f}  p99 {m['p99']:.3f} px  ({m['n']} patches)")
        for kind, v in card["metrics"].items():
            if kind != "all":
                console.print(f"  {kind:10s} p75 {v['p75']:.3f}  p95 {v['p95']:.3f} px")
    out = Path(out).with_suffix(".safetensors")
    console.print(f"wrote {out} (sha256 {card['sha256'][:12]}…), {out.with_suffix('.json')}, "
                  f"{out.with_suffix('.png')}")
    console.print(f"use it: load_model({str(out)!r}) or BraggPeaks(weights={str(out)!r})")


from .pqnet import train_pqnet_command  # noqa: E402

train_app.command("pqnet")(train_pqnet_command)

from .attention import train_attention_command  # noqa: E402

train_app.command("attention")(train_attention_command)

from .structure import train_structure_command  # noqa: E402

train_app.command("structure")(train_structure_command)

"""``xrdml calibrate ...``: instrument calibration from calibrant measurements."""

from __future__ import annotations

from pathlib import Path

import typer

calibrate_app = typer.Typer(help="Calibrate the instrument from a calibrant measurement.",
                            no_args_is_help=True)


@calibrate_app.command("profile")
def profile(
    pattern: Path = typer.Argument(..., help="integrated calibrant pattern: two columns, 2θ in "
                                   "degrees and intensity (.xy/.dat/.chi, '#' comments)"),
    wavelength: float = typer.Option(..., help="X-ray wavelength in Å the calibrant was "
                                     "measured at"),
    calibrant: str = typer.Option("CeO2", help="pyFAI calibrant name (CeO2, LaB6, Si, ...)"),
    out: Path = typer.Option(None, help="profile file to write (JSON; default "
                             "<pattern>.profile.json), with a PNG of the fit beside it"),
    min_snr: float = typer.Option(10.0, help="use peaks higher than this many times the "
                                  "background scatter"),
    anode: str = typer.Option("auto", help="lab tube anode whose Kα2 line is in every peak "
                              "(Cu, Mo, ...); 'auto': when --wavelength is its Kα1 or mean Kα; "
                              "'none': monochromatic"),
):
    """Fit the instrument's peak profile (Caglioti U, V, W, Lorentzian X, asymmetry, zero
    shift) to a calibrant pattern; ``xrdml train pqnet --profile FILE`` uses the result."""
    from rich.console import Console

    from .analysis.calibrate import fit_profile, plot_calibration, read_xy

    console = Console(soft_wrap=True)
    if not pattern.exists():
        console.print(f"[red]no pattern at {pattern}[/red]")
        raise typer.Exit(2)
    from .training.pqnet import lab_anode

    try:
        lab = lab_anode(anode, wavelength)
        if lab is not None:
            wavelength = lab.wavelength
            console.print(f"lab source: Kα1 {lab.wavelength} Å + Kα2 {lab.wavelength2} Å")
        x, y = read_xy(pattern)
        cal = fit_profile(x, y, wavelength, calibrant=calibrant, min_snr=min_snr,
                          source=pattern.name, wavelength2=lab.wavelength2 if lab else None)
    except ValueError as err:  # CalibrationError, unknown anode
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    out = out or pattern.with_suffix(".profile.json")
    cal.save(out)
    png = plot_calibration(x, y, cal, out.with_suffix(".png"))
    i = cal.instrument
    console.print(f"{len(cal.peaks)} {calibrant} peaks; Caglioti U {i.U:.3g}, V {i.V:.3g}, "
                  f"W {i.W:.3g} deg², X {i.X:.3g}°, asymmetry {i.asym0:.3g} + {i.asym1:.3g}/tan2θ "
                  f"°, zero {i.zero:+.4f}°; Rwp {cal.rwp:.3f}, FWHM rms {cal.fwhm_rms:.4f}°")
    console.print(f"wrote {out} and {png}")
    console.print(f"use it: xrdml train pqnet --profile {out} --wavelength {wavelength} ...")

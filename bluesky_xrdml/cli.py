"""The ``xrdml`` command."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="Live analysis of synchrotron diffraction data for Bluesky, filed in Tiled.",
                  no_args_is_help=True, add_completion=False)
console = Console(soft_wrap=True)

from .training.cli import train_app  # noqa: E402

app.add_typer(train_app, name="train")
from .calibrate_cli import calibrate_app  # noqa: E402

app.add_typer(calibrate_app, name="calibrate")

from . import remote_cli  # noqa: E402

app.command(name="worker")(remote_cli.worker)
app.command(name="reprocess")(remote_cli.reprocess)


@contextlib.contextmanager
def _open_catalog(catalog_uri: str | None, directory: Path):
    from . import catalog

    if catalog_uri:
        yield None, catalog.connect(catalog_uri)
    else:
        with catalog.embedded(directory) as (server, client):
            yield server, client


@app.command()
def demo(
    catalog_uri: str = typer.Option(None, "--catalog", help="Tiled server URI (API key from "
                                    "$TILED_API_KEY); default: an embedded catalog"),
    directory: Path = typer.Option(Path("xrdml-data"), help="embedded catalog directory"),
    map_points: int = typer.Option(20, help="map points along x and y"),
    frames: int = typer.Option(12, help="frames in the rotation series"),
):
    """Simulate two scans, analyse them live, file raw and analysis runs in Tiled."""
    from .catalog import CatalogError
    from .demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        with _open_catalog(catalog_uri, directory) as (server, client):
            where = catalog_uri or f"embedded catalog in {directory.resolve()}"
            console.print(f"catalog: {where}")
            summaries = run_demo(client, directory / "figures", map_points=map_points,
                                 frames=frames, log=console.print,
                                 spool=None if catalog_uri else directory / "spool",
                                 # the area detector writes HDF5 files, as real ones do,
                                 # where the embedded server can read them
                                 frames_dir=None if catalog_uri else directory / "frames")
    except CatalogError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    console.print("\n[bold]what was filed[/bold]")
    for s in summaries:
        status = "green" if s["exit_status"] == "success" else "red"
        console.print(f"[bold]{s['scan']}[/bold]: {s['points']} points, scan {s['scan_s']:.1f} s, "
                      f"analysis complete {s['analysis_done_s']:.1f} s after the scan started")
        console.print(f"  raw run       {s['raw_uid']}")
        console.print(f"  analysis run  {s['analysis_uid']}  "
                      f"[{status}]{s['exit_status']}[/{status}]: {s['reason']}")
        if s["incomplete"]:
            console.print(f"  [red]rows missing in the catalog (expected, stored): "
                          f"{s['incomplete']}[/red]")
        for f in s["figures"]:
            console.print(f"  figure        {f}")
    total = time.perf_counter() - t0
    console.print(f"queue stalls: {summaries[-1]['stalls']}; total {total:.1f} s")
    uid = summaries[-1]["raw_uid"]
    if catalog_uri:
        opener = f"c = catalog.connect({catalog_uri!r})  # API key from $TILED_API_KEY\n"
        indent = ""
    else:
        opener = f"with catalog.embedded({str(directory)!r}) as (server, c):\n"
        indent = "    "
    console.print(
        "\nopen them in Python:\n"
        "from bluesky_xrdml import catalog\n" + opener
        + f"{indent}run = catalog.analyses(c, {uid!r})[0]  # newest analysis of the raw run\n"
        f"{indent}print(catalog.maps(run))  # xarray.Dataset; catalog.peaks(run) for peak tables\n"
        + ("" if catalog_uri else f"or serve the catalog: xrdml serve --directory {directory}"),
        highlight=False,
    )


def _catalog_options():
    return (typer.Option(None, "--catalog", help="Tiled server URI (API key from "
                         "$TILED_API_KEY); default: the embedded catalog in --directory"),
            typer.Option(Path("xrdml-data"), help="embedded catalog directory"))


@app.command()
def replay(
    uids: list[str] = typer.Argument(..., help="uids of archived raw runs"),
    catalog_uri: str = _catalog_options()[0],
    directory: Path = _catalog_options()[1],
    engine: bool = typer.Option(True, "--engine/--bulk", help="through the RunEngine with "
                                "the replay plan, or push documents straight in (faster)"),
    spool: Path = typer.Option(None, help="where runs wait if the catalog fails "
                               "(default $XRDML_SPOOL or ./xrdml-spool)"),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH: your own weights for a "
                                    "model, e.g. braggnn=my.safetensors (repeatable)"),
):
    """Analyse archived runs again; each gets a new analysis run linked to it."""
    from rich.progress import Progress

    from .catalog import CatalogError
    from .reprocess import reprocess

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .remote_cli import _models

    models = _models(model)
    try:
        with _open_catalog(catalog_uri, directory) as (_, client):
            missing = [u for u in uids if u not in client]
            if missing:
                console.print(f"[red]not in the catalog: {', '.join(missing)}[/red]")
                raise typer.Exit(2)
            from .callbacks import default_analyses

            analyses = default_analyses(models=models)  # the models load once for all runs
            results = []
            with Progress(console=console) as progress:
                for uid in uids:
                    task = progress.add_task(f"{uid[:8]}", total=None)
                    results.append(reprocess(
                        client, uid, analyses=analyses, engine=engine, spool=spool,
                        on_events=lambda n, t=task: progress.advance(t, n)))
                    progress.update(task, total=results[-1]["events"],
                                    completed=results[-1]["events"])
    except CatalogError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    failed = 0
    for r in results:
        colour = "green" if r["exit_status"] == "success" else "red"
        failed += r["exit_status"] != "success"
        console.print(f"{r['raw_uid']} -> analysis {r['analysis_uid']}  "
                      f"[{colour}]{r['exit_status']}[/{colour}]  {r['events']} events in "
                      f"{r['seconds']:.1f} s ({r['events'] / max(r['seconds'], 1e-9):.0f}/s): "
                      f"{r['reason']}", highlight=False)
        if r["sink_failures"]:
            console.print(f"  [yellow]the catalog refused {r['sink_failures']} document(s); "
                          "the run is in the spool: run `xrdml sync`[/yellow]")
    console.print(f"{len(results)} run(s) replayed, {failed} with errors")


@app.command()
def results(
    uid: str = typer.Argument(..., help="uid of a raw run"),
    catalog_uri: str = _catalog_options()[0],
    directory: Path = _catalog_options()[1],
    out: Path = typer.Option(Path("xrdml-figures"), help="where to save the PNG figures"),
):
    """Summarise the analysis runs of a raw run and save their maps and peak overlays."""
    from rich.table import Table

    from . import catalog
    from .plots import save_figures

    try:
        with _open_catalog(catalog_uri, directory) as (_, client):
            runs = catalog.analyses(client, uid)
            if not runs:
                console.print(f"no analysis runs of {uid} in the catalog")
                raise typer.Exit(1)
            table = Table(title=f"analysis runs of {uid} (newest first)")
            table.add_column("analysis run", no_wrap=True, min_width=36)
            for col in ("when", "analyses", "models", "status", "events"):
                table.add_column(col, overflow="fold")
            figures = []
            for run in runs:
                start, stop = run.metadata["start"], run.metadata.get("stop") or {}
                models = ", ".join(f"{m['name']} {m.get('version') or ''} "
                                   f"{(m.get('sha256') or '')[:12]}"
                                   for m in start["xrdml"].get("models", [])) or "classical"
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(start["time"]))
                events = ", ".join(f"{k} {v}" for k, v in (stop.get("num_events") or {}).items())
                table.add_row(start["uid"], when, ", ".join(start["xrdml"]["analyses"]) or "-",
                              models, stop.get("exit_status", "running"), events or "-")
                figures += save_figures(client, run, out)
            console.print(table)
            for run in runs:
                stop = run.metadata.get("stop") or {}
                console.print(f"{run.metadata['start']['uid'][:8]}: {stop.get('reason', '')}",
                              highlight=False)
            for f in figures:
                console.print(f"figure: {f}")
    except catalog.CatalogError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


@app.command()
def sync(
    catalog_uri: str = _catalog_options()[0],
    directory: Path = _catalog_options()[1],
    spool: Path = typer.Option(None, help="spool folder (default $XRDML_SPOOL or ./xrdml-spool)"),
):
    """File the runs that waited in the spool while the catalog was unreachable.
    Safe to run again: runs already in the catalog are not written twice."""
    from . import catalog

    try:
        with _open_catalog(catalog_uri, directory) as (_, client):
            done = catalog.sync(client, spool)
    except catalog.CatalogError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    for uid, what in done:
        console.print(f"{uid}: {what}")
    console.print(f"{len(done)} spooled run(s) looked at")


@app.command()
def serve(
    directory: Path = typer.Option(Path("xrdml-data"), help="embedded catalog directory"),
    api_key: str = typer.Option(None, envvar="TILED_API_KEY", help="API key (default: random)"),
    port: int = typer.Option(0, help="port on 127.0.0.1 (default: any free one)"),
):
    """Serve the embedded catalog on 127.0.0.1 until Ctrl-C."""
    from .catalog import embedded

    if not directory.exists():
        console.print(f"[red]{directory} does not exist; run `xrdml demo` first[/red]")
        raise typer.Exit(2) from None
    with embedded(directory, api_key=api_key, port=port) as (server, _):
        # a key the user chose stays private; the random one is shown, as tiled itself does
        uri = server.uri.split("?")[0] if api_key else server.uri
        console.print(f"serving {directory.resolve()} at {uri}  (Ctrl-C stops)")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    app()

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
                                 frames=frames, log=console.print)
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


@app.command()
def serve(
    directory: Path = typer.Option(Path("xrdml-data"), help="embedded catalog directory"),
    api_key: str = typer.Option(None, envvar="TILED_API_KEY", help="API key (default: random)"),
):
    """Serve the embedded catalog on 127.0.0.1 until Ctrl-C."""
    from .catalog import embedded

    if not directory.exists():
        console.print(f"[red]{directory} does not exist; run `xrdml demo` first[/red]")
        raise typer.Exit(2) from None
    with embedded(directory, api_key=api_key) as (server, _):
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

"""The ``xrdml`` command."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Live analysis of synchrotron diffraction data for Bluesky, filed in Tiled.",
                  no_args_is_help=True, add_completion=False)
console = Console()


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
        raise typer.Exit(2)
    table = Table(title="what was filed")
    for col in ("scan", "raw run", "analysis run", "status", "points", "scan s", "done s"):
        table.add_column(col)
    for s in summaries:
        table.add_row(s["scan"], s["raw_uid"], s["analysis_uid"], s["exit_status"],
                      str(s["points"]), f"{s['scan_s']:.1f}", f"{s['analysis_done_s']:.1f}")
    console.print(table)
    for s in summaries:
        console.print(f"{s['scan']}: {s['reason']}")
    console.print("figures:")
    for s in summaries:
        for f in s["figures"]:
            console.print(f"  {f}")
    console.print(f"queue stalls: {summaries[-1]['stalls']}; total {time.perf_counter() - t0:.1f} s")
    uid = summaries[-1]["raw_uid"]
    opener = (f"from_uri({catalog_uri!r})" if catalog_uri else
              f"SimpleTiledServer({str(directory)!r}) as ts: c = from_uri(ts.uri)")
    console.print(
        "\nopen them in Python:\n"
        "  from tiled.client import from_uri\n"
        + ("  from tiled.server import SimpleTiledServer\n  with " + opener if not catalog_uri
           else f"  c = {opener}") + "\n"
        "  from bluesky_xrdml import catalog\n"
        f"  run = catalog.analyses(c, {uid!r})[0]   # or c['<analysis uid>']\n"
        "  catalog.maps(run)                  # xarray.Dataset\n"
        "or browse the embedded catalog:  xrdml serve"
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
        raise typer.Exit(2)
    with embedded(directory, api_key=api_key) as (server, _):
        console.print(f"serving {directory.resolve()} at {server.uri.split('?')[0]}")
        console.print("(the API key is in the URI printed by `tiled` logs; set TILED_API_KEY "
                      "to choose it)" if not os.environ.get("TILED_API_KEY") else "")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    app()

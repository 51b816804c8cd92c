"""``xrdml worker`` and ``xrdml reprocess``: analysis away from the acquisition machine."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

console = Console(soft_wrap=True, stderr=True)


def _models(items: list[str]) -> dict:
    """``--model NAME=PATH`` options (``xrdml worker``, ``reprocess``, ``replay``) as a dict."""
    models = {}
    for item in items:
        name, _, path = item.partition("=")
        if not path or not Path(path).exists():
            console.print(f"[red]--model {item}: expected NAME=PATH to an existing file[/red]")
            raise typer.Exit(2)
        models[name] = path
    return models


def _root_map(items: list[str]) -> dict:
    """``--root-map ACQ=HERE`` options as ``{ACQ: HERE}``; HERE must exist."""
    roots = {}
    for item in items:
        old, _, new = item.partition("=")
        if not old or not new or not Path(new).is_dir():
            console.print(f"[red]--root-map {item}: expected ACQ=HERE, HERE a folder on this "
                          "machine (where the acquisition side's folder ACQ is mounted)[/red]")
            raise typer.Exit(2)
        roots[old] = new
    return roots


def worker(
    zmq: str = typer.Option(..., "--zmq", help="HOST:PORT of the 0MQ proxy's output "
                            "(bluesky-0MQ-proxy's --out-address)"),
    catalog_uri: str = typer.Option(..., "--catalog", help="Tiled server URI the analysis "
                                    "runs are filed in"),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="Tiled API key (default: $TILED_API_KEY)"),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH: your own weights for a "
                                    "model, e.g. braggnn=my.safetensors (repeatable)"),
    root_map: list[str] = typer.Option([], "--root-map", help="ACQ=HERE: detector files "
                                       "written under folder ACQ on the acquisition side "
                                       "are read from HERE on this machine (repeatable)"),
    spool: Path = typer.Option(None, help="where analysis runs wait if the catalog fails "
                               "(default $XRDML_SPOOL or ./xrdml-spool)"),
    report_every: float = typer.Option(60.0, help="seconds between throughput reports"),
):
    """Analyse the runs a RunEngine publishes over 0MQ and file them in Tiled, until
    Ctrl-C or SIGTERM (the run in progress is closed, marked as interrupted)."""
    from . import catalog
    from .remote import RemoteWorker

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models, roots = _models(model), _root_map(root_map)
    try:
        client = catalog.connect(catalog_uri, api_key=api_key)
    except catalog.CatalogError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    try:
        service = RemoteWorker(zmq, client, models=models, root_map=roots,
                               catalog_uri=catalog_uri,
                               spool=spool, report_every=report_every,
                               log=lambda msg: console.print(msg, highlight=False))
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    raise typer.Exit(service.run())


def reprocess(
    uids: list[str] = typer.Argument(..., help="uids of archived raw runs"),
    catalog_uri: str = typer.Option(..., "--catalog", help="Tiled server URI (API key from "
                                    "$TILED_API_KEY or --api-key)"),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="Tiled API key (default: $TILED_API_KEY)"),
    dask: str = typer.Option(None, "--dask", help="a dask.distributed scheduler address "
                             "(tcp://host:8786), or local:N for N worker processes here; "
                             "default: one run after another in this process"),
    model: list[str] = typer.Option([], "--model", help="NAME=PATH: your own weights "
                                    "(readable on every Dask worker)"),
    spool: Path = typer.Option(None, help="where analysis runs wait if the catalog fails"),
):
    """Analyse archived runs again, in parallel on a Dask cluster with --dask; each gets
    a new analysis run linked to it. A failing run is reported; the others go on."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from .catalog import CatalogError
    from .cluster import reprocess_many

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    models = _models(model)
    out = Console(soft_wrap=True)
    try:
        with Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=out) as progress:
            task = progress.add_task("runs", total=len(uids))

            def done(r):
                colour = "green" if r["exit_status"] == "success" else "red"
                progress.console.print(
                    f"{r['raw_uid']} -> analysis {r['analysis_uid']}  "
                    f"[{colour}]{r['exit_status']}[/{colour}]  {r['events']} events in "
                    f"{r['seconds']:.1f} s: {r['reason']}", highlight=False)
                progress.advance(task)

            results = reprocess_many(uids, catalog_uri, api_key=api_key, dask=dask,
                                     models=models, spool=spool, on_result=done)
    except (CatalogError, ValueError, RuntimeError) as err:
        out.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    failed = sum(r["exit_status"] != "success" for r in results)
    out.print(f"{len(results)} run(s) reprocessed, {failed} with errors")
    raise typer.Exit(1 if failed else 0)

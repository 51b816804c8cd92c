"""``xrdml train ...``: one sub-command per model."""

from __future__ import annotations

import typer

train_app = typer.Typer(help="Train a model from simulation or from your own labelled runs.",
                        no_args_is_help=True)

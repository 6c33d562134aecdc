"""Typer application behind the ``scoresde`` console script."""

from __future__ import annotations

import typer

import scoresde

app = typer.Typer(help="Score-based diffusion in continuous time.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scoresde {scoresde.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Score-based diffusion in continuous time."""


def main() -> None:
    app()

"""The floor of figure 3: the smallest useful click CLI, a group with one command."""

from __future__ import annotations

import click


@click.group()
def cli() -> None:
    """A minimal click CLI."""


@cli.command()
@click.argument("name")
def hello(name: str) -> None:
    """Say hello."""
    click.echo(f"hello {name}")


if __name__ == "__main__":
    cli()

"""Placeholder: replaced by the owner of this command group."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

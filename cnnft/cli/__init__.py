"""The command line: a Typer app whose commands parse, call one recipe and render its typed
result (or ``--json``); exit codes live in :mod:`.exits`. Imports recipes, never the reverse."""

from .app import app, main

__all__ = ["app", "main"]

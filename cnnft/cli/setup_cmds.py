"""Commands that set up: models (what can be fine-tuned) and init (a starter config)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..results import tables
from .base import _print_json, app, out
from .helpformat import Command as _Command


@app.command("models", cls=_Command)
def models_cmd(
    filter_text: Optional[str] = typer.Option(
        None, "--filter", help="Only names containing this text, timm's included (loads timm); timm/TEXT: timm's alone."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List backbones with parameter counts, default weights and input size.

    Without --filter, timm's models are not listed (answered without importing torch). A
    filter also searches timm's architecture names, shown as timm/<name>, which loads timm
    and takes a few seconds; --filter timm/convnext lists timm's matches alone.
    """
    from ..recipes import backbones
    rows = backbones.list_models(filter_text)
    if json_out:
        _print_json(rows)
        return
    out.print(tables.backbones(rows))
    out.print(f"[dim]{escape(backbones.note(filter_text, rows))}[/dim]")


@app.command("init", cls=_Command)
def init_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Backbone (default: the config default)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of class folders, or one with train/ and val/ inside."),
    out_file: Path = typer.Option(Path("experiment.yaml"), "--out", help="Config file to write (never overwritten)."),
) -> None:
    """Write an annotated starter config (every key explained); never overwrites a file."""
    from ..recipes import init as starter
    path = starter.init(out_file, model=model, data_dir=data)
    out.print(f"wrote {path}; check it with `cnnft validate {path}`, run it with `cnnft train {path}`", highlight=False)

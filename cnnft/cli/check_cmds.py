"""``cnnft check``: leaks, duplicates and likely label errors in a data set, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..results import tables
from .. import ranges as R
from .base import _log, _print_json, app, err, number, out
from .helpformat import Command as _Command

FINDINGS_EXIT = 3  # --fail-on: a named kind of finding was found


@app.command("check", cls=_Command)
def check_cmd(
    target: Path = typer.Argument(..., help="A folder of class folders, a folder with train/ val/ (test/), or a config .yaml (its data section)."),
    model: Optional[str] = typer.Option(None, "--model", help="Backbone whose features compare images; default: the config's, else efficientnet_lite0."),
    image_size: Optional[int] = number(R.IMAGE_SIZE, None, "--image-size", help="Input size for the features; default: the weights' own."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for check.json and check.html; default: check/<name>."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Comma-separated: leak, duplicates, labels. Exit 3 when one is found (for CI)."),
    near_threshold: Optional[float] = number(R.NEAR_THRESHOLD, None, "--near-threshold", help="Cosine similarity for near-duplicates; default: the measured one (README)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print all findings as JSON."),
) -> None:
    """Check a data set: exact and near-duplicates, leaks across splits, likely label errors.

    Also class counts and imbalance, small images, colour modes and unreadable files. Writes
    check.json and check.html (thumbnails). With --fail-on the exit code is 3 when a named
    finding is present (0 otherwise; 2 for bad input).
    """
    from ..recipes import check as check_recipe
    kinds = check_recipe.parse_fail_on(fail_on)
    res = check_recipe.check(target, model=model, image_size=image_size, out_dir=out_dir, device=device,
                             near_threshold=near_threshold, log=_log, show_progress=err.is_terminal and not json_out)
    if json_out:
        _print_json(res.to_dict())
    else:
        for line in tables.check_summary(res.to_dict()):
            out.print(line, highlight=False)
    failed = res.failed(kinds)
    if failed:
        err.print(f"--fail-on: found {', '.join(failed)} (exit {FINDINGS_EXIT})", highlight=False)
        raise typer.Exit(FINDINGS_EXIT)

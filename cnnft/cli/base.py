"""What every command shares: the Typer app they register on, the two consoles (results on
stdout, messages on stderr), the root options and small argument helpers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from .. import __version__
from ..config import STRATEGIES
from ..ranges import Range
from .helpformat import Group as _Group

out = Console(soft_wrap=True)  # results (stdout)
err = Console(stderr=True, soft_wrap=True)  # messages (stderr)


app = typer.Typer(
    name="cnnft",
    help="Transfer learning for image classifiers: pretrained backbone, new head, "
    "a freeze strategy by dataset size x similarity, one command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=_Group,
)


@dataclass
class Settings:
    """Options of the root command, kept on Typer's context (``ctx.obj``)."""

    debug: bool = False


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        out.print(f"cnnft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug and isinstance(ctx.obj, Settings):
        ctx.obj.debug = True


class Size(str, Enum):
    small = "small"
    large = "large"


class YesNo(str, Enum):
    yes = "yes"
    no = "no"


StrategyChoice = Enum("StrategyChoice", {s: s for s in STRATEGIES}, type=str)  # type: ignore[misc]


def _config_and_overrides(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """CONFIG may be left out: a first argument with `=` that is no file is an override, and
    the config is built from the defaults and the overrides alone."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, overrides


def _log(message: str) -> None:
    err.print(message, highlight=False, markup=False)


def number(r: Range, default, *decls: str, help: str) -> Any:
    """A numeric option checked by the same Range as its config key (cnnft.ranges): a value
    out of range is a usage error (exit 2) that says the range."""
    def parse(text):
        try:
            return r.parse(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return typer.Option(default, *decls, parser=parse, metavar="INTEGER" if r.kind is int else "NUMBER",
                        help=f"{help} ({r.text()})")

"""How a command ends: every error, interruption and stop becomes one message on stderr and an
exit code (0 success, 2 bad input, 1 anything else, 130/143 after Ctrl-C/SIGTERM)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

import typer
from rich.console import Console
from rich.text import Text

from ..errors import CnnftError, Interrupted
from .helpformat import click_errors

err = Console(stderr=True, soft_wrap=True)


def other_rank() -> bool:
    """True in a torchrun process other than rank 0 (read from the environment: no torch import)."""
    return os.environ.get("RANK", "0") != "0"


def report(exc: BaseException, debug: bool, name: str) -> int:
    """Say what went wrong (and what to do next) on stderr; return the exit code."""
    if isinstance(exc, typer.Exit):
        return exc.exit_code
    if isinstance(exc, click_errors.NoArgsIsHelpError):  # the help is already shown
        return 2
    if isinstance(exc, click_errors.UsageError):
        where = exc.ctx.command_path if exc.ctx else "cnnft"
        error(exc.format_message(), f"see `{where} --help`")
        return 2
    if isinstance(exc, click_errors.ClickException):
        error(exc.format_message(), None)
        return exc.exit_code
    if isinstance(exc, Interrupted):  # stopped on request: not an error, but the run is unfinished
        if other_rank():
            return exc.exit_code
        err.print(Text(exc.message, style="bold yellow"), highlight=False)
        if exc.hint:
            err.print(Text.assemble(("hint: ", "yellow"), exc.hint), highlight=False)
        return exc.exit_code
    if isinstance(exc, CnnftError):
        if debug:
            import traceback

            traceback.print_exception(exc)
        if not other_rank():  # every torchrun process meets the same error; rank 0 reports it
            error(exc.message, exc.hint)
        return exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, typer.Abort)):  # Abort: Ctrl-C at a prompt
        saved = "nothing was saved" if name == "train" else "its results are missing or incomplete"
        err.print(Text(f"interrupted by Ctrl-C before `cnnft {name}` finished: {saved}", style="bold yellow"),
                  highlight=False)
        err.print(Text.assemble(("hint: ", "yellow"), "run the same command again"), highlight=False)
        return 130
    if isinstance(exc, BrokenPipeError):  # `cnnft ... | head`: the reader is gone, so is our output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if debug:  # last resort below: a message, not a traceback
        raise exc
    err.print(Text.assemble(("internal error: ", "bold red"), f"{type(exc).__name__}: {exc}"), highlight=False)
    err.print("[dim]run again with --debug for the traceback, and please report it[/dim]")
    return 1


def command_name(group, args: list[str]) -> str:
    """The subcommand named in ``args`` ("cnnft" when there is none)."""
    return next((a for a in args if a in group.commands), "cnnft")


@contextlib.contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """Ctrl-C does nothing inside (in the main thread; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def error(message: str, hint: str | None) -> None:
    err.print(Text.assemble(("error: ", "bold red"), message), highlight=False)
    if hint:
        err.print(Text.assemble(("hint: ", "yellow"), hint), highlight=False)

"""The `cnnft` command line: parse arguments, call one recipe, print its result.

Commands live by job in :mod:`.train_cmds`, :mod:`.tune_cmds`, :mod:`.model_cmds` and :mod:`.setup_cmds` (imported
here, in the order ``--help`` lists them). Errors are mapped to a message and an exit code in
one place (:func:`main`): 0 success, 2 bad input, 1 anything else, 130/143 after SIGINT/SIGTERM
with a resumable checkpoint.
"""

from __future__ import annotations

import os
import sys

import typer

from . import check_cmds, exits, model_cmds, setup_cmds, train_cmds, tune_cmds  # noqa: F401 - registers the commands
from .base import Settings, app

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn errors into a message and an exit code."""
    settings = Settings(debug=bool(os.environ.get("CNNFT_DEBUG")))
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with command.make_context("cnnft", args, obj=settings) as ctx:
            command.invoke(ctx)
    except (Exception, KeyboardInterrupt) as exc:
        # the command is over; a further Ctrl-C must not cut its last message short
        with exits.ctrl_c_ignored():
            code = exits.report(exc, settings.debug, exits.command_name(command, args))
        sys.exit(code)



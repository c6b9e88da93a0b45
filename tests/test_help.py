"""Every command's --help, rendered through the real entry point: flags shown as flags,
literal brackets kept, a summary line for each command."""

from __future__ import annotations

import inspect
import sys

import pytest
import typer

from cnnft import cli

COMMANDS = sorted(typer.main.get_command(cli.app).commands)


def _help(monkeypatch, capsys, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", ["cnnft", *argv, "--help"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    return out


def test_there_are_commands():
    assert {"train", "lr-find", "validate", "export", "extract", "inspect", "freeze-plan", "init"} <= set(COMMANDS)


@pytest.mark.parametrize("argv", [(), *[(c,) for c in COMMANDS]], ids=["cnnft", *COMMANDS])
def test_help_shows_flags_as_flags_and_a_summary(argv, monkeypatch, capsys):
    out = _help(monkeypatch, capsys, *argv)
    assert "<bool>" not in out
    assert "--help" in out
    command = typer.main.get_command(cli.app)
    if argv:
        command = command.commands[argv[0]]
    summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
    assert summary, f"{argv} has no summary line"
    assert " ".join(summary.split()) in " ".join(out.replace("│", " ").split())


def test_export_help_keeps_the_extra_in_brackets(monkeypatch, capsys):
    out = _help(monkeypatch, capsys, "export")
    assert "cnnft[onnx]" in out


def test_root_help_lists_every_command_with_its_summary(monkeypatch, capsys):
    out = " ".join(_help(monkeypatch, capsys).replace("│", " ").split())
    for name in COMMANDS:
        assert name in out

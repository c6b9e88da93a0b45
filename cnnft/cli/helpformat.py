"""Help output for the CLI: plain flags and reflowed paragraphs on top of typer's rich help,
and the usage-error classes of the click typer runs on."""

from __future__ import annotations

import inspect

__all__ = ["Command", "Group", "click_errors"]

from typer.core import TyperCommand, TyperGroup, TyperOption

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors


class _Flag(TyperOption):
    def display_type_rich(self, ctx):
        return None


class _PlainHelp:
    """Help as a reader expects it, where typer 0.29 renders otherwise: no type after on/off
    flags (it prints `--json <bool>`, even `--help <bool>`, as if the flag took a value), and
    docstring paragraphs reflowed (it keeps their line breaks, splitting sentences mid-line)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if self.help:  # type: ignore[has-attr]
            paragraphs = inspect.cleandoc(self.help).split("\n\n")  # type: ignore[has-attr]
            self.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)

    def get_params(self, ctx):
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if type(p) is TyperOption and p.is_bool_flag:
                p.__class__ = _Flag  # same option, help without the type
        return params


class Command(_PlainHelp, TyperCommand):
    pass


class Group(_PlainHelp, TyperGroup):
    pass

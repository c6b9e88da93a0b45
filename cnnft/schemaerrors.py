"""Pydantic's validation errors told as one line per problem, at the key path a person wrote:
unknown keys with the allowed ones and the closest match, a value that fits no branch of a
union as one problem, bad values shown briefly. ``sections`` maps a key path ("" for the root)
to the schema model that reads it."""

from __future__ import annotations

import difflib
import reprlib

from pydantic import BaseModel


def _allowed(path: tuple, sections: dict) -> list[str]:
    parent = ".".join(str(p) for p in path[:-1])
    schema = sections.get(parent)
    return list(schema.model_fields) if schema else []


# shows a bad value briefly: a YAML alias bomb must not be expanded into the message
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 80, 80, 2, 4, 4


def _describe(err: dict, sections: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = _allowed(loc, sections)
        parent = ".".join(str(p) for p in loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        return f"{key}: unknown key{hint} (allowed: {', '.join(allowed)})"
    return f"{key}: {_message(err)}{_shown(err)}"


def _shown(err: dict) -> str:
    got = err.get("input")
    return "" if isinstance(got, dict) else f" (got {_short.repr(got)})"


def _message(err: dict) -> str:
    got, msg = err.get("input"), err["msg"]
    if err["type"] == "model_type":
        msg = "must be a mapping of keys to values"
    elif err["type"] == "bool_type":
        msg += "; write true or false (yes/no/on/off and quoted words are not booleans)"
    elif err["type"] in ("int_type", "float_type") and isinstance(got, bool):
        msg += "; true/false is not a number"
    elif err["type"] == "int_type" and isinstance(got, (float, str)):
        msg += ", written without a decimal point or quotes"
    return msg


def _field_loc(loc: tuple, sections: dict) -> tuple:
    """The key path of the schema field an error's ``loc`` points into (the rest of ``loc``
    names union branches or items inside the value)."""
    schema: type[BaseModel] | None = sections[""]
    for i, part in enumerate(loc):
        if schema is None or part not in schema.model_fields:
            return loc[:i]
        schema = sections.get(".".join(str(p) for p in loc[:i + 1]))
    return loc


def _inside_branch(errors: list[dict], sections: dict) -> list[dict]:
    """A value that got inside one branch of a union (``train.class_weights: {a: .nan}``) has
    that branch's shape: its problems are told at their own key (``train.class_weights.a``),
    without pydantic's branch tag, and the other branches' complaints are dropped."""
    fields = [_field_loc(tuple(e["loc"]), sections) for e in errors]
    deep = {f for f, e in zip(fields, errors) if f and len(e["loc"]) > len(f) + 1}
    out = []
    for f, e in zip(fields, errors):
        if f in deep:
            if len(e["loc"]) == len(f) + 1:
                continue
            e = {**e, "loc": f + tuple(e["loc"][len(f) + 1:]), "keyed": True}
        out.append(e)
    return out


def problems(errors: list[dict], sections: dict) -> list[str]:
    """One line per problem. A value that fits no branch of a union (``train.lr: fast`` for a
    number or ``auto``) is one problem listing every branch, not one line per branch under
    pydantic's branch tags."""
    errors = _inside_branch(errors, sections)
    branches: dict[tuple, list[dict]] = {}
    for e in errors:
        field = _field_loc(tuple(e["loc"]), sections)
        if field and len(e["loc"]) == len(field) + 1 and e["type"] != "extra_forbidden" and "keyed" not in e:
            branches.setdefault(field, []).append(e)
    out, done = [], set()
    for e in errors:
        field = _field_loc(tuple(e["loc"]), sections)
        group = branches.get(field, [])
        if e not in group:
            out.append(_describe(e, sections))
        elif field not in done:
            done.add(field)
            msgs = [_message(g) for g in group]
            said = msgs[0] + "".join(", or " + m.removeprefix("Input should be ") for m in msgs[1:])
            out.append(f"{'.'.join(str(p) for p in field)}: {said}{_shown(group[0])}")
    return out

"""Safe YAML for configs and run records: ``yaml.SafeLoader`` with YAML 1.2's booleans, dates
kept as text, and duplicate keys refused with where they are (one file, every problem)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class _Loader(yaml.SafeLoader):
    """Safe YAML where only true/false are booleans and dates stay text (as in YAML 1.2):
    YAML 1.1 would turn `amp: yes`, `download: off` or a folder named 2024-05-01 into
    something else without a word."""


_BOOL, _TIMESTAMP = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class DuplicateKeys(yaml.YAMLError):
    """A mapping names the same key twice; YAML itself would silently keep the last."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _duplicate_keys(root: yaml.Node, at: str = "") -> list[str]:
    """Every key given twice in one mapping, with its path and both line numbers."""
    found: list[tuple[int, str]] = []
    visited: set[int] = set()  # aliases share nodes: walk each once (a billion-laughs stays cheap)
    stack: list[tuple[yaml.Node, str]] = [(root, at)]
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, f"{path}[{i}]") for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    stack.append((value_node, path))
                    continue
                name, line = key_node.value, key_node.start_mark.line + 1
                where = f"{path}.{name}" if path else name
                if name in first_line:
                    found.append((line, f"{where if len(where) <= 80 else where[:77] + '...'}: duplicate key at line {line} (first at line "
                                        f"{first_line[name]}); YAML would silently keep only the last one, "
                                        f"so merge them into one"))
                else:
                    first_line[name] = line
                stack.append((value_node, where))
    return [msg for _, msg in sorted(found)]


def parse_yaml(text: str, at: str = "") -> Any:
    """Parse one YAML document safely (no Python object tags), refusing duplicate keys;
    ``at``: the key path of the document (an override's key) for messages."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        dups = _duplicate_keys(node, at)
        if dups:
            raise DuplicateKeys(dups)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (no Python object tags), with errors that name the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p} (check the path, or run `cnnft init` to write one)")
    if p.is_dir():
        raise ConfigError(f"config path is a folder, not a YAML file: {p} (pass the .yaml file inside it)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        what = "it is not UTF-8 text; save it as a UTF-8 YAML file" if isinstance(exc, UnicodeDecodeError) else exc
        raise ConfigError(f"cannot read config file {p}: {what}") from None
    try:
        return parse_yaml(text)
    except DuplicateKeys as exc:
        raise ConfigError(exc.problems, source=str(p)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML{where}: {problem} (check indentation, colons, brackets and quotes there)",
                          source=str(p)) from None

"""Every shipped example config validates and says how to run it."""

from pathlib import Path

import pytest

from cnnft import config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "hymenoptera.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_starts_with_its_command(path):
    cfg = config.load(path)
    assert path.read_text().splitlines()[0] == f"# cnnft train configs/{path.name}"
    assert cfg.model.backbone


def test_readme_config_reference_lists_every_key_with_its_default():
    """README's `## Config` block is the schema: the same keys, and the schema's defaults except
    for the example values it sets on purpose."""
    import re

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Config\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    documented = yaml.safe_load(block)
    defaults = config.Config.model_construct().model_dump()  # no validation: data.train unset is fine here
    defaults = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in defaults.items()}
    assert set(documented) == set(defaults)
    examples = {("name",), ("data", "train"), ("data", "val"), ("model", "backbone")}
    for section, value in documented.items():
        if not isinstance(value, dict):
            assert (section,) in examples or value == defaults[section], section
            continue
        assert set(value) == set(defaults[section]), section
        for key, v in value.items():
            assert (section, key) in examples or v == defaults[section][key], f"{section}.{key}: {v!r}"

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

"""`cnnft validate`: every bad config or override is exit code 2 with a message that names
the key, never a traceback; a good one prints the resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnft import config as cfgmod
from cnnft import yamlfile
from cnnft import cli
from cnnft.errors import ConfigError


def _flat(text: str) -> str:
    """Rich wraps long messages at the console width: compare word streams."""
    return " ".join(text.split())


def _validate(monkeypatch, capsys, tmp_path: Path, text: str | None, overrides: list[str]) -> tuple[int, str, str]:
    """Run `cnnft validate c.yaml [overrides]` through the real entry point, in-process."""
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["cnnft", "validate", "c.yaml", *overrides])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


OK = "train:\n  lr: 0.1\n"

# id -> (yaml text or None for "no file", overrides, fragments expected in stderr)
BAD = {
    "unknown-top-level-key": ("bogus: 1\n", [], ["bogus: unknown key", "allowed: name"]),
    "misspelt-key-suggestion": ("train:\n  lrr: 0.1\n", [], ["train.lrr", "did you mean train.lr"]),
    "negative-lr": ("train:\n  lr: -1\n", [], ["train.lr", "greater than 0", "got -1"]),
    "zero-epochs": ("train:\n  epochs: 0\n", [], ["train.epochs", "greater than or equal to 1"]),
    "val-split-too-big": ("data:\n  val_split: 1.5\n", [], ["data.val_split", "less than 1", "1.5"]),
    "lr-wrong-type": ('train:\n  lr: "fast"\n', [], ["train.lr", "valid number", "'fast'"]),
    "unknown-strategy": (
        "freeze:\n  strategy: frozen\n", [],
        ["freeze.strategy", "'frozen'", "'auto'", "'full'", "'freeze_early'", "'freeze_most'", "'head_only'"],
    ),
    "unknown-augment": ("data:\n  augment: extreme\n", [], ["data.augment", "'extreme'", "'standard'", "'strong'"]),
    "top-level-list": ("- a\n- b\n", [], ["top level must be a mapping", "list"]),
    "invalid-yaml": ("train:\n  lr: 0.1\n    epochs: 3\n", [], ["not valid YAML", "line 3", "c.yaml"]),
    "missing-file": (None, [], ["config file not found", "c.yaml"]),
    "section-not-mapping": ("train: 3\n", [], ["train: must be a mapping", "got 3"]),
    "override-without-equals": (OK, ["train.lr"], ["override 'train.lr'", "KEY.SUB=VALUE"]),
    "override-unknown-key": (OK, ["train.foo=1"], ["train.foo: unknown key", "overrides"]),
    "override-wrong-type": (OK, ["train.epochs=abc"], ["train.epochs", "valid integer", "'abc'"]),
    "override-into-scalar": ("train: 3\n", ["train.lr=0.1"], ["train", "not a section"]),
    "override-misspelt-section": (OK, ["trian.lr=0.1"], ["trian: unknown key", "did you mean train"]),
    "two-problems-together": (
        "train:\n  lrr: 0.1\ndata:\n  val_split: 2\n", [],
        ["2 problem(s)", "train.lrr", "did you mean train.lr", "data.val_split"],
    ),
    "file-and-override-problems-together": (
        "train:\n  lr: -1\n", ["train.epochs=0"], ["2 problem(s)", "train.lr", "train.epochs"],
    ),
    "bad-device": ("train:\n  device: gpu\n", [], ["train.device", "'gpu'"]),
    "bad-name": ("name: 'my run/1'\n", [], ["name", "should match pattern"]),
    # YAML that would otherwise silently mean something else
    "duplicate-section": ("train:\n  lr: 0.1\ndata:\n  val_split: 0.3\ntrain:\n  epochs: 2\n", [],
                          ["train: duplicate key at line 5 (first at line 1)", "merge them into one"]),
    "duplicate-key": ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", [], ["train.lr: duplicate key at line 4 (first at line 2)"]),
    "two-duplicates-together": ("seed: 1\nseed: 2\ntrain: {lr: 0.1, lr: 0.2}\n", [],
                                ["2 problem(s)", "seed: duplicate key at line 2", "train.lr: duplicate key at line 3"]),
    "bool-as-int": ("train:\n  epochs: true\n", [], ["train.epochs", "valid integer", "true/false is not a number"]),
    "bool-as-float": ("train:\n  lr: false\n", [], ["train.lr", "valid number", "true/false is not a number"]),
    "float-as-int": ("data:\n  batch_size: 32.5\n", [], ["data.batch_size", "valid integer", "32.5"]),
    "yes-is-not-a-bool": ("train:\n  amp: yes\n", [], ["train.amp", "valid boolean", "write true or false", "'yes'"]),
    "off-is-not-a-bool": ("freeze:\n  similar: off\n", [], ["freeze.similar", "valid boolean", "'off'"]),
    "int-is-not-a-bool": ("train:\n  channels_last: 0\n", [], ["train.channels_last", "valid boolean", "got 0"]),
    "override-yes-is-not-a-bool": (OK, ["train.amp=yes"], ["train.amp", "valid boolean", "write true or false"]),
    "override-duplicate-key": (OK, ["train={lr: 1, lr: 2}"], ["override 'train={lr: 1, lr: 2}'", "train.lr: duplicate key"]),
}


@pytest.mark.parametrize("text,overrides,fragments", list(BAD.values()), ids=list(BAD))
def test_bad_config_is_exit_2_with_key_path(monkeypatch, capsys, tmp_path, text, overrides, fragments) -> None:
    code, out, err = _validate(monkeypatch, capsys, tmp_path, text, overrides)
    assert code == 2, err
    flat = _flat(err)
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in stderr:\n{err}"
    assert flat.startswith("error:")
    assert "Traceback" not in err + out
    assert "internal error" not in err
    assert "config OK" not in err
    assert out == ""  # nothing resolved is printed


def test_bad_config_via_python_m(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("train:\n  lrr: 0.1\n", encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "cnnft", "validate", "c.yaml", "train.epochs=abc"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    flat = _flat(res.stderr)
    assert "train.lrr" in flat and "did you mean train.lr" in flat and "train.epochs" in flat
    assert "Traceback" not in res.stderr + res.stdout


def test_valid_config_with_overrides_resolves(monkeypatch, capsys, tmp_path) -> None:
    # validate is a pre-flight check too, so the config names data that exists (digits, packaged)
    text = "name: trial\ndata:\n  dataset: digits\nmodel:\n  backbone: resnet18\ntrain:\n  lr: 0.01\n  epochs: 3\n"
    code, out, err = _validate(monkeypatch, capsys, tmp_path, text, ["train.lr=0.05", "model.backbone=vgg11"])
    assert code == 0, err
    assert "config OK" in err
    resolved = yaml.safe_load(out)
    assert resolved["train"]["lr"] == 0.05
    assert resolved["model"]["backbone"] == "vgg11"
    assert resolved["train"]["epochs"] == 3  # from the file
    assert resolved["name"] == "trial"
    assert resolved["train"]["backbone_lr_scale"] == 0.1  # defaults filled in
    assert resolved["freeze"]["strategy"] == "auto"
    assert resolved["data"]["val_split"] == 0.2
    assert set(resolved) == {"name", "output_dir", "seed", "data", "model", "freeze", "train", "tune"}
    assert "backbone_lr_scale: 0.1" in out


def test_config_load_is_safe_yaml(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.yaml"
    p.write_text('x: !!python/object/apply:os.system ["touch X"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        cfgmod.load(p)
    assert "not valid YAML" in str(ei.value)
    assert not (tmp_path / "X").exists()


def test_yaml_reads_what_it_shows(tmp_path) -> None:
    """Only true/false are booleans, dates and yes/no stay text, 1e-3 is a number, merge keys work."""
    p = tmp_path / "c.yaml"
    p.write_text("name: 2024-05-01\nbase: &base {train: no, val: off}\n", encoding="utf-8")
    assert yamlfile.read_yaml(p) == {"name": "2024-05-01", "base": {"train": "no", "val": "off"}}
    p.write_text("data:\n  train: 2024-05-01\n  download: TRUE\ntrain:\n  lr: 1e-3\n  amp: False\n", encoding="utf-8")
    c = cfgmod.load(p)
    assert (c.data.train, c.data.download, c.train.lr, c.train.amp) == ("2024-05-01", True, 0.001, False)
    assert type(cfgmod.load(p, ["train.lr=1"]).train.lr) is float
    p.write_text("x: &x {lr: 0.1, epochs: 2}\ntrain:\n  <<: *x\n  lr: 0.5\n", encoding="utf-8")
    assert yamlfile.read_yaml(p)["train"] == {"lr": 0.5, "epochs": 2}  # a merge key may be overridden


def test_section_override_merges_into_the_section(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.1\n  device: cpu\n  epochs: 4\n", encoding="utf-8")
    c = cfgmod.load(p, ["train={epochs: 2, optimizer: sgd}"])
    assert (c.train.lr, c.train.device, c.train.epochs, c.train.optimizer) == (0.1, "cpu", 2, "sgd")
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        cfgmod.load(p, ["train={lrr: 2}"])
    with pytest.raises(ConfigError, match="train: must be a mapping"):
        cfgmod.load(p, ["train=5"])

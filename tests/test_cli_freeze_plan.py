"""`cnnft freeze-plan`: the size x similarity table, per-stage plans, and argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cnnft import cli

runner = CliRunner()
RESNET50_PARAMS = 25_557_032  # torchvision resnet50, 1000 classes


def _flat(text: str) -> str:
    """Rich wraps long lines (and draws boxes) at the console width: compare word streams."""
    return " ".join(text.replace("│", " ").split())


def _invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def _json(*args: str) -> dict:
    res = _invoke("freeze-plan", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real entry point (with its error mapping) in-process."""
    monkeypatch.setattr(sys, "argv", ["cnnft", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnft", *args], capture_output=True, text=True, timeout=120)


def test_python_m_help_lists_freeze_plan() -> None:
    res = _python_m("--help")
    assert res.returncode == 0, res.stderr
    assert "freeze-plan" in res.stdout
    assert "Traceback" not in res.stderr


def test_console_script_runs_help_and_freeze_plan() -> None:
    """The installed `cnnft` command (the package's console script, beside this interpreter)."""
    from pathlib import Path

    script = Path(sys.executable).parent / "cnnft"
    assert script.is_file(), f"console script not installed at {script} (pip install -e .)"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "freeze-plan" in res.stdout, res.stderr
    res = subprocess.run([str(script), "freeze-plan", "--size", "small", "--similar", "yes"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "head_only" in res.stdout, res.stderr


def test_python_m_input_error_exit_code() -> None:
    res = _python_m("freeze-plan", "--similar", "yes")
    assert res.returncode == 2
    assert "--size" in _flat(res.stderr)
    assert "Traceback" not in res.stderr + res.stdout


def test_app_help_lists_freeze_plan() -> None:
    res = _invoke("--help")
    assert res.exit_code == 0
    assert "freeze-plan" in res.output
    res = _invoke("freeze-plan", "--help")
    assert res.exit_code == 0
    assert "--similar" in res.output and "--size" in res.output


@pytest.mark.parametrize(
    "size,similar,strategy",
    [("small", "yes", "head_only"), ("small", "no", "freeze_most"), ("large", "yes", "freeze_early"),
     ("large", "no", "full")],
)
def test_quadrants(size: str, similar: str, strategy: str) -> None:
    res = _invoke("freeze-plan", "--size", size, "--similar", similar)
    assert res.exit_code == 0, res.output
    assert f"strategy {strategy}" in _flat(res.output)
    # and no other strategy is named as the choice
    others = {"head_only", "freeze_most", "freeze_early", "full"} - {strategy}
    assert not any(f"strategy {o}" in _flat(res.output) for o in others)
    d = _json("--size", size, "--similar", similar)
    assert (d["strategy"], d["size"], d["similar"]) == (strategy, size, similar == "yes")


def test_resnet50_full_plan_json() -> None:
    d = _json("--size", "large", "--similar", "no", "--model", "resnet50", "--classes", "1000")
    assert {"strategy", "size", "similar", "stages", "trainable_params", "total_params"} <= set(d)
    assert d["strategy"] == "full" and d["size"] == "large" and d["similar"] is False
    names = [s["name"] for s in d["stages"]]
    assert names == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    for s in d["stages"]:
        assert {"name", "frozen", "params", "lr"} <= set(s)
        assert s["frozen"] is False
        assert s["lr"] == pytest.approx(1e-3 if s["name"] == "head" else 1e-4)
    assert sum(s["params"] for s in d["stages"]) == d["total_params"] == RESNET50_PARAMS
    assert d["trainable_params"] == RESNET50_PARAMS
    assert d["stages"][-1]["params"] == 2048 * 1000 + 1000


def test_plan_without_classes_has_a_small_visible_default_head() -> None:
    """Not ImageNet's 1000-class head (2.05 M parameters of resnet50's plan): 2 classes, said so."""
    d = _json("--size", "small", "--similar", "yes", "--model", "resnet50")
    assert d["num_classes"] == 2 and d["classes_defaulted"] is True
    head = d["stages"][-1]
    assert head["params"] == 2048 * 2 + 2 and d["trainable_params"] == head["params"]
    res = _invoke("freeze-plan", "--size", "small", "--similar", "yes", "--model", "resnet50")
    assert res.exit_code == 0 and "resnet50: 2 classes (default; --classes N)" in _flat(res.output)
    d = _json("--size", "small", "--similar", "yes", "--model", "resnet50", "--classes", "7")
    assert d["num_classes"] == 7 and d["classes_defaulted"] is False
    res = _invoke("freeze-plan", "--size", "small", "--similar", "yes", "--model", "resnet50", "--classes", "7")
    assert "resnet50: 7 classes" in _flat(res.output) and "default" not in _flat(res.output)


def _check_resnet18_freeze_most(d: dict, classes: int) -> None:
    assert d["strategy"] == "freeze_most"
    state = {s["name"]: s["frozen"] for s in d["stages"]}
    assert state == {"stem": True, "stage1": True, "stage2": True, "stage3": True, "stage4": False, "head": False}
    head = d["stages"][-1]
    assert head["params"] == 512 * classes + classes
    frozen = [s for s in d["stages"] if s["frozen"]]
    assert all(s["lr"] is None for s in frozen)
    assert d["trainable_params"] == sum(s["params"] for s in d["stages"] if not s["frozen"])
    assert d["total_params"] == sum(s["params"] for s in d["stages"])


def test_resnet18_small_different_plan_with_classes() -> None:
    d = _json("--size", "small", "--similar", "no", "--model", "resnet18", "--classes", "7")
    _check_resnet18_freeze_most(d, 7)


def test_resnet18_small_different_plan_with_images_and_classes() -> None:
    d = _json("--size", "small", "--similar", "no", "--model", "resnet18", "--classes", "7", "--images", "700")
    _check_resnet18_freeze_most(d, 7)
    assert d["size"] == "small"


def test_resnet18_table_output() -> None:
    res = _invoke("freeze-plan", "--size", "small", "--similar", "no", "--model", "resnet18")
    assert res.exit_code == 0, res.output
    out = _flat(res.output)
    assert "strategy freeze_most" in out
    assert "stage4" in out and "frozen" in out and "trainable" in out


@pytest.mark.parametrize(
    "images,size,strategy", [("2000", "small", "head_only"), ("50000", "large", "freeze_early")]
)
def test_size_from_images_per_class(images: str, size: str, strategy: str) -> None:
    d = _json("--images", images, "--classes", "10", "--similar", "yes")
    assert (d["size"], d["strategy"]) == (size, strategy)
    assert d["size_rule"] and images in d["size_rule"]


def test_invalid_size_lists_choices() -> None:
    res = _invoke("freeze-plan", "--size", "medium", "--similar", "yes")
    assert res.exit_code == 2
    out = _flat(res.output)
    assert "medium" in out and "small" in out and "large" in out


def test_invalid_similar() -> None:
    res = _invoke("freeze-plan", "--size", "small", "--similar", "maybe")
    assert res.exit_code == 2
    out = _flat(res.output)
    assert "maybe" in out and "yes" in out and "no" in out


def test_missing_size_and_images(monkeypatch, capsys) -> None:
    code, out, err = _main(monkeypatch, capsys, "freeze-plan", "--similar", "yes")
    assert code == 2
    assert "--size" in _flat(err)
    assert "internal error" not in err and "Traceback" not in err


def test_missing_similar(monkeypatch, capsys) -> None:
    code, out, err = _main(monkeypatch, capsys, "freeze-plan", "--size", "small")
    assert code == 2
    assert "--similar" in _flat(err)
    assert out == ""


def test_images_contradicting_size(monkeypatch, capsys) -> None:
    code, _, err = _main(monkeypatch, capsys, "freeze-plan", "--size", "large", "--images", "100", "--classes",
                         "10", "--similar", "yes")
    assert code == 2
    assert "contradicts" in _flat(err)

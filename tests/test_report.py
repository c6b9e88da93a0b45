"""cnnft report: real PNG figures (not blank), the confusion matrix, and report.md."""

# The page a user opens after a run (grids, curves, hyperparameters, report.html, failed runs):
# tests/test_report_page.py

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _fixtures
from _fixtures import run_cli
from cnnft.recipes import report
from cnnft.errors import InputError

PNGS = ("loss.png", "accuracy.png", "confusion_matrix.png", "confusion_matrix_normalized.png")


@pytest.fixture(scope="session")
def hym_run(tmp_path_factory, hymenoptera) -> dict:
    return _fixtures.hymenoptera_run(tmp_path_factory, hymenoptera)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


def assert_real_figure(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= 300 and h >= 250, (path.name, im.size)
        arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    colours = len(np.unique(arr.reshape(-1, 3), axis=0))
    assert colours > 20, (path.name, colours)  # lines, text, colour map: not a flat canvas
    assert arr.std() > 10, (path.name, arr.std())


@pytest.mark.real
@pytest.mark.slow
def test_report_writes_figures_and_markdown(hym_run, monkeypatch, capsys):
    run_dir = Path(hym_run["run_dir"])
    code, out, err = run_cli(monkeypatch, capsys, "report", run_dir, "--json")
    assert code == 0, err
    res = json.loads(out)
    folder = run_dir / "report"
    for name in PNGS:
        assert_real_figure(folder / name)
    md = (folder / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in md
    assert "head_only" in md and "efficientnet_lite0" in md
    assert f"{hym_run['best_val_acc']:.2%} (epoch {hym_run['best_epoch']})" in md
    assert f"{hym_run['trainable_params']:,} of {hym_run['total_params']:,}" in md
    assert res["best_val_acc"] == hym_run["best_val_acc"] and res["epochs"] == 2
    assert res["eval_accuracy"] == hym_run["best_val_acc"]
    assert (run_dir / "eval" / "val" / "metrics.json").is_file()


def test_report_evaluates_when_no_evaluation_exists(tiny_run, tmp_path):
    run_dir = tmp_path / "tiny"  # a copy: other tests may have evaluated the shared run
    shutil.copytree(tiny_run["run_dir"], run_dir, ignore=shutil.ignore_patterns("eval", "report"))
    messages: list[str] = []
    res = report.write_report(run_dir, log=messages.append).to_dict()
    assert any("evaluating" in m for m in messages)
    assert (run_dir / "eval" / "val" / "confusion_matrix.png").is_file()
    for name in PNGS:
        assert_real_figure(run_dir / "report" / name)
    assert res["strategy"] == tiny_run["strategy"]

    messages.clear()
    report.write_report(run_dir, log=messages.append)  # second time: the evaluation is reused
    assert not any("evaluating" in m for m in messages)


def test_report_needs_a_run_folder(tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match="metrics.csv"):
        report.write_report(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "report", tmp_path)
    assert code == 2 and "run folder" in err

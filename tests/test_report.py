"""cnnft report: real PNG figures (not blank), the confusion matrix, and report.md."""

# The page a user opens after a run (grids, curves, hyperparameters, report.html, failed runs):
# tests/test_report_page.py

from __future__ import annotations

import json
import shutil
from pathlib import Path

import _fixtures
import numpy as np
import pytest
from _fixtures import run_cli
from PIL import Image

from cnnft.errors import InputError
from cnnft.recipes import report

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


def _copy_run(tiny_run, dest: Path) -> Path:
    shutil.copytree(tiny_run["run_dir"], dest, ignore=shutil.ignore_patterns("report"))
    return dest


def test_report_of_a_failed_run_reports_what_exists(tiny_run, tmp_path, monkeypatch, capsys):
    from cnnft.errors import TrainingFailed
    from cnnft.results.rundir import RunDir
    from cnnft.run import folder as _run

    run_dir = _copy_run(tiny_run, tmp_path / "failed")
    history = [{"epoch": 1, "val_acc": tiny_run["best_val_acc"], "wall_seconds": 1.5}]
    with pytest.raises(TrainingFailed):  # the summary.json a run that dies in epoch 2 writes
        with _run.failed_summary(RunDir(run_dir), history, lambda m: None):
            raise TrainingFailed("loss became nan at epoch 2, step 1", hint="lower train.lr")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    code, out, err = run_cli(monkeypatch, capsys, "report", run_dir, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["status"] == "failed" and "loss became nan" in res["error"] and res["best_epoch"] == 1
    md = (run_dir / "report" / "report.md").read_text()
    assert "| status | failed: loss became nan at epoch 2" in md
    for name in PNGS:
        assert_real_figure(run_dir / "report" / name)


def test_report_of_an_interrupted_run_says_so(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path / "stopped")
    (run_dir / "summary.json").unlink()
    messages: list[str] = []
    res = report.write_report(run_dir, log=messages.append)
    assert res.status == "interrupted" and res.best_epoch == 1 and res.wall_seconds > 0  # from metrics.csv
    assert any("interrupted after 1 epoch" in m for m in messages)


def test_report_copies_only_the_run_folders_own_figures(tiny_run, tmp_path):
    """A doctored RUN/eval/val must not make the report copy files from elsewhere into report/."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    run_dir = _copy_run(tiny_run, tmp_path / "doctored")
    report.write_report(run_dir, log=lambda m: None)  # writes eval/val and a report
    ev_dir = run_dir / "eval" / "val"
    meta = json.loads((ev_dir / "metrics.json").read_text())
    meta["files"]["confusion_png"] = meta["files"]["confusion_normalized_png"] = str(secret)
    (ev_dir / "metrics.json").write_text(json.dumps(meta))
    (ev_dir / "confusion_matrix_normalized.png").unlink()
    (ev_dir / "confusion_matrix_normalized.png").symlink_to(secret)
    report.write_report(run_dir, log=lambda m: None)
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png"):
        assert b"root:x" not in (run_dir / "report" / name).read_bytes()
        assert_real_figure(run_dir / "report" / name)
    assert secret.read_text().startswith("root:x")  # re-evaluating replaced the link, not its target

"""cnnft report as the page to open after a run: image grids, curves, hyperparameters,
confusion matrices, the self-contained report.html (rendered in headless Chromium), and
reports of failed or interrupted runs. Pictures are checked for what they show (tile counts,
titles naming the run), not only for not being blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import _fixtures
import numpy as np
import pytest
from PIL import Image

from cnnft.data import folders as data
from cnnft.errors import DataError
from cnnft.recipes import report
from cnnft.results import plots
from cnnft.results import report_data as _report_data


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


@pytest.fixture
def run_dir(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run (checkpoints hard-linked), already reported once."""
    dst = tmp_path / "tiny"

    def copy(src, dst):  # checkpoints are only read: link them; the files tests edit are copied
        return os.link(src, dst) if src.endswith(".pt") else shutil.copy2(src, dst)

    shutil.copytree(tiny_run["run_dir"], dst, ignore=shutil.ignore_patterns("eval", "report"), copy_function=copy)
    report.write_report(dst, log=lambda m: None)
    return dst


def _data_root(run: Path) -> Path:
    return Path(re.search(r"^  train: (.+)$", (run / "config.yaml").read_text(), re.M).group(1))


def _rewrite_eval(run: Path, **changes) -> None:
    """Change the run's stored evaluation (at its known place) and drop predictions.csv."""
    path = run / "eval" / "val" / "metrics.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    (run / "eval" / "val" / "predictions.csv").unlink(missing_ok=True)


def _errors(root: Path, n: int) -> list[dict]:
    files = sorted((root / "a").glob("*.png"))[:n]
    return [{"path": str(f), "true": "a", "pred": "b", "prob": 0.9 - i / 100, "prob_true": 0.1} for i, f in enumerate(files)]


def _png_title(path: Path) -> str:
    with Image.open(path) as im:
        return im.text.get("Title", "")


def _colours(path: Path) -> tuple[int, float]:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    non_white = float((arr < 245).any(-1).mean())
    return len(np.unique(arr.reshape(-1, 3), axis=0)), non_white


def test_error_grid_has_a_tile_per_listed_error(run_dir):
    _rewrite_eval(run_dir, confident_errors=_errors(_data_root(run_dir), 6))
    res = report.write_report(run_dir, log=lambda m: None)
    assert res.confident_errors_shown == res.error_tiles == 6
    md = (run_dir / "report" / "report.md").read_text()
    table = md.split("### Most confidently wrong")[1].split("###")[0]
    assert len([ln for ln in table.splitlines() if ln.startswith("| /")]) == 6
    assert "](top_errors.png)" in md
    with Image.open(run_dir / "report" / "top_errors.png") as im:
        assert im.size[1] > im.size[0] / 2  # 6 tiles at 4 per row: two rows
    colours, _ = _colours(run_dir / "report" / "top_errors.png")
    assert colours > 500  # the random-pixel thumbnails are really drawn, not grey placeholders


def test_error_grid_is_capped_and_empty_without_errors(run_dir):
    _rewrite_eval(run_dir, confident_errors=_errors(_data_root(run_dir), 6) * 4)
    res = report.write_report(run_dir, log=lambda m: None)
    assert res.confident_errors_shown == res.error_tiles == report.ERRORS_SHOWN
    _rewrite_eval(run_dir, confident_errors=[])
    res = report.write_report(run_dir, log=lambda m: None)
    assert res.error_tiles == 0 and "### Most confidently wrong" not in (run_dir / "report" / "report.md").read_text()


def test_confused_pairs_grid(run_dir):
    root = _data_root(run_dir)
    errors = _errors(root, 3) + [{"path": str(sorted((root / "b").glob("*.png"))[0]), "true": "b", "pred": "a",
                                  "prob": 0.6, "prob_true": 0.4}]
    _rewrite_eval(run_dir, confident_errors=errors, confusion_matrix=[[1, 3], [1, 1]])
    res = report.write_report(run_dir, log=lambda m: None)
    assert [(p["true"], p["pred"], p["count"]) for p in res.confused_pairs] == [("a", "b", 3), ("b", "a", 1)]
    assert [p["examples"] for p in res.confused_pairs] == [3, 1] and res.pair_tiles == 4
    assert "| a | b | 3 |" in (run_dir / "report" / "report.md").read_text()
    assert res.run in _png_title(run_dir / "report" / "confused_pairs.png")


def test_confused_pairs_order_and_skip_empty_cells():
    pairs = _report_data.confused_pairs([[5, 0, 2], [4, 5, 0], [0, 0, 9]], ["x", "y", "z"], 4)
    assert pairs == [{"true": "y", "pred": "x", "count": 4}, {"true": "x", "pred": "z", "count": 2}]


def test_every_figure_is_titled_with_the_run_model_and_best_accuracy(run_dir, tiny_run):
    res = report.write_report(run_dir, log=lambda m: None)
    pngs = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert pngs == sorted(f"{k}.png" for k in res.titles)
    for name in pngs:
        title = _png_title(run_dir / "report" / name)
        assert title == res.titles[name[:-4]]
        assert "tiny" in title and "resnet18" in title and f"{res.best_val_acc:.1%}" in title, (name, title)


def test_curves_fix_accuracy_axis_and_draw_lr_groups_and_phases(run_dir, monkeypatch):
    metrics = run_dir / "metrics.csv"
    lines = metrics.read_text().splitlines()
    row = lines[1].split(",")
    rows = [",".join([str(e), *row[1:]]) + f",{ph}" for e, ph in ((1, "head"), (2, "head"), (3, "full"), (4, "full"))]
    metrics.write_text("\n".join([lines[0] + ",phase", *rows]) + "\n")
    calls = {}
    real = plots.curve
    monkeypatch.setattr(plots, "curve", lambda path, *a, **kw: calls.setdefault(Path(path).stem, kw) and real(path, *a, **kw))
    res = report.write_report(run_dir, log=lambda m: None)
    assert set(calls) == {"loss", "accuracy", "learning_rate"}
    assert calls["accuracy"]["ylim"] == (0.0, 1.0) and calls["loss"]["ylim"] is None
    assert all(kw["phases"] == [(3, "full")] for kw in calls.values())
    assert res.epochs == 4 and "learning_rate.png" in res.files
    assert _report_data.phase_starts([{"epoch": 1.0, "lr_head": 0.1}]) == []


def test_learning_rate_series_per_group(run_dir):
    history = _report_data.read_history(run_dir / "metrics.csv")
    groups = [k[3:] for k in history[0] if k.startswith("lr_")]
    assert groups == ["head", "backbone"]
    colours, non_white = _colours(run_dir / "report" / "learning_rate.png")
    assert colours > 20 and non_white > 0.02


def test_hyperparameter_table(run_dir, tiny_run):
    res = report.write_report(run_dir, log=lambda m: None)
    hp = res.hyperparameters
    for key in ("model", "strategy", "lr / backbone lr", "augmentation", "image size", "batch size", "epochs",
                "images", "wall time", "images/s (training)"):
        assert key in hp, key
    assert hp["model"] == "resnet18, weights: none" and hp["strategy"].startswith(tiny_run["strategy"])
    assert hp["image size"] == "32 px" and hp["batch size"] == "4" and hp["augmentation"] == "mild"
    assert hp["epochs"] == "1 of 1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [c["class"] for c in res.class_counts] == ["a", "b"]
    assert sum(c["train"] for c in res.class_counts) == summary["train_images"]
    assert sum(c["val"] for c in res.class_counts) == summary["val_images"]
    md = (run_dir / "report" / "report.md").read_text()
    assert "| batch size | 4 |" in md and "| a | 5 | 1 |" in md


def test_confusion_colour_bar_is_the_matrix_height():
    fig = plots._figure(9, 4)
    ax = fig.subplots()
    cax = plots._draw_confusion(fig, ax, np.array([[3, 1, 0], [2, 5, 1], [0, 0, 4]]), ["x", "y", "z"], True)
    fig.canvas.draw()
    a, c = ax.get_window_extent(), cax.get_window_extent()
    assert abs(a.height - c.height) <= 1 and abs(a.y0 - c.y0) <= 1
    assert a.width < 0.8 * 9 * plots.DPI  # the wide figure did not stretch the square matrix


def test_confusion_matrices_side_by_side(run_dir):
    path = run_dir / "report" / "confusion_matrices.png"
    with Image.open(path) as im:
        assert im.size[0] > 1.6 * im.size[1]
    with Image.open(run_dir / "report" / "confusion_matrix.png") as im:
        assert im.size[0] < 1.5 * im.size[1]


def test_report_html_is_self_contained(run_dir):
    res = report.write_report(run_dir, log=lambda m: None)
    text = (run_dir / "report" / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in text and "<script" not in text
    assert len(srcs) == 7  # loss, accuracy, lr, confusion matrices, reliability, errors, confused pairs
    assert "<title>cnnft report: tiny</title>" in text and f"{res.best_val_acc:.2%}" in text
    for key in res.hyperparameters:
        assert f"<td>{key}</td>" in text.replace("&#x27;", "'").replace("&amp;", "&")


def test_doctored_metrics_json_opens_nothing_outside_the_run(run_dir, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.mkdir()
    outside = secret / "private.png"
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(outside)
    root = _data_root(run_dir)
    d = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    d["files"] = {k: str(outside) for k in d["files"]}
    sneaky = [str(outside), str(root / "a" / ".." / ".." / "secret" / "private.png"), "/etc/passwd"]
    _rewrite_eval(run_dir, files=d["files"], confident_errors=[
        {"path": p, "true": "a", "pred": "b", "prob": 0.9, "prob_true": 0.1} for p in sneaky])
    opened = []
    real_open = data.open_image
    monkeypatch.setattr(data, "open_image", lambda p, *a: opened.append(str(p)) or real_open(p, *a))
    res = report.write_report(run_dir, log=lambda m: None)
    assert opened == [] and res.error_tiles == 3  # grey "unavailable" tiles
    assert (run_dir / "report" / "confusion_matrix.png").read_bytes() != outside.read_bytes()
    access = _report_data.ImageAccess(report._read_config(report.RunDir(run_dir)), ["a", "b"])
    assert access.allowed(str(root / "a" / "0.png")) and not access.allowed(sneaky[1])


def test_report_of_a_failed_run(run_dir):
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "failed", "error": "loss is NaN at epoch 2", "run_dir": str(run_dir), "best_val_acc": None,
        "best_epoch": None, "epochs_completed": 1, "wall_seconds": None, "checkpoints": {}}))
    res = report.write_report(run_dir, log=lambda m: None)
    assert res.status == "failed" and res.error == "loss is NaN at epoch 2"
    assert res.best_epoch == 1 and res.wall_seconds is not None  # from metrics.csv
    md = (run_dir / "report" / "report.md").read_text()
    assert "| status | failed: loss is NaN at epoch 2 |" in md
    assert 'class="status failed"' in (run_dir / "report" / "report.html").read_text()


def test_report_of_an_interrupted_run_without_checkpoint_or_data(run_dir, tmp_path):
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "eval")
    shutil.rmtree(run_dir / "report")
    (run_dir / "checkpoints" / "best.pt").unlink()
    messages = []
    res = report.write_report(run_dir, log=messages.append)
    assert res.status == "interrupted" and res.eval_accuracy is None and "best checkpoint" in res.eval_error
    names = sorted(p.name for p in (run_dir / "report").iterdir())
    assert names == ["accuracy.png", "learning_rate.png", "loss.png", "report.html", "report.md"]
    assert sorted(res.files) == names
    assert "not available" in (run_dir / "report" / "report.md").read_text()


def test_report_when_the_data_is_gone(run_dir, monkeypatch):
    shutil.rmtree(run_dir / "eval")

    def gone(*a, **kw):
        raise DataError("the run's validation data cannot be loaded: data.train: no such folder")

    monkeypatch.setattr(report, "evaluate", gone)
    messages = []
    res = report.write_report(run_dir, log=messages.append)
    assert res.eval_accuracy is None and "cannot be loaded" in res.eval_error and "report.html" in res.files
    assert any("no evaluation in the report" in m for m in messages)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    shot = tmp_path / "shot.png"
    page = (run_dir / "report" / "report.html").resolve()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3000",
                    f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    colours, non_white = _colours(shot)
    assert colours > 200, colours  # text alone is a few grey levels; the plots and thumbnails add many
    assert non_white > 0.05, non_white
    with Image.open(shot) as im:  # the embedded pictures decoded: the colour map's blues are on the page
        arr = np.asarray(im.convert("RGB")).astype(int)
    blue = (arr[..., 2] - arr[..., 0] > 60).mean()
    assert blue > 0.002, blue

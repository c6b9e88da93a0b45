"""``cnnft report NAME-tune``: the search's section (every trial, the winner beside the default
plan, selection and test scores, the plots) above the winner's run report, in one page; a
doctored tune_summary.json is refused naming its field."""

from __future__ import annotations

import html as _html
import json
import re
import shutil
from pathlib import Path

import pytest
from _fixtures import run_cli
from _robust import make_dataset

from cnnft.errors import InputError
from cnnft.recipes import report
from cnnft.recipes import train as train_recipe
from cnnft.recipes import tune as tune_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune-report")
    classes = ("a", "b", "c")
    make_dataset(root / "train", classes=classes, n=8)
    make_dataset(root / "test", classes=classes, n=4, seed=7)
    overrides = [f"data.train={root / 'train'}", f"data.test={root / 'test'}", "model.backbone=lenet5",
                 "model.weights=none", "data.num_workers=0", "data.batch_size=8", "train.epochs=2",
                 f"output_dir={root / 'runs'}", "name=s"]
    summary = tune_recipe.tune(None, overrides, budget="10m", train=train_recipe.train, trials=3, log=lambda m: None)
    return Path(summary["tune_dir"])


def _copy(search: Path, dest: Path) -> Path:
    return Path(shutil.copytree(search, dest / search.name, symlinks=True))


def test_a_tune_folder_reports_its_search_above_the_winner(search, tmp_path, monkeypatch, capsys):
    folder = _copy(search, tmp_path)
    summary = json.loads((folder / "tune_summary.json").read_text())
    code, out, err = run_cli(monkeypatch, capsys, "report", folder, "--json")
    assert code == 0, err
    rep = json.loads(out)
    tune = rep["tune"]
    assert tune["winner"] == summary["best"]["number"] and tune["trials_run"] == summary["trials_run"] == 3
    assert tune["test_accuracy"] == summary["test"]["accuracy"]
    assert Path(tune["winner_run"]).parent == folder / "trials"
    assert rep["run"] == Path(summary["best"]["run_dir"]).name  # the rest of the page is the winner's report

    md = (folder / "report" / "report.md").read_text()
    assert md.startswith(f"# Tune report: {folder.name}")
    assert md.index("## Search") < md.index("## The winner") < md.index("## Training curves")
    rows = [line for line in md.splitlines() if re.match(r"^\| \d+( \*)? \|", line)]
    assert len(rows) == len(summary["trials"]), "one row per trial"
    assert [r for r in rows if r.startswith(f"| {summary['best']['number']} * |")], "the winner is marked"
    assert "default plan: " in md and "optimistic" in md and f"{summary['test']['accuracy']:.4f}" in md
    for plot in ("optimization_history.png", "param_importances.png"):
        if (folder / plot).is_file():
            assert f"]({plot})" in md and (folder / "report" / plot).is_file()
    page = (folder / "report" / "report.html").read_text()
    assert "<h2>Search</h2>" in page
    embedded = page.count("data:image/png;base64,")
    assert embedded >= 3 + len(tune["plots"]), "curves and the search's plots are embedded"


def test_the_summary_is_checked_before_anything_is_read(search, tmp_path):
    folder = _copy(search, tmp_path)
    good = json.loads((folder / "tune_summary.json").read_text())
    outside = tmp_path / "elsewhere"
    shutil.copytree(Path(good["best"]["run_dir"]) if Path(good["best"]["run_dir"]).is_dir()
                    else folder / "trials" / Path(good["best"]["run_dir"]).name, outside)
    for field, doctor in (
        ("best.run_dir", lambda s: s["best"].update(run_dir=str(outside))),  # a folder outside the search
        ("best.run_dir", lambda s: s["best"].update(run_dir="../..")),
        ("best.value", lambda s: s["best"].update(value="0.99")),
        ("trials_run", lambda s: s.update(trials_run=-1)),
        ("trials[0].params", lambda s: s["trials"][0].update(params={"lr": [1, 2]})),
        ("trials", lambda s: s.update(trials="all")),
    ):
        doctored = json.loads(json.dumps(good))
        doctor(doctored)
        (folder / "tune_summary.json").write_text(json.dumps(doctored))
        with pytest.raises(InputError, match=re.escape(field)):
            report.write_report(folder, log=lambda m: None)
    assert not (folder / "report").exists(), "nothing written for a refused summary"


def test_a_search_without_a_winner_says_so(search, tmp_path, monkeypatch, capsys):
    folder = _copy(search, tmp_path)
    s = json.loads((folder / "tune_summary.json").read_text())
    s["best"] = None
    (folder / "tune_summary.json").write_text(json.dumps(s))
    code, _, err = run_cli(monkeypatch, capsys, "report", folder)
    assert code == 2 and "no trial of this search has completed" in err and "--resume" in err


def test_text_from_the_summary_is_escaped_in_the_page(search, tmp_path):
    folder = _copy(search, tmp_path)
    s = json.loads((folder / "tune_summary.json").read_text())
    s["objective"] = "<script>alert(1)</script>"
    s["trials"][0]["params"]["augment"] = "<img src=x onerror=alert(1)>"
    (folder / "tune_summary.json").write_text(json.dumps(s))
    report.write_report(folder, log=lambda m: None)
    page = (folder / "report" / "report.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert _html.escape("<script>alert(1)</script>") in page

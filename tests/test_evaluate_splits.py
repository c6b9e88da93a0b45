"""evaluate's data: the run's validation set (limited, and saying so, when training was),
its data.test folder reported apart from val, or a whole --data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import _fixtures
from _fixtures import run_cli
from cnnft.recipes import train as train_recipe


def _overrides(base: Path, train: Path, **extra) -> list[str]:
    return [f"data.train={train}", "data.image_size=32", "data.num_workers=0", "data.batch_size=4",
            "model.backbone=lenet5", "model.weights=none", "train.epochs=1", "train.device=cpu",
            f"output_dir={base / 'runs'}", *(f"{k}={v}" for k, v in extra.items())]


@pytest.fixture(scope="module")
def limited_run(tmp_path_factory) -> dict:
    """lenet5 trained on at most 3 images per class of 8, with a 5-per-class test folder."""
    base = tmp_path_factory.mktemp("splits")
    train = _fixtures.random_image_folder(base / "train", per_class=8, size=24)
    test = _fixtures.random_image_folder(base / "test", per_class=5, size=24, seed=1)
    summary = train_recipe.train(None, _overrides(base, train, name="limited", **{
        "data.limit_per_class": 3, "data.test": test}), log=lambda m: None).to_dict()
    return {"summary": summary, "train": train, "test": test}


def _evaluate(monkeypatch, capsys, *args) -> tuple[dict, str]:
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", *args, "--json", "--device", "cpu")
    assert code == 0, err
    return json.loads(out), err


@pytest.mark.slow
def test_train_reports_the_whole_test_set_apart_from_val(limited_run, monkeypatch, capsys):
    s = limited_run["summary"]
    assert s["val_images"] == 2 and s["train_images"] == 4  # limited: 3 per class, 1 of them held out
    assert s["test_images"] == 10 and 0 <= s["test_acc"] <= 1  # never limited
    run = Path(s["run_dir"])
    assert json.loads((run / "summary.json").read_text())["test_acc"] == s["test_acc"]
    res, _ = _evaluate(monkeypatch, capsys, run, "--split", "test")
    assert res["split"] == "test" and res["data_name"] == "test" and res["images"] == 10
    assert res["accuracy"] == pytest.approx(s["test_acc"]) and res["note"] is None
    assert Path(res["out_dir"]) == run / "eval" / "test"


@pytest.mark.slow
def test_evaluate_says_the_val_set_is_limited_and_data_evaluates_a_whole_folder(limited_run, monkeypatch, capsys):
    run = limited_run["summary"]["run_dir"]
    res, err = _evaluate(monkeypatch, capsys, run)
    assert res["split"] == "val" and res["images"] == 2
    assert "data.limit_per_class=3" in res["note"] and "--data" in res["note"] and "limit_per_class" in err
    res, _ = _evaluate(monkeypatch, capsys, run, "--data", limited_run["train"])
    assert res["images"] == 16 and res["split"] is None and res["note"] is None


def test_split_test_without_a_test_set_says_what_to_do(tmp_path, monkeypatch, capsys):
    train = _fixtures.random_image_folder(tmp_path / "train", per_class=3, size=24)
    run = train_recipe.train(None, _overrides(tmp_path, train, name="plain"), log=lambda m: None).run_dir
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", run, "--split", "test")
    assert code == 2 and "data.test" in err and "--data" in err
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", run, "--split", "tset")
    assert code == 2 and "tset" in err


def test_a_test_folder_with_other_classes_stops_before_training(tmp_path):
    from cnnft.errors import DataError

    train = _fixtures.random_image_folder(tmp_path / "train", per_class=3, size=24)
    test = _fixtures.random_image_folder(tmp_path / "test", classes=("a", "c"), per_class=2, size=24)
    with pytest.raises(DataError, match="data.test.*missing in test: b.*only in test: c"):
        train_recipe.train(None, _overrides(tmp_path, train, name="bad", **{"data.test": test}), log=lambda m: None)
    assert not (tmp_path / "runs").exists()

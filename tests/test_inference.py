"""evaluate, predict and extract on a trained run: exact reproduction of the run's figures,
per-file error reporting, and features good enough for a linear classifier."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import _fixtures
from _fixtures import run_cli
from cnnft.recipes import evaluate, extract, predict
from cnnft.errors import DataError

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="session")
def hym_run(tmp_path_factory, hymenoptera) -> dict:
    return _fixtures.hymenoptera_run(tmp_path_factory, hymenoptera)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def hym_eval(hym_run) -> dict:
    return evaluate.evaluate(hym_run["run_dir"], **QUIET).to_dict()


# ---------------------------------------------------------------------------- evaluate

@pytest.mark.real
@pytest.mark.slow
def test_evaluate_reproduces_the_runs_best_val_accuracy(hym_run, hym_eval):
    print(f"evaluate best.pt: acc {hym_eval['accuracy']:.4f}, run best_val_acc {hym_run['best_val_acc']:.4f}")
    assert hym_eval["accuracy"] == hym_run["best_val_acc"]  # exactly: same split, preprocessing, batches
    assert hym_eval["images"] == 153
    cm = np.array(hym_eval["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == 153
    assert hym_eval["top5_accuracy"] is None  # only 2 classes
    summary = json.loads((Path(hym_run["run_dir"]) / "summary.json").read_text())
    assert hym_eval["epoch"] == summary["best_epoch"]
    with open(Path(hym_run["run_dir"]) / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    best = next(r for r in metrics if int(r["epoch"]) == summary["best_epoch"])  # epoch 0: the head phase
    assert hym_eval["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-6)
    out = Path(hym_eval["out_dir"])
    assert out == Path(hym_run["run_dir"]) / "eval" / "val"
    for name in ("metrics.json", "predictions.csv", "per_class.csv", "confusion_matrix.csv",
                 "confusion_matrix_normalized.csv", "confusion_matrix.png", "confusion_matrix_normalized.png",
                 "confident_errors.csv"):
        assert (out / name).is_file(), name


@pytest.mark.real
@pytest.mark.slow
def test_evaluate_per_class_metrics_match_sklearn(hym_eval):
    from sklearn.metrics import classification_report

    with open(Path(hym_eval["out_dir"]) / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 153
    y_true = [r["true"] for r in rows]
    y_pred = [r["pred"] for r in rows]
    ref = classification_report(y_true, y_pred, labels=hym_eval["classes"], output_dict=True, zero_division=0)
    for r in hym_eval["per_class"]:
        for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert r[key] == pytest.approx(ref[r["class"]][ref_key], abs=1e-12)
        assert r["support"] == ref[r["class"]]["support"]
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert hym_eval[ours][key] == pytest.approx(ref[theirs][ref_key], abs=1e-12)
    assert ref["accuracy"] == pytest.approx(hym_eval["accuracy"], abs=1e-12)


@pytest.mark.real
@pytest.mark.slow
def test_evaluate_lists_confident_errors_and_matrix_csv(hym_eval):
    errors = hym_eval["confident_errors"]
    wrong = int(np.array(hym_eval["confusion_matrix"]).sum() - np.trace(np.array(hym_eval["confusion_matrix"])))
    assert len(errors) == min(wrong, evaluate.CONFIDENT_ERRORS)
    assert all(e["true"] != e["pred"] for e in errors)
    probs = [e["prob"] for e in errors]
    assert probs == sorted(probs, reverse=True) and all(0.5 <= p <= 1 for p in probs)
    with open(hym_eval["files"]["confusion_csv"], newline="") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == hym_eval["classes"]
    assert [[int(v) for v in row[1:]] for row in table[1:]] == hym_eval["confusion_matrix"]
    norm = np.array(hym_eval["confusion_matrix_normalized"])
    assert np.allclose(norm.sum(1), 1.0, atol=1e-5)


@pytest.mark.real
@pytest.mark.slow
def test_evaluate_cli_on_a_folder(hym_run, hymenoptera, tmp_path, monkeypatch, capsys):
    data = tmp_path / "subset"
    for cls in ("ants", "bees"):
        (data / cls).mkdir(parents=True)
        for p in sorted((hymenoptera / "val" / cls).glob("*.jpg"))[:3]:
            shutil.copy(p, data / cls / p.name)
    (data / "bees" / "broken.jpg").write_text("not an image")
    best = Path(hym_run["checkpoints"]["best"])
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", best, "--data", data, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["images"] == 6 and sum(map(sum, res["confusion_matrix"])) == 6
    assert [s["path"].endswith("broken.jpg") for s in res["skipped"]] == [True]
    assert Path(res["out_dir"]) == Path(hym_run["run_dir"]) / "eval" / "subset"
    assert "broken.jpg" in err

    code, out, _ = run_cli(monkeypatch, capsys, "evaluate", best, "--data", data, "--out", tmp_path / "ev")
    assert code == 0
    assert "accuracy" in out and "per class" in out and (tmp_path / "ev" / "metrics.json").is_file()


def test_evaluate_refuses_a_folder_with_other_classes(tiny_run, tmp_path, monkeypatch, capsys):
    other = _fixtures.random_image_folder(tmp_path / "other", classes=("a", "zebra"), per_class=2)
    with pytest.raises(DataError, match="zebra"):
        evaluate.evaluate(tiny_run["run_dir"], data_dir=other, **QUIET)
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", tiny_run["run_dir"], "--data", other)
    assert code == 2 and "zebra" in err and "missing: b" in err


def test_evaluate_tiny_run_matches_its_summary(tiny_run):
    res = evaluate.evaluate(tiny_run["checkpoints"]["best"], **QUIET).to_dict()
    assert res["accuracy"] == tiny_run["best_val_acc"]
    assert res["images"] == tiny_run["val_images"]


@pytest.mark.slow
def test_evaluate_packaged_dataset_run_with_top5(tmp_path):
    from cnnft.recipes import train as train_recipe

    summary = train_recipe.train(None, ["data.dataset=digits", "model.backbone=lenet5", "train.epochs=1", "train.lr=0.01",
                               "data.num_workers=0", "data.augment=none", "data.batch_size=64",
                               f"output_dir={tmp_path}"], log=lambda m: None).to_dict()
    res = evaluate.evaluate(summary["run_dir"], **QUIET).to_dict()
    assert res["accuracy"] == summary["best_val_acc"] and res["images"] == summary["val_images"]
    assert res["accuracy"] <= res["top5_accuracy"] <= 1.0
    assert res["confident_errors"][0]["path"].startswith("digits:")
    assert np.array(res["confusion_matrix"]).shape == (10, 10)


# ----------------------------------------------------------------------------- predict

@pytest.mark.real
@pytest.mark.slow
def test_predict_ants_folder_one_row_per_image_probs_sum_to_one(hym_run, hymenoptera):
    ants = hymenoptera / "val" / "ants"
    res = predict.predict(hym_run["run_dir"], [ants], top_k=5, **QUIET).to_dict()
    files = sorted(p for p in ants.rglob("*") if p.is_file())
    assert res["top_k"] == 2  # clamped to the number of classes
    assert [r["path"] for r in res["predictions"]] == [str(p) for p in files]
    assert res["failed"] == 0
    for r in res["predictions"]:
        assert r["error"] is None
        assert abs(sum(p["prob"] for p in r["top_k"]) - 1.0) <= 1e-5
        assert r["class"] == r["top_k"][0]["class"] and r["top_k"][0]["prob"] >= r["top_k"][1]["prob"]
    share = sum(r["class"] == "ants" for r in res["predictions"]) / len(files)
    print(f"predict val/ants: {len(files)} images, {share:.3f} predicted ants")
    assert share > 0.8


@pytest.mark.real
@pytest.mark.slow
def test_predict_reports_unreadable_files_without_failing(hym_run, hymenoptera, tmp_path, monkeypatch, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:3]:
        shutil.copy(p, mixed / p.name)
    (mixed / "x.jpg").write_text("this is text, not a JPEG")
    (mixed / "notes.txt").write_text("not an image type: never picked up from a folder")

    code, out, err = run_cli(monkeypatch, capsys, "predict", hym_run["run_dir"], mixed, "--json", "--batch-size", "2")
    assert code == 0, err
    rows = json.loads(out)["predictions"]
    assert len(rows) == 4
    bad = [r for r in rows if r["error"]]
    assert [Path(r["path"]).name for r in bad] == ["x.jpg"] and bad[0]["top_k"] == []
    assert "x.jpg" in err
    assert all(abs(sum(p["prob"] for p in r["top_k"]) - 1) <= 1e-5 for r in rows if not r["error"])

    code, out, err = run_cli(monkeypatch, capsys, "predict", hym_run["run_dir"], mixed, "--csv", "--top-k", "1")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "path,class,prob,error" and len(lines) == 5
    assert any(line.startswith(str(mixed / "x.jpg")) and "cannot decode" in line for line in lines)

    code, _, err = run_cli(monkeypatch, capsys, "predict", hym_run["run_dir"], mixed / "x.jpg")
    assert code == 2 and "none of the 1 file(s)" in err


def test_collect_images_walks_folders_and_keeps_explicit_files(tmp_path):
    root = _fixtures.random_image_folder(tmp_path / "imgs", per_class=2)
    (root / "a" / "deep").mkdir()
    (root / "a" / "deep" / "z.png").write_bytes((root / "a" / "0.png").read_bytes())
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.png").write_bytes(b"")
    (root / "readme.md").write_text("x")
    found = predict.collect_images([root, tmp_path / "missing.jpg", root / "a" / "0.png"])
    names = [str(Path(p).relative_to(tmp_path)) for p in found]
    assert names == ["imgs/a/0.png", "imgs/a/1.png", "imgs/a/deep/z.png", "imgs/b/0.png", "imgs/b/1.png",
                     "missing.jpg"]


# ----------------------------------------------------------------------------- extract

@pytest.mark.real
@pytest.mark.slow
def test_extract_pretrained_features_with_logistic_regression(hymenoptera, tmp_path, monkeypatch, capsys):
    from sklearn.linear_model import LogisticRegression

    code, out, err = run_cli(monkeypatch, capsys, "extract", "efficientnet_lite0", "--data", hymenoptera / "train",
                             "--out", tmp_path / "train.npz", "--workers", "1")
    assert code == 0, err
    res = extract.extract("efficientnet_lite0", hymenoptera / "val", tmp_path / "val.npz", num_workers=1,
                          **QUIET).to_dict()
    assert res["images"] == 153 and res["feature_dim"] == 1280

    train, val = np.load(tmp_path / "train.npz"), np.load(tmp_path / "val.npz")
    assert set(train.files) >= {"features", "labels", "classes", "paths"}
    assert train["features"].shape == (len(train["labels"]), 1280) and train["features"].dtype == np.float32
    assert list(train["classes"]) == ["ants", "bees"] == list(val["classes"])
    assert len(train["paths"]) == len(train["labels"]) and str(train["paths"][0]).endswith(".jpg")
    clf = LogisticRegression(max_iter=2000).fit(train["features"], train["labels"])
    acc = clf.score(val["features"], val["labels"])
    print(f"extract efficientnet_lite0 + LogisticRegression: val accuracy {acc:.4f}")
    assert acc >= 0.93


def test_extract_from_a_checkpoint_uses_the_head_input(tiny_run, tmp_path):
    data = _fixtures.random_image_folder(tmp_path / "d", per_class=3, seed=1)
    (data / "a" / "bad.png").write_text("nope")
    res = extract.extract(tiny_run["run_dir"], data, tmp_path / "f" / "feats.npz", batch_size=4, **QUIET).to_dict()
    npz = np.load(tmp_path / "f" / "feats.npz")
    assert res["feature_dim"] == 512  # resnet18's fc input
    assert npz["features"].shape == (6, 512) and list(npz["labels"]) == [0, 0, 0, 1, 1, 1]
    assert [s["path"].endswith("bad.png") for s in res["skipped"]] == [True]

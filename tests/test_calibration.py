"""Calibrated probabilities: the temperature fit and ECE on hand-made cases; a trained run stores
its temperature, and evaluate, predict (checkpoint, TorchScript, ONNX), extract and report use it;
a checkpoint written before calibration keeps working at temperature 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import _fixtures
from _fixtures import run_cli
from cnnft.recipes import export, extract
from cnnft.results import calibration
from cnnft.run import checkpoint


def test_ece_matches_a_hand_computed_case():
    # 4 images, 2 classes; top-label confidences 0.95, 0.95, 0.55, 0.65 (bins 15: (14/15,1], (8/15,9/15], (9/15,10/15])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 0])
    # bin (14/15, 1]: 2 images, accuracy 0.5, confidence 0.95 -> |0.45| * 2
    # bin (8/15, 9/15]: 0.55, correct -> |1 - 0.55|;  bin (9/15, 10/15]: 0.65, wrong -> |0 - 0.65|
    want = (2 * 0.45 + 0.45 + 0.65) / 4
    assert calibration.ece(probs, labels) == pytest.approx(want)
    table = calibration.reliability(probs, labels)
    assert len(table) == 15 and sum(r["count"] for r in table) == 4
    assert table[14] == {"low": 14 / 15, "high": 1.0, "count": 2, "confidence": pytest.approx(0.95), "accuracy": 0.5}
    assert calibration.nll(probs, labels) == pytest.approx(-np.log([0.95, 0.05, 0.55, 0.35]).mean())


def test_a_perfect_confident_classifier_has_no_calibration_error():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.ece(probs, np.array([0, 1])) == 0.0


def test_temperature_fit_undoes_over_confidence_without_changing_accuracy():
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    true_logits = rng.normal(0, 1.5, (n, c))
    labels = np.array([rng.choice(c, p=p) for p in calibration.softmax(true_logits)])
    over = 3.0 * true_logits  # the same ranking, three times too sharp
    t = calibration.fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    before = calibration.softmax(over)
    after = calibration.softmax(over, t)
    assert calibration.ece(after, labels) < 0.5 * calibration.ece(before, labels)
    assert calibration.nll(after, labels) < calibration.nll(before, labels)
    assert (after.argmax(1) == before.argmax(1)).all()
    s = calibration.summary(before, labels, t)
    assert s["accuracy_before"] == s["accuracy_after"] and s["ece_after"] < s["ece_before"]


def test_temperature_fit_on_nothing_is_one():
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    assert calibration.fit_temperature(np.full((2, 3), np.nan), np.array([0, 1])) == 1.0


def test_log_probabilities_stand_in_for_logits():
    z = np.random.default_rng(1).normal(0, 4, (50, 7))
    for t in (0.5, 1.0, 2.5):
        got = calibration.softmax(calibration.logits_from_probs(calibration.softmax(z)), t)
        np.testing.assert_allclose(got, calibration.softmax(z, t), atol=1e-9)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True, None])
def test_a_stored_temperature_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="temperature"):
        calibration.checked_temperature(bad, "x.pt")


# ------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _fixtures.random_image_folder(tmp_path_factory.mktemp("cal"), per_class=3, size=37, seed=5)


def _predict(monkeypatch, capsys, source, images, *extra) -> tuple[dict, str]:
    code, out, err = run_cli(monkeypatch, capsys, "predict", source, images, "--json", "--top-k", "2",
                             "--device", "cpu", *extra)
    assert code == 0, err
    return json.loads(out), err


def _probs(res: dict) -> np.ndarray:
    """Each image's full distribution (top-k covers both classes), in class order."""
    classes = res["classes"]
    return np.array([[next(t["prob"] for t in r["top_k"] if t["class"] == c) for c in classes]
                     for r in res["predictions"]])


@pytest.mark.slow
def test_training_stores_a_temperature_and_reports_calibration(tiny_run):
    summary = json.loads((Path(tiny_run["run_dir"]) / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal is not None and set(cal) == {"val", "test"}
    val = cal["val"]
    assert {"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "images"} <= set(val)
    assert val["nll_after"] <= val["nll_before"] + 1e-9  # the fit minimises the validation NLL
    assert val["accuracy_before"] == val["accuracy_after"]
    for name in ("best.pt", "last.pt"):
        ckpt = checkpoint.load(Path(tiny_run["run_dir"]) / "checkpoints" / name)
        assert ckpt["temperature"] == val["temperature"] > 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_predict_is_calibrated_on_all_three_model_formats(tiny_run, images, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    t = checkpoint.load(tiny_run["run_dir"])["temperature"]
    raw, _ = _predict(monkeypatch, capsys, tiny_run["run_dir"], images, "--uncalibrated")
    want = calibration.softmax(calibration.logits_from_probs(_probs(raw)), t)
    sources = {"checkpoint": tiny_run["run_dir"]}
    for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        res = export.export(tiny_run["run_dir"], fmt, tmp_path / name)
        assert json.loads((tmp_path / (name + ".json")).read_text())["temperature"] == res.temperature == t
        sources[fmt] = tmp_path / name
    for fmt, source in sources.items():
        got, err = _predict(monkeypatch, capsys, source, images)
        assert got["temperature"] == t, fmt
        np.testing.assert_allclose(_probs(got), want, atol=1e-4, err_msg=fmt)
        assert [r["class"] for r in got["predictions"]] == [r["class"] for r in raw["predictions"]]
        assert "no calibration temperature" not in err
        uncal, _ = _predict(monkeypatch, capsys, source, images, "--uncalibrated")
        np.testing.assert_allclose(_probs(uncal), _probs(raw), atol=1e-4, err_msg=fmt)


@pytest.mark.slow
def test_an_old_checkpoint_without_a_temperature_predicts_raw_probabilities(tiny_run, images, tmp_path,
                                                                            monkeypatch, capsys):
    ckpt = checkpoint.load(tiny_run["run_dir"])
    old = {k: v for k, v in ckpt.items() if k not in ("temperature", "calibration", "path")}
    checkpoint.save(old, tmp_path / "old.pt")
    got, err = _predict(monkeypatch, capsys, tmp_path / "old.pt", images)
    raw, _ = _predict(monkeypatch, capsys, tiny_run["run_dir"], images, "--uncalibrated")
    assert err.count("no calibration temperature") == 1 and "temperature 1" in err
    assert got["temperature"] == 1.0
    np.testing.assert_allclose(_probs(got), _probs(raw), atol=1e-6)
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", tmp_path / "old.pt", "--json", "--device", "cpu",
                             "--out", tmp_path / "ev")
    assert code == 0, err
    assert json.loads(out)["calibration"]["temperature"] == 1.0 and err.count("no calibration temperature") == 1


@pytest.mark.slow
def test_a_damaged_temperature_is_a_checkpoint_error(tiny_run, images, tmp_path, monkeypatch, capsys):
    ckpt = {k: v for k, v in checkpoint.load(tiny_run["run_dir"]).items() if k != "path"}
    ckpt["temperature"] = -2.0
    checkpoint.save(ckpt, tmp_path / "bad.pt")
    code, _, err = run_cli(monkeypatch, capsys, "predict", tmp_path / "bad.pt", images)
    assert code == 2 and "temperature" in err


@pytest.mark.slow
def test_evaluate_reports_ece_and_nll_before_and_after(tiny_run, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", tiny_run["run_dir"], "--device", "cpu",
                             "--out", tmp_path / "ev")
    assert code == 0, err
    assert "calibration: temperature" in out and "ECE" in out and "NLL" in out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["applied"] is True and len(cal["reliability_after"]) == calibration.ECE_BINS
    pred = [r["prob"] for r in _read_csv(tmp_path / "ev" / "predictions.csv")]
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", tiny_run["run_dir"], "--device", "cpu",
                             "--out", tmp_path / "raw", "--uncalibrated", "--json")
    assert code == 0, err
    raw = json.loads(out)
    assert raw["calibration"]["applied"] is False and raw["accuracy"] == metrics["accuracy"]
    raw_pred = [r["prob"] for r in _read_csv(tmp_path / "raw" / "predictions.csv")]
    if abs(cal["temperature"] - 1) > 1e-3:
        assert not np.allclose(pred, raw_pred)


def _read_csv(path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [{k: (float(v) if k == "prob" else v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_extract_stores_calibrated_probabilities(tiny_run, images, tmp_path):
    t = checkpoint.load(tiny_run["run_dir"])["temperature"]
    extract.extract(tiny_run["run_dir"], images, tmp_path / "cal.npz", device="cpu", log=lambda m: None)
    extract.extract(tiny_run["run_dir"], images, tmp_path / "raw.npz", device="cpu", log=lambda m: None,
                    uncalibrated=True)
    cal, raw = np.load(tmp_path / "cal.npz"), np.load(tmp_path / "raw.npz")
    np.testing.assert_allclose(cal["probs"], calibration.softmax(calibration.logits_from_probs(raw["probs"]), t),
                               atol=1e-5)
    assert (cal["probs"].argmax(1) == raw["probs"].argmax(1)).all()


@pytest.mark.slow
def test_report_draws_a_reliability_diagram(tiny_run, tmp_path):
    from cnnft.recipes import report

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run)
    res = report.write_report(run, device="cpu", log=lambda m: None)
    assert "reliability.png" in res.files and (run / "report" / "reliability.png").is_file()
    html = (run / "report" / "report.html").read_text()
    assert "reliability diagram" in html and "expected calibration error" in html

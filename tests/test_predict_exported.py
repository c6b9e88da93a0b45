"""cnnft predict on the files `cnnft export` writes: TorchScript and ONNX, with the classes and
preprocessing read from the FILE.json beside them, give the checkpoint's predictions."""

from __future__ import annotations

import json

import pytest

import _fixtures
from _fixtures import run_cli
from cnnft.recipes import export


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _fixtures.random_image_folder(tmp_path_factory.mktemp("pred"), per_class=3, size=37, seed=7)


def _predict_json(monkeypatch, capsys, source, images) -> dict:
    code, out, err = run_cli(monkeypatch, capsys, "predict", source, images, "--json", "--top-k", "2",
                             "--device", "cpu")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,name", [("torchscript", "model.pt"), ("onnx", "model.onnx")])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_predict_with_an_export_matches_the_checkpoint(fmt, name, tiny_run, images, tmp_path, monkeypatch, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    out = tmp_path / name
    export.export(tiny_run["run_dir"], fmt, out)
    want = _predict_json(monkeypatch, capsys, tiny_run["run_dir"], images)
    got = _predict_json(monkeypatch, capsys, out, images)
    assert got["checkpoint"] == str(out) and got["model"] == "resnet18"
    assert got["classes"] == want["classes"] and got["predicted"] == want["predicted"] == 6
    for g, w in zip(got["predictions"], want["predictions"]):
        assert g["path"] == w["path"] and g["class"] == w["class"]
        assert g["prob"] == pytest.approx(w["prob"], abs=1e-4)
        assert [t["class"] for t in g["top_k"]] == [t["class"] for t in w["top_k"]]


@pytest.mark.slow
def test_an_export_without_its_json_says_what_is_missing(tiny_run, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.pt"
    export.export(tiny_run["run_dir"], "torchscript", out)
    (tmp_path / "model.pt.json").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "predict", out, images)
    assert code == 2 and "model.pt.json" in err and "refused" not in err

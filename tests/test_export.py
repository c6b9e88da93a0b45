"""cnnft export: TorchScript and ONNX files that give the checkpoint's logits, with the
preprocessing metadata beside them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import _fixtures
from _fixtures import run_cli
from cnnft import checkpoint
from cnnft.recipes import export
from cnnft.errors import InputError


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(tiny_run):
    """Checkpoint logits on a batch of a size the export never saw (checks the dynamic batch axis)."""
    lm = checkpoint.load_model(tiny_run["checkpoints"]["best"])
    size = lm.preprocess.crop_size
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(123))
    with torch.inference_mode():
        return x, lm.model(x), lm


def _check_metadata(path: Path, fmt: str, lm) -> dict:
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["export_format"] == fmt and meta["file"] == path.name
    assert meta["classes"] == lm.classes and meta["model_name"] == "resnet18"
    assert meta["preprocess"] == json.loads(json.dumps(lm.preprocess.to_dict()))
    assert meta["input_size"] == [3, 32, 32] and meta["preprocess"]["crop_size"] == 32
    assert 0 <= meta["max_abs_diff"] <= 1e-4
    return meta


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(tiny_run, reference, tmp_path, monkeypatch, capsys):
    x, expected, lm = reference
    out = tmp_path / "model.pt"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "torchscript",
                                "--out", out)
    assert code == 0, err
    assert "max abs logit diff" in stdout
    meta = _check_metadata(out, "torchscript", lm)
    loaded = torch.jit.load(str(out))
    with torch.inference_mode():
        diff = float((loaded(x) - expected).abs().max())
    print(f"torchscript: export check {meta['max_abs_diff']:.2e}, reload on batch 5 {diff:.2e}")
    assert diff <= 1e-4
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_onnx_round_trip(tiny_run, reference, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    x, expected, lm = reference
    out = tmp_path / "sub" / "model.onnx"
    res = export.export(tiny_run["checkpoints"]["best"], "onnx", out).to_dict()
    meta = _check_metadata(out, "onnx", lm)
    assert res["max_abs_diff"] == meta["max_abs_diff"] and meta["opset"] == export.ONNX_OPSET
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    diff = float((got - expected).abs().max())
    print(f"onnx: export check {meta['max_abs_diff']:.2e}, onnxruntime on batch 5 {diff:.2e}")
    assert got.shape == (5, 2) and diff <= 1e-4


def test_onnx_without_the_packages_says_what_to_install(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(InputError, match="onnxruntime") as info:
        export.export(tiny_run["run_dir"], "onnx", tmp_path / "m.onnx")
    assert "pip install 'cnnft[onnx]'" in info.value.hint
    code, _, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "onnx",
                           "--out", tmp_path / "m.onnx")
    assert code == 2 and "cnnft[onnx]" in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_a_missing_checkpoint_is_bad_input(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", tmp_path / "nope.pt", "--format", "torchscript",
                           "--out", tmp_path / "m.pt")
    assert code == 2 and "nope.pt" in err

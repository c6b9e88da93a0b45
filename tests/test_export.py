"""cnnft export: TorchScript and ONNX files that give the checkpoint's logits, with the
preprocessing metadata beside them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _fixtures
import pytest
import torch
from _fixtures import run_cli

from cnnft.errors import InputError
from cnnft.recipes import export
from cnnft.run import checkpoint


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


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory) -> Path:
    """A lenet5 run (random init, one epoch at 32 px): the model cnnft defines itself."""
    from cnnft.recipes import train as train_recipe

    base = tmp_path_factory.mktemp("lenet")
    data = _fixtures.random_image_folder(base / "data", per_class=4, size=24)
    overrides = [f"data.train={data}", "data.image_size=32", "data.num_workers=0", "data.batch_size=4",
                 "model.backbone=lenet5", "model.weights=none", "train.epochs=1", "train.device=cpu",
                 f"output_dir={base / 'runs'}", "name=lenet"]
    return Path(train_recipe.train(None, overrides, log=lambda m: None).run_dir)


@pytest.mark.parametrize("fmt", export.EXPORT_FORMATS)
def test_lenet5_exports_to_both_formats(lenet_run, tmp_path, fmt):
    """LeNet5 pools 12x12 to 5x5 at 32 px, which ONNX's adaptive pooling cannot express."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    res = export.export(lenet_run, fmt, tmp_path / f"lenet.{fmt}")
    assert res.max_abs_diff <= export.EXPORT_TOLERANCE and (tmp_path / f"lenet.{fmt}").is_file()


@pytest.mark.parametrize("in_hw, out_size", [((12, 12), 5), ((2, 3), 7), ((7, 9), (3, None)), ((13, 5), (4, 2))])
def test_matrix_pool_is_adaptive_pooling(in_hw, out_size):
    from torch import nn

    pool = nn.AdaptiveAvgPool2d(out_size)
    model = nn.Sequential(nn.Identity(), pool)
    x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(0))
    expected = pool(x)
    export.exportable_adaptive_pools(model, x)
    assert type(model[1]) is not nn.AdaptiveAvgPool2d
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_an_unexportable_operation_is_named_and_nothing_is_written(lenet_run, tmp_path, monkeypatch):
    from cnnft.errors import CnnftError

    def refuse(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate. Please feel free to request support")

    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(CnnftError, match="lenet5 cannot be exported to onnx at 32 px: .*frobnicate") as info:
        export.export(lenet_run, "onnx", tmp_path / "out" / "m.onnx")
    assert "Please feel free" not in str(info.value) and "--format torchscript" in info.value.hint
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_replaces_a_planted_symlink_never_its_target(lenet_run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    for name in (".m.pt.tmp", ".m.pt.json.tmp"):  # the fixed names earlier versions wrote through
        (out_dir / name).symlink_to(victim)
    export.export(lenet_run, "torchscript", out_dir / "m.pt")
    assert victim.read_text() == "precious"
    assert (out_dir / "m.pt").is_file() and not (out_dir / "m.pt").is_symlink()
    torch.jit.load(str(out_dir / "m.pt"))


def test_export_refuses_an_existing_file_unless_forced(lenet_run, tmp_path):
    out = tmp_path / "m.pt"
    out.write_text("someone's file")
    with pytest.raises(InputError, match="already exists") as info:
        export.export(lenet_run, "torchscript", out)
    assert "--force" in info.value.hint and out.read_text() == "someone's file"
    assert not out.with_name("m.pt.json").exists()
    export.export(lenet_run, "torchscript", out, force=True)
    assert out.read_bytes() != b"someone's file" and out.with_name("m.pt.json").is_file()


@pytest.mark.parametrize("target", ["checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/model.pt"])
def test_export_never_overwrites_the_checkpoint_even_forced(lenet_run, target):
    ckpt = lenet_run / "checkpoints" / "best.pt"
    before = ckpt.read_bytes()
    with pytest.raises(InputError, match="checkpoint"):
        export.export(lenet_run, "torchscript", lenet_run / target, force=True)
    with pytest.raises(InputError, match="checkpoint"):
        export.export(ckpt, "torchscript", lenet_run / target, force=True)
    assert ckpt.read_bytes() == before and not (lenet_run / "checkpoints" / "model.pt").exists()

"""timm / Hugging Face interchange: `cnnft export --format hf` writes timm's Hub layout that
`timm.create_model("local-dir:DIR", pretrained=True)` loads with the checkpoint's logits,
`model.backbone: local-dir:DIR` / `hf-hub:org/name` train from such folders, predict reads
them, and timm models published without a classifier get a new linear head."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import _fixtures
import pytest
import torch
from _fixtures import run_cli
from torch import nn

from cnnft import models
from cnnft.errors import ConfigError, InputError, WeightsUnavailableError
from cnnft.models import hf
from cnnft.recipes import export, predict
from cnnft.run import checkpoint
from cnnft.training.inference import forward_files


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return _fixtures.tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_hf(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    export.export(tiny_run["run_dir"], "hf", out)
    return out


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return models.logits_of(model(x)).float()


def test_export_hf_writes_timms_hub_layout(tiny_run, tmp_path, monkeypatch, capsys):
    import timm
    from timm.data import resolve_data_config

    out = tmp_path / "shared"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "hf", "--out", out)
    assert code == 0, err
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside it
    cfg = json.loads((out / "config.json").read_text())
    lm = checkpoint.load_model(tiny_run["run_dir"])
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 2 and cfg["label_names"] == lm.classes
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == list(lm.preprocess.mean)
    assert pc["std"] == list(lm.preprocess.std) and pc["interpolation"] == lm.preprocess.interpolation
    assert "tag" not in pc and "license" not in pc  # timm's own weights' provenance is not these weights'

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert float((_logits(model, x) - _logits(lm.model, x)).abs().max()) <= 1e-5
    dc = resolve_data_config({}, model=model)  # timm's eval transform: resize floor(size / crop_pct), crop size
    assert int(dc["input_size"][-1] / dc["crop_pct"]) == lm.preprocess.resize_size == 37


def test_export_hf_refuses_what_it_would_overwrite(tiny_run, tiny_hf, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "hf", "--out", tiny_hf)
    assert code == 2 and "already exists" in err and "--force" in err
    before = (tiny_hf / "model.safetensors").stat().st_mtime_ns
    code, _, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "hf", "--out", tiny_hf,
                           "--force")
    assert code == 0, err
    assert (tiny_hf / "model.safetensors").stat().st_mtime_ns != before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "hf", "--out", other,
                           "--force")
    assert code == 2 and (other / "keep.txt").read_text() == "mine"  # --force replaces model folders only
    code, _, err = run_cli(monkeypatch, capsys, "export", tiny_run["run_dir"], "--format", "hf", "--out",
                           tiny_run["run_dir"], "--force")
    assert code == 2 and "holds the checkpoint" in err


def test_export_hf_refuses_families_without_a_timm_twin(tmp_path, monkeypatch, capsys):
    data = _fixtures.random_image_folder(tmp_path / "data")
    run = _fixtures.train_small(tmp_path, data, "model.backbone=lenet5", "train.epochs=1")
    code, _, err = run_cli(monkeypatch, capsys, "export", run.run_dir, "--format", "hf", "--out", tmp_path / "x")
    assert code == 2 and "--format onnx or --format torchscript" in err and not (tmp_path / "x").exists()
    mobile = models.build("mobilenet_v3_small", "none", 3, on_meta=True)
    with pytest.raises(InputError, match="no timm architecture"):
        hf.timm_architecture("mobilenet_v3_small", mobile.model)


@pytest.mark.parametrize("name", [n for n in models.torchvision_names()
                                  if (f := models.family_of(models.build(n, "none", None, on_meta=True).model))
                                  is not None and f.timm_twin])
def test_every_timm_twin_has_timms_parameters(name):
    """Each torchvision model the family table maps to timm has timm's parameter names and shapes."""
    import timm

    tv = models.build(name, "none", 5, on_meta=True).model
    with models.empty_init():
        twin = timm.create_model(hf.timm_architecture(name, tv), pretrained=False, num_classes=5)
    assert {k: v.shape for k, v in tv.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


def test_predict_reads_the_folder(tiny_run, tiny_hf, tmp_path):
    images = _fixtures.random_image_folder(tmp_path / "imgs", per_class=3, seed=5)
    from_folder = predict.predict(tiny_hf, [images], top_k=2, device="cpu", log=lambda m: None)
    from_run = predict.predict(tiny_run["run_dir"], [images], top_k=2, device="cpu", log=lambda m: None,
                               uncalibrated=True)  # the folder carries no temperature
    assert from_folder.classes == from_run.classes and from_folder.model == "timm/resnet18"
    for a, b in zip(from_folder.predictions, from_run.predictions):
        assert a["class"] == b["class"] and abs(a["prob"] - b["prob"]) <= 1e-5


@pytest.mark.slow
def test_train_from_a_local_folder_keeps_or_replaces_the_head(tiny_hf, tmp_path):
    import safetensors.torch

    saved = safetensors.torch.load_file(tiny_hf / "model.safetensors")
    same = models.build(f"local-dir:{tiny_hf}", "DEFAULT", 2)
    assert same.name == "timm/resnet18" and same.weights == str((tiny_hf / "model.safetensors").resolve())
    assert torch.equal(same.model.fc.weight, saved["fc.weight"])  # the shared head, kept
    assert torch.equal(same.model.conv1.weight, saved["conv1.weight"])
    three = models.build(f"local-dir:{tiny_hf}", "DEFAULT", 3)
    assert three.model.fc.out_features == 3 and torch.equal(three.model.layer4[1].conv2.weight,
                                                              saved["layer4.1.conv2.weight"])

    data = _fixtures.random_image_folder(tmp_path / "data", classes=("x", "y", "z"))
    run = _fixtures.train_small(tmp_path, data, f"model.backbone=local-dir:{tiny_hf}", "train.epochs=1",
                                "freeze.similar=true", "train.head_phase=false")
    assert run.model == "timm/resnet18" and run.classes == ["x", "y", "z"]
    res = predict.predict(run.run_dir, [data], top_k=1, device="cpu", log=lambda m: None)
    assert res.predicted == 18


def test_local_folder_errors_say_what_to_do(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="no config.json") as e:
        models.build(f"local-dir:{tmp_path / 'nowhere'}", "DEFAULT", 3)
    assert "cnnft export RUN --format hf" in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 2}))
    with pytest.raises(ConfigError, match="no weights file"):
        models.build(f"local-dir:{tmp_path / 'empty'}", "DEFAULT", 3)
    assert models.build(f"local-dir:{tmp_path / 'empty'}", "none", 3).model.fc.out_features == 3
    code, _, err = run_cli(monkeypatch, capsys, "validate", f"model.backbone=local-dir:{tmp_path / 'x'}")
    assert code == 2 and "no config.json" in err


def test_hf_hub_offline_fails_at_once_with_the_folder_route(monkeypatch):
    import huggingface_hub

    def unreachable(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="cannot download hf-hub:someone/a-model") as e:
        models.build("hf-hub:someone/a-model", "DEFAULT", 3)
    assert time.monotonic() - start < 30  # no minute of retries
    assert "huggingface-cli download someone/a-model --local-dir DIR" in e.value.hint
    assert "model.backbone=local-dir:DIR" in e.value.hint


# ------------------------------------------------------------ timm models without a classifier

def _headless_by_family() -> dict[str, str]:
    """One pretrained tag per timm model family whose weights come without a classifier."""
    import timm
    from timm.models import get_pretrained_cfg

    family = {arch: module for module in timm.list_modules() for arch in timm.list_models(module=module)}
    found: dict[str, str] = {}
    for tag in sorted(timm.list_pretrained()):
        cfg = get_pretrained_cfg(tag)
        if cfg is not None and cfg.num_classes == 0:
            found.setdefault(family[tag.split(".")[0]], tag)
    return found


HEADLESS = _headless_by_family()
BUILT_FOR_REAL = {"vision_transformer_hybrid"}  # runs a forward pass while it is built: not on meta


def test_the_headless_walk_covers_the_known_families():
    assert len(HEADLESS) >= 12
    assert {"byobnet", "vision_transformer", "convnext", "eva", "resnet"} <= set(HEADLESS)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in BUILT_FOR_REAL else f
                                    for f in sorted(HEADLESS)])
def test_headless_timm_family_gets_a_linear_head_of_its_pooled_width(family):
    tag = HEADLESS[family]
    on_meta = family not in BUILT_FOR_REAL
    bb = models.build(f"timm/{tag}", "none", 7, on_meta=on_meta)
    head = bb.model.get_submodule(models.sources.timm_heads(bb.model)[0])
    assert isinstance(head, nn.Linear) and head.out_features == 7, tag
    size = bb.model.pretrained_cfg["input_size"]
    x = torch.zeros(1, *size, device="meta" if on_meta else "cpu")
    with torch.inference_mode():
        pooled = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        assert tuple(bb.model(x).shape) == (1, 7), tag
    assert head.in_features == bb.in_features == pooled.shape[-1], tag
    assert bb.stages[-1].name == "head"
    assert "head" in set(models.param_stage_map(bb.model, bb.stages).values())


@pytest.mark.slow
def test_headless_resnet_clip_trains_a_step():
    """`timm/resnet50_clip_gap` for real: the issue's failing model, a new head and a backward pass."""
    bb = models.build("timm/resnet50_clip_gap.openai", "none", 3)
    out = bb.model(torch.randn(2, 3, 64, 64))
    out.logsumexp(1).sum().backward()
    assert out.shape == (2, 3) and bb.model.head.fc.weight.grad is not None
    inspect = models.build("timm/resnet50_clip_gap.openai", "none", None, on_meta=True)
    assert inspect.num_classes == 0 and inspect.in_features == 2048


def _resnet_on_real_images(tmp_path_factory, hymenoptera: Path) -> str:
    base = tmp_path_factory.mktemp("hymres")
    run = _fixtures.train_small(base, hymenoptera / "train", "model.backbone=resnet18", "model.weights=none",
                                "data.image_size=96", "data.limit_per_class=8", "train.epochs=1")
    return run.run_dir


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("which", ["efficientnet_lite0", "resnet18"])
def test_timm_loads_the_export_with_predicts_logits_on_real_images(which, tmp_path_factory, hymenoptera, tmp_path):
    """The acceptance figure: timm.create_model("local-dir:...") against the model `cnnft predict`
    runs, on real images through the same preprocessing, which the folder records exactly."""
    import timm

    run = (_fixtures.hymenoptera_run(tmp_path_factory, hymenoptera)["run_dir"] if which == "efficientnet_lite0"
           else _resnet_on_real_images(tmp_path_factory, hymenoptera))
    res = export.export(run, "hf", tmp_path / "hf")
    model, name, classes, pre, _, rt, _, _ = predict._load(run, "cpu", lambda m: None)  # what `cnnft predict RUN` runs
    shared = timm.create_model(f"local-dir:{res.out}", pretrained=True).eval()
    assert hf.load_folder(res.out).preprocess == pre and hf.load_folder(res.out).classes == classes
    paths = sorted(str(p) for p in (hymenoptera / "val").rglob("*.jpg"))[::4]
    ours = torch.cat([lg for _, lg, _ in forward_files(model, paths, pre, rt, 16, 0)])
    theirs = torch.cat([lg for _, lg, _ in forward_files(shared, paths, pre, rt, 16, 0)])
    diff = float((ours - theirs).abs().max())
    print(f"{which}: {len(paths)} real images, max |logit difference| timm local-dir vs cnnft predict {diff:.2e}")
    assert len(paths) >= 30 and ours.shape == (len(paths), 2)
    assert diff <= 1e-5

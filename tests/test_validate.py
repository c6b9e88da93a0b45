"""`cnnft validate` as a pre-flight check: data folders and their classes, the backbone, where
its weights come from, the input size, the device and the output folder, every problem at
once; and configs made of overrides alone."""

from __future__ import annotations

import json

import pytest
import torch

from _fixtures import run_cli
from conftest import make_image_folder


def _validate(monkeypatch, capsys, cwd, *args) -> tuple[int, dict, str]:
    monkeypatch.chdir(cwd)
    code, out, err = run_cli(monkeypatch, capsys, "validate", *args, "--json")
    return code, json.loads(out), err


def test_every_problem_is_listed_at_once(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    bad = ["data.train=/nonexistent", "model.backbone=resnet5O", "train.device=cuda:7", "output_dir=afile/runs"]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "validate", *bad)
    flat = " ".join(err.split())
    assert code == 2, err
    assert out == ""
    assert "4 problem(s)" in flat
    for fragment in ("data.train: folder not found: /nonexistent", "unknown backbone 'resnet5O'",
                     "Did you mean resnet50", "train.device: cuda:7", "output_dir:", "config OK"):
        assert (fragment in flat) != (fragment == "config OK"), fragment

    code, res, _ = _validate(monkeypatch, capsys, tmp_path, *bad)
    assert code == 2 and res["ok"] is False and len(res["problems"]) == 4
    assert res["config"]["model"]["backbone"] == "resnet5O"


def test_classes_weights_size_and_device_of_a_good_config(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "data", classes=("cats", "dogs", "owls"), per_class=3)
    make_image_folder(tmp_path / "val", classes=("cats", "dogs", "owls"), per_class=2)
    code, res, err = _validate(monkeypatch, capsys, tmp_path, "data.train=data", "data.val=val",
                               "model.backbone=lenet5", "model.weights=none", "train.device=cpu")
    assert code == 0, err
    assert res["ok"] is True and res["problems"] == []
    assert res["classes"] == {"train": {"cats": 3, "dogs": 3, "owls": 3}, "val": {"cats": 2, "dogs": 2, "owls": 2}}
    assert res["weights"]["status"] == "none" and res["weights"]["offline"] is True
    assert (res["image_size"], res["min_image_size"], res["device"]) == (32, 32, "cpu")
    assert res["config"]["data"]["batch_size"] == 32  # resolved: defaults filled in

    code, out, err = run_cli(monkeypatch, capsys, "validate", "data.train=data", "model.backbone=lenet5",
                             "data.image_size=16")
    assert code == 2 and "data.image_size: lenet5 needs inputs of at least 32 px (got 16)" in " ".join(err.split())
    assert "train: 3 classes, 9 images (cats 3, dogs 3, owls 3)" in " ".join(err.split())


def test_mismatched_folders_and_class_count(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    make_image_folder(tmp_path / "val", classes=("a", "c"), per_class=2)
    code, res, _ = _validate(monkeypatch, capsys, tmp_path, "data.train=data", "data.val=val",
                             "model.backbone=lenet5", "model.num_classes=5")
    assert code == 2
    assert any("only in train: b" in p and "only in val: c" in p for p in res["problems"])
    assert any(p.startswith("model.num_classes: 5 but the data has 2 classes") for p in res["problems"])


def test_where_pretrained_weights_come_from(tmp_path, monkeypatch, capsys):
    """torchvision weights: the torch hub cache file; timm: the Hugging Face cache; the packaged
    Lite weights: always offline; a missing weights file is a problem."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    make_image_folder(tmp_path / "data", per_class=2)
    base = ["data.train=data", "train.device=cpu"]

    code, res, _ = _validate(monkeypatch, capsys, tmp_path, *base, "model.backbone=resnet18")
    assert code == 0 and res["weights"]["status"] == "download" and res["weights"]["offline"] is False
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert res["weights"]["path"] == str(target) and res["weights"]["url"].endswith("/resnet18-f37072fd.pth")
    assert any(str(target) in n for n in res["notes"])
    target.parent.mkdir(parents=True)
    torch.save({}, target)
    code, res, _ = _validate(monkeypatch, capsys, tmp_path, *base, "model.backbone=resnet18")
    assert res["weights"]["status"] == "cached" and res["weights"]["offline"] is True

    code, res, _ = _validate(monkeypatch, capsys, tmp_path, *base, "model.backbone=timm/resnet18.a1_in1k")
    assert code == 0 and res["weights"]["status"] == "download"
    assert res["weights"]["path"].startswith(str(tmp_path / "hf")) and "huggingface.co" in res["weights"]["url"]

    code, res, _ = _validate(monkeypatch, capsys, tmp_path, *base, "model.backbone=efficientnet_lite0")
    assert code == 0 and res["weights"]["status"] == "packaged" and res["weights"]["offline"] is True
    assert res["notes"] and not any("download" in n for n in res["notes"])

    code, res, _ = _validate(monkeypatch, capsys, tmp_path, *base, "model.weights=nope/w.pth")
    assert code == 2 and res["weights"]["status"] == "missing"
    assert any("weights file not found" in p for p in res["problems"])


def test_packaged_dataset_counts_and_a_missing_one(tmp_path, monkeypatch, capsys):
    code, res, _ = _validate(monkeypatch, capsys, tmp_path, "data.dataset=digits", "model.backbone=lenet5")
    assert code == 0 and sum(res["classes"]["train"].values()) + sum(res["classes"]["val"].values()) == 1797
    code, res, _ = _validate(monkeypatch, capsys, tmp_path, "data.dataset=cifar10", "data.root=nowhere",
                             "model.backbone=lenet5")
    assert code == 2 and any("cifar10 is not present" in p for p in res["problems"])
    code, res, _ = _validate(monkeypatch, capsys, tmp_path, "data.dataset=cifar10", "data.root=nowhere",
                             "data.download=true", "model.backbone=lenet5")
    assert code == 0 and any("downloads it first" in n for n in res["notes"])
    assert not (tmp_path / "nowhere").exists()  # nothing fetched


def test_train_from_overrides_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "train", "data.dataset=digits", "model.backbone=lenet5",
                             "train.epochs=1", "data.limit_per_class=6", "data.num_workers=0", "train.device=cpu",
                             "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["epochs_completed"] == 1 and (tmp_path / "runs" / "run" / "checkpoints" / "best.pt").is_file()

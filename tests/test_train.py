"""End-to-end training: run-folder contract, checkpoints, resume, determinism."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from cnnft import models
from cnnft.config import DataConfig
from cnnft.data import folders as data
from cnnft.data import transforms
from cnnft.errors import InputError
from cnnft.recipes import train as train_recipe
from cnnft.results import tensorboard as _tensorboard
from cnnft.run import checkpoint
from cnnft.training import engine, runtime

LOSS_ACC = ("train_loss", "train_acc", "val_loss", "val_acc")


def _config(tmp_path: Path, train_dir: Path, **extra) -> Path:
    import yaml

    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "seed": 3,
        "data": {"train": str(train_dir), "val_split": 0.34, "image_size": 32, "batch_size": 4,
                 "num_workers": 0, "augment": "light"},
        "model": {"backbone": "resnet18", "weights": "none"},
        "freeze": {"strategy": "full"},
        "train": {"epochs": 2, "lr": 0.01},
    }
    for key, value in extra.items():
        section, _, leaf = key.partition("__")
        cfg[section][leaf] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_folder_contract_and_best_checkpoint_reloads(tmp_path, tiny_data):
    summary = train_recipe.train(_config(tmp_path, tiny_data), [], log=lambda m: None)
    run = Path(summary.run_dir)
    for name in ("config.yaml", "freeze_plan.json", "metrics.csv", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp")), "temporary files left behind"

    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"epoch", "lr_head", "lr_backbone", *LOSS_ACC, "epoch_seconds", "images_per_second"}
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary.to_dict()
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "epochs_completed", "wall_seconds", "run_dir"):
        assert key in summary.to_dict()
    assert summary.epochs_completed == 2
    assert summary.best_val_acc == max(float(r["val_acc"]) for r in rows)
    assert summary.final_val_acc == float(rows[-1]["val_acc"])
    assert Path(summary.checkpoints["best"]).is_file()
    plan = json.loads((run / "freeze_plan.json").read_text())
    assert plan["strategy"] == "full" and plan["trainable_params"] == plan["total_params"]

    ck = checkpoint.load(run / "checkpoints" / "best.pt")
    assert ck["model_name"] == "resnet18" and ck["weights"] == "none" and ck["num_classes"] == 2
    assert ck["classes"] == ["cats", "dogs"]
    assert ck["preprocess"]["crop_size"] == 32
    assert ck["freeze_plan"]["strategy"] == "full"
    assert ck["epoch"] == summary.best_epoch
    for key in ("optimizer", "scheduler", "rng", "config", "history"):
        assert ck[key] is not None, key

    # best.pt alone rebuilds the model and reproduces the best validation accuracy
    bb = models.build(ck["model_name"], "none", ck["num_classes"])
    bb.model.load_state_dict(ck["model"])
    cfg = ck["config"]["data"]
    bundle = data.build_data(DataConfig.model_validate(cfg), seed=ck["config"]["seed"])
    pre = models.Preprocess.from_dict(ck["preprocess"])
    loader = data.make_loader(data.ImageDataset(bundle.val, transforms.eval_transform(pre), pre.resize_size), 8, 0)
    result = engine.evaluate(bb.model, loader, runtime.Runtime(torch.device("cpu")))
    assert result.acc == summary.best_val_acc


def test_existing_run_folder_is_never_overwritten(tmp_path, tiny_data):
    cfg = _config(tmp_path, tiny_data, train__epochs=1)
    first = train_recipe.train(cfg, [], log=lambda m: None)
    second = train_recipe.train(cfg, [], log=lambda m: None)
    assert first.run_dir != second.run_dir
    assert Path(second.run_dir).name == "t-2"
    assert (Path(first.run_dir) / "checkpoints" / "last.pt").is_file()


def test_same_seed_gives_identical_metrics(tmp_path, tiny_data):
    cfg = _config(tmp_path, tiny_data, data__num_workers=1, data__augment="strong")
    a = train_recipe.train(cfg, [], log=lambda m: None)
    b = train_recipe.train(cfg, [], log=lambda m: None)
    ra, rb = _rows(a.run_dir), _rows(b.run_dir)
    assert [{k: r[k] for k in LOSS_ACC} for r in ra] == [{k: r[k] for k in LOSS_ACC} for r in rb]
    c = train_recipe.train(cfg, ["seed=4"], log=lambda m: None)
    assert [r["train_loss"] for r in _rows(c.run_dir)] != [r["train_loss"] for r in ra]


def test_resume_extends_epochs_and_matches_uninterrupted_run(tmp_path, tiny_data):
    # a constant LR so that "train 1 epoch, then extend to 3" is the same run as "train 3"
    cfg = _config(tmp_path, tiny_data, train__scheduler="none", train__epochs=3)
    straight = train_recipe.train(cfg, [], log=lambda m: None)
    short = train_recipe.train(cfg, ["train.epochs=1"], log=lambda m: None)
    assert len(_rows(short.run_dir)) == 1
    resumed = train_recipe.train(None, ["train.epochs=3"], resume=short.run_dir, log=lambda m: None)
    assert resumed.run_dir == short.run_dir
    assert resumed.epochs_completed == 3
    rs, rr = _rows(straight.run_dir), _rows(resumed.run_dir)
    assert [r["epoch"] for r in rr] == ["1", "2", "3"]
    assert [{k: r[k] for k in LOSS_ACC} for r in rs] == [{k: r[k] for k in LOSS_ACC} for r in rr]


def test_resuming_a_finished_run_says_how_to_extend_it(tmp_path, tiny_data):
    from cnnft.errors import InputError

    run = train_recipe.train(_config(tmp_path, tiny_data), [], log=lambda m: None).run_dir
    before = {p.name: p.read_bytes() for p in Path(run).rglob("*") if p.is_file()}
    for overrides, fragment in (([], "already completed 2 epoch(s)"), (["train.epochs=1"], "more than the 1 asked for")):
        with pytest.raises(InputError, match=re.escape(fragment)) as info:
            train_recipe.train(None, overrides, resume=run, log=lambda m: None)
        assert f"--resume {run} train.epochs=7" in info.value.hint
    assert {p.name: p.read_bytes() for p in Path(run).rglob("*") if p.is_file()} == before, "nothing touched"


def test_a_run_killed_after_its_last_checkpoint_resumes_to_finish(tmp_path, tiny_data):
    """Killed after the last epoch's last.pt but before summary.json (while calibrating or
    testing best.pt): --resume trains nothing more and writes what the run had left to write."""
    run = Path(train_recipe.train(_config(tmp_path, tiny_data), [], log=lambda m: None).run_dir)
    whole = json.loads((run / "summary.json").read_text())
    metrics = (run / "metrics.csv").read_bytes()
    (run / "summary.json").unlink()
    again = train_recipe.train(None, [], resume=run, log=lambda m: None)
    assert again.status == "completed" and again.epochs_completed == 2
    assert (run / "metrics.csv").read_bytes() == metrics, "no epoch trained again"
    finished = json.loads((run / "summary.json").read_text())
    assert finished["best_val_acc"] == whole["best_val_acc"] and finished["status"] == "completed"
    with pytest.raises(InputError, match="already completed"):  # now it is finished
        train_recipe.train(None, [], resume=run, log=lambda m: None)


def test_resume_refuses_changing_the_model(tmp_path, tiny_data):
    from cnnft.errors import ConfigError

    run = train_recipe.train(_config(tmp_path, tiny_data, train__epochs=1), [], log=lambda m: None)
    with pytest.raises(ConfigError, match="model.backbone: cannot be changed"):
        train_recipe.train(None, ["model.backbone=vgg11"], resume=run.run_dir, log=lambda m: None)


def test_freeze_plan_of_run_matches_strategy(tmp_path, tiny_data):
    cfg = _config(tmp_path, tiny_data, train__epochs=1, freeze__strategy="freeze_most",
                  model__weights="none")
    run = Path(train_recipe.train(cfg, [], log=lambda m: None).run_dir)
    plan = json.loads((run / "freeze_plan.json").read_text())
    frozen = [s["name"] for s in plan["stages"] if s["frozen"]]
    assert frozen == ["stem", "stage1", "stage2", "stage3"]
    ck = checkpoint.load(run / "checkpoints" / "last.pt")
    # the run seeds torch before building, so the same seed rebuilds its initial weights
    torch.manual_seed(3)
    initial = models.build("resnet18", "none", 2).model.state_dict()
    for name, value in ck["model"].items():
        if name.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")):
            assert torch.equal(value, initial[name]), f"frozen {name} changed"
    assert not torch.equal(ck["model"]["layer4.1.conv2.weight"], initial["layer4.1.conv2.weight"])
    assert not torch.equal(ck["model"]["fc.weight"], initial["fc.weight"])


def test_auto_strategy_trains_everything_without_pretrained_weights(tmp_path, tiny_data):
    logged: list[str] = []
    run = train_recipe.train(_config(tmp_path, tiny_data, train__epochs=1, freeze__strategy="auto"), [], log=logged.append)
    assert run.strategy == "full" and run.trainable_params == run.total_params
    assert any("no pretrained layers to keep -> full" in m for m in logged), logged


def test_freezing_random_layers_is_warned_about(tmp_path, tiny_data):
    logged: list[str] = []
    run = train_recipe.train(_config(tmp_path, tiny_data, train__epochs=1, freeze__strategy="head_only"), [], log=logged.append)
    assert run.strategy == "head_only"
    assert any(m.startswith("warning: freeze.strategy head_only with model.weights none") for m in logged), logged


def test_run_files_get_ordinary_permissions(tmp_path, tiny_data):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    run = Path(train_recipe.train(_config(tmp_path, tiny_data, train__epochs=1), [], log=lambda m: None).run_dir)
    for name in ("summary.json", "metrics.csv", "checkpoints/last.pt"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.real
@pytest.mark.slow
def test_real_head_only_on_hymenoptera_reaches_093(tmp_path, hymenoptera):
    import time

    cfg = tmp_path / "hym.yaml"
    cfg.write_text(
        f"name: hym\noutput_dir: {tmp_path / 'runs'}\n"
        f"data: {{train: {hymenoptera / 'train'}, val: {hymenoptera / 'val'}, augment: light}}\n"
        "model: {backbone: efficientnet_lite0}\nfreeze: {strategy: head_only}\n"
        "train: {epochs: 3, lr: 0.01}\n"
    )
    t0 = time.perf_counter()
    summary = train_recipe.train(cfg, [], log=lambda m: None)
    print(f"hymenoptera head_only: best val acc {summary.best_val_acc:.4f} "
          f"in {time.perf_counter() - t0:.1f}s")
    assert summary.val_images == 153
    # every train image is readable, the placeholder GIF among the ants included (palette -> RGB)
    assert summary.train_images == 245 and summary.skipped_images == 0
    assert summary.strategy == "head_only"
    assert summary.best_val_acc >= 0.93


def test_tensorboard_logs_every_epoch(tmp_path, tiny_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(tmp_path, tiny_data, train__tensorboard=True)
    run = Path(train_recipe.train(cfg, [], log=lambda m: None).run_dir)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(_tensorboard.TENSORBOARD_TAGS.values())
    rows = _rows(run)
    val = acc.Scalars("accuracy/val")
    assert [e.step for e in val] == [1, 2]
    assert [e.value for e in val] == pytest.approx([float(r["val_acc"]) for r in rows])


def test_tensorboard_missing_is_a_clear_error(tmp_path, tiny_data, monkeypatch):
    import sys

    from cnnft.errors import InputError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(InputError, match="tensorboard package is not installed") as info:
        train_recipe.train(_config(tmp_path, tiny_data, train__tensorboard=True), [], log=lambda m: None)
    assert "cnnft[tensorboard]" in info.value.hint
    assert not (tmp_path / "runs").exists(), "no run folder for a run that never started"


def test_long_image_check_is_announced(tmp_path, tiny_data, monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(data, "CHECK_NOTICE_AT", 12)  # tiny_data has 12 images
    train_recipe.train(_config(tmp_path, tiny_data, train__epochs=1), [], log=logged.append)
    assert logged[0] == "checking 12 images (each is decoded once before training) ..."
    assert logged[1].startswith("checked 12 images in ")
    monkeypatch.setattr(data, "CHECK_NOTICE_AT", 13)
    logged.clear()
    train_recipe.train(_config(tmp_path, tiny_data, train__epochs=1), [], log=logged.append)
    assert not any(m.startswith("check") for m in logged), "short checks stay quiet"

"""Optional fine-tuning techniques of the training recipe: layer-wise LR decay, mixup/CutMix,
weight EMA and gradual unfreezing, each off by default."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnft import cli, engine, freeze, models
from cnnft.config import TrainConfig

from _fixtures import run_cli, train_small

HEAD_LR, SCALE = 0.01, 0.1


def _rows(run: str | Path) -> list[dict]:
    with open(Path(run) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train(tmp_path: Path, data_dir: Path, *overrides: str, resume=None, log=None):
    """A random-init model (resnet18 unless ``model.backbone`` says otherwise) on tiny images."""
    return train_small(tmp_path, data_dir, *([] if resume else ["model.weights=none"]), *overrides,
                       resume=resume, log=log)


# --------------------------------------------------------------------------- layer decay

def _optimizer_rates(frozen_stages: int, layer_decay: float | None) -> dict[str, float]:
    bb = models.build("resnet18", "none", 3)
    plan = freeze.make_plan(bb.model, bb.stages, "freeze_early", HEAD_LR, SCALE, pretrained=True,
                            frozen_stages=frozen_stages, layer_decay=layer_decay)
    freeze.apply_plan(bb.model, bb.stages, plan)
    groups = freeze.param_groups(bb.model, bb.stages, plan, weight_decay=0.01)
    optimizer = engine.build_optimizer(groups, TrainConfig(lr=HEAD_LR, layer_decay=layer_decay))
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def test_layer_decay_gives_each_trainable_stage_its_rate():
    # freeze_early with stem + stage1 frozen: stage2..stage4 train, stage4 the deepest
    rates = _optimizer_rates(1, 0.5)
    top = HEAD_LR * SCALE
    assert rates == pytest.approx({
        "head": HEAD_LR, "head_no_decay": HEAD_LR,
        "backbone.stage2": top * 0.25, "backbone.stage2_no_decay": top * 0.25,
        "backbone.stage3": top * 0.5, "backbone.stage3_no_decay": top * 0.5,
        "backbone.stage4": top, "backbone.stage4_no_decay": top,
    })
    # off: one backbone rate, the groups as before
    assert _optimizer_rates(1, None) == pytest.approx({"head": HEAD_LR, "head_no_decay": HEAD_LR,
                                                       "backbone": top, "backbone_no_decay": top})


def test_layer_decay_in_the_run_and_its_plan(tmp_path, tiny_data):
    s = _train(tmp_path, tiny_data, "model.backbone=resnet18", "freeze.strategy=freeze_early",
               "freeze.frozen_stages=2", "train.layer_decay=0.5", "train.lr=0.02", "train.epochs=1",
               "train.scheduler=none")
    plan = json.loads((Path(s.run_dir) / "freeze_plan.json").read_text())
    lr = {st["name"]: st["lr"] for st in plan["stages"]}
    # a random-init backbone learns at the full rate, decayed below the deepest stage
    assert plan["layer_decay"] == 0.5
    assert lr == pytest.approx({"stem": None, "stage1": None, "stage2": None, "stage3": 0.01, "stage4": 0.02,
                                "head": 0.02})
    ck = torch.load(Path(s.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert {g["name"]: g["lr"] for g in ck["optimizer"]["param_groups"]} == pytest.approx(
        {"head": 0.02, "head_no_decay": 0.02, "backbone.stage3": 0.01, "backbone.stage3_no_decay": 0.01,
         "backbone.stage4": 0.02, "backbone.stage4_no_decay": 0.02})
    assert float(_rows(s.run_dir)[0]["lr_backbone"]) == pytest.approx(0.02)  # the deepest stage's rate


def test_freeze_plan_command_shows_the_decayed_rates(monkeypatch, capsys):
    runner = CliRunner()
    args = ["freeze-plan", "--model", "resnet18", "--strategy", "full", "--lr", "0.01", "--layer-decay", "0.5"]
    res = runner.invoke(cli.app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    lr = {st["name"]: st["lr"] for st in out["stages"]}
    assert out["layer_decay"] == 0.5
    assert lr == pytest.approx({"stem": 1e-3 / 16, "stage1": 1e-3 / 8, "stage2": 1e-3 / 4, "stage3": 1e-3 / 2,
                                "stage4": 1e-3, "head": 0.01})
    table = runner.invoke(cli.app, args)
    assert table.exit_code == 0 and "6.3e-05" in table.stdout  # the stem's rate, in the stage table
    code, _, err = run_cli(monkeypatch, capsys, *args[:-1], "1.5")
    assert code == 2 and "--layer-decay must be in (0, 1]" in err

"""Optional fine-tuning techniques of the training recipe: layer-wise LR decay, mixup/CutMix,
weight EMA and gradual unfreezing, each off by default."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _fixtures import run_cli, train_small
from typer.testing import CliRunner

from cnnft import models
from cnnft import cli
from cnnft.config import TrainConfig
from cnnft.data import mixing
from cnnft.run import checkpoint
from cnnft.training import engine, freeze, runtime
from cnnft.training.ema import WeightEma

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


@pytest.mark.slow
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
    assert code == 2 and "--layer-decay" in err and "a finite number > 0 and <= 1" in err


# -------------------------------------------------------------------------- mixup / CutMix

def test_mixup_blends_images_and_targets():
    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    mixer = mixing.Mixer(3, mixup=0.4)
    mixed, targets = mixer(images, labels)
    lam = mixer.last_lam
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert targets[0].tolist() == pytest.approx([lam, 1 - lam, 0.0])  # sample 0 mixed with sample 3 (class 1)


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    torch.manual_seed(1)
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    mixer = mixing.Mixer(2, cutmix=1.0)
    mixed, targets = mixer(images, labels)
    kept = (mixed[0] == images[0]).all(0).float().mean().item()  # pixels still the image's own
    assert 0 < kept < 1 and mixer.last_lam == pytest.approx(kept)
    assert targets[0].tolist() == pytest.approx([kept, 1 - kept])


def test_the_loss_trained_on_is_the_soft_target_loss_with_label_smoothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    loader = [(torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0]))]
    seen = []
    base = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def criterion(logits, targets):
        loss = base(logits, targets)
        seen.append((logits.detach(), targets, loss.detach()))
        return loss

    rt = runtime.make_runtime(torch.device("cpu"), False, False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    r = engine.train_one_epoch(model, loader, optimizer, None, criterion, rt, epoch=1,
                               mix=mixing.Mixer(3, mixup=1.0))
    logits, targets, loss = seen[0]
    assert targets.shape == (4, 3) and ((targets > 0) & (targets < 1)).any()  # mixed, not one-hot
    smoothed = targets * 0.9 + 0.1 / 3
    assert loss == pytest.approx(float(-(smoothed * logits.log_softmax(1)).sum(1).mean()), rel=1e-5)
    assert r.correct == int((logits.argmax(1) == targets.argmax(1)).sum())  # against the mixed targets


@pytest.mark.slow
@pytest.mark.parametrize("key", ["train.mixup=0.4", "train.cutmix=1.0"])
def test_a_lenet5_run_trains_with_mixing_and_resumes_exactly(tmp_path, tiny_data, key):
    logged: list[str] = []
    common = ["model.backbone=lenet5", "freeze.strategy=freeze_most", key, "train.scheduler=none"]
    straight = _train(tmp_path, tiny_data, *common, "train.epochs=2", log=logged.append)
    assert any(m.startswith("feature cache: off (train.mixup/train.cutmix") for m in logged)
    short = _train(tmp_path, tiny_data, *common, "train.epochs=1")
    resumed = _train(tmp_path, tiny_data, "train.epochs=2", resume=short.run_dir)
    losses = [[r["train_loss"] for r in _rows(run.run_dir)] for run in (straight, resumed)]
    assert losses[0] == losses[1]
    plain = _train(tmp_path, tiny_data, *common[:2], "train.scheduler=none", "train.epochs=1")
    assert _rows(plain.run_dir)[0]["train_loss"] != losses[0][0]  # the mixing changed what was trained on


# ------------------------------------------------------------------------------ weight EMA

def test_ema_averages_weights_and_batchnorm_statistics_and_swaps_them_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    avg = WeightEma(model, decay=0.5)
    avg.update()  # the first update copies
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(8, 2))  # moves the BatchNorm statistics and its batch counter
    avg.update()  # decay ramps: min(0.5, 2/11)
    d = 2 / 11
    now = model.state_dict()
    assert torch.allclose(avg.shadow["0.weight"], d * start["0.weight"] + (1 - d) * now["0.weight"])
    assert torch.allclose(avg.shadow["1.running_mean"], d * start["1.running_mean"] + (1 - d) * now["1.running_mean"])
    assert avg.shadow["1.num_batches_tracked"] == now["1.num_batches_tracked"] == 1
    raw = {k: v.clone() for k, v in now.items()}
    with avg.applied():
        assert torch.equal(model[0].weight, avg.shadow["0.weight"])
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)


@pytest.mark.slow
def test_ema_run_validates_and_saves_the_average_and_resumes_it(tmp_path, tiny_data):
    from cnnft.recipes.evaluate import evaluate

    common = ["model.backbone=lenet5", "train.ema=0.9", "train.scheduler=none", "train.lr=0.02"]
    straight = _train(tmp_path, tiny_data, *common, "train.epochs=3")
    run = Path(straight.run_dir)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["ema"]["updates"] == 3 * 2  # 8 training images in batches of 4, 3 epochs
    assert any(not torch.equal(last["model"][k], last["ema"]["raw"][k]) for k in last["model"])

    # best.pt holds the average that was validated: load_model + evaluate reproduce its accuracy
    best = checkpoint.load(run / "checkpoints" / "best.pt")
    loaded = checkpoint.load_model(run / "checkpoints" / "best.pt")
    assert all(torch.equal(loaded.model.state_dict()[k], best["model"][k]) for k in best["model"])
    ev = evaluate(run / "checkpoints" / "best.pt", log=lambda m: None)
    row = next(r for r in _rows(run) if int(r["epoch"]) == straight.best_epoch)
    assert ev.accuracy == pytest.approx(float(row["val_acc"]))

    # resumed after epoch 1, the run continues both the raw weights and their average
    short = _train(tmp_path, tiny_data, *common, "train.epochs=1")
    resumed = _train(tmp_path, tiny_data, "train.epochs=3", resume=short.run_dir)
    again = torch.load(Path(resumed.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert again["ema"]["updates"] == last["ema"]["updates"]
    for part in ("model", "raw"):
        a = last["model"] if part == "model" else last["ema"]["raw"]
        b = again["model"] if part == "model" else again["ema"]["raw"]
        assert all(torch.equal(a[k], b[k]) for k in a), part


# ---------------------------------------------------------------------- gradual unfreezing

def test_gradual_unfreezing_adds_one_stage_per_epoch_from_the_top():
    bb = models.build("resnet18", "none", 2)
    plan = freeze.make_plan(bb.model, bb.stages, "freeze_early", HEAD_LR, frozen_stages=1)
    assert [freeze.gradual_frozen(plan, e) for e in range(4)] == [
        ["stem", "stage1", "stage2", "stage3"], ["stem", "stage1", "stage2"], ["stem", "stage1"], ["stem", "stage1"]]
    freeze.apply_plan(bb.model, bb.stages, plan, freeze.gradual_frozen(plan, 0))
    bb.model.train()
    bb.model(torch.randn(2, 3, 32, 32))
    layer3_bn, layer4_bn = bb.model.layer3[0].bn1, bb.model.layer4[0].bn1
    assert not layer3_bn.training and layer4_bn.training  # frozen for now: BatchNorm pinned
    assert not bb.model.layer3[0].conv1.weight.requires_grad
    freeze.apply_plan(bb.model, bb.stages, plan, freeze.gradual_frozen(plan, 1))
    bb.model.train()
    bb.model(torch.randn(2, 3, 32, 32))
    assert layer3_bn.training and bb.model.layer3[0].conv1.weight.requires_grad  # released
    assert not bb.model.layer1[0].bn1.training  # the plan's frozen stages stay pinned


def _same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.slow
def test_gradual_unfreezing_in_a_run_with_head_phase_cache_and_resume(tmp_path, tiny_data, pretrained_file):
    logged: list[str] = []
    common = ["model.backbone=resnet18", f"model.weights={pretrained_file}", "freeze.strategy=freeze_early",
              "freeze.frozen_stages=1", "train.gradual_unfreeze=true", "train.scheduler=none"]
    straight = train_small(tmp_path, tiny_data, *common, "train.epochs=2", log=logged.append)
    assert any("the frozen layers up to layer1 run once" in m for m in logged)  # cut: the plan's frozen prefix
    assert "gradual unfreezing: epoch 1 trains stage4, head (2 more stage(s) to unfreeze)" in logged
    rows = _rows(straight.run_dir)
    assert [(r["phase"], r["trainable_stages"]) for r in rows] == [
        ("head", "head"), ("train", "stage4+head"), ("train", "stage3+stage4+head")]

    start = torch.load(pretrained_file, weights_only=True)
    short = train_small(tmp_path, tiny_data, *common, "train.epochs=1")
    after1 = torch.load(Path(short.run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert _same(after1, start, "layer3.") and _same(after1, start, "layer2.")  # weights and BatchNorm statistics
    assert not _same(after1, start, "layer4.")
    resumed = train_small(tmp_path, tiny_data, "train.epochs=2", resume=short.run_dir)
    after2 = torch.load(Path(resumed.run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not _same(after2, start, "layer3.") and _same(after2, start, "layer2.")
    assert [r["trainable_stages"] for r in _rows(resumed.run_dir)] == [r["trainable_stages"] for r in rows]
    final = torch.load(Path(straight.run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], after2[k]) for k in final)  # the resumed run is the uninterrupted one


# ------------------------------------------------------------------------------ all together

@pytest.mark.slow
def test_all_four_with_the_head_phase_resume_exactly(tmp_path, tiny_data):
    torch.manual_seed(5)
    weights = tmp_path / "lenet5.pth"
    torch.save(models.build("lenet5", "none", 1000).model.state_dict(), weights)
    common = ["model.backbone=lenet5", f"model.weights={weights}", "freeze.strategy=freeze_most",
              "freeze.trainable_stages=2", "train.layer_decay=0.5", "train.mixup=0.4", "train.cutmix=1.0",
              "train.ema=0.9", "train.gradual_unfreeze=true", "train.scheduler=none"]
    straight = train_small(tmp_path, tiny_data, *common, "train.epochs=2")
    rows = _rows(straight.run_dir)
    assert [(r["phase"], r["trainable_stages"]) for r in rows] == [
        ("head", "head"), ("train", "stage2+head"), ("train", "stage1+stage2+head")]
    assert float(rows[1]["lr_backbone"]) == pytest.approx(1e-4)  # lr 1e-3 x backbone_lr_scale 0.1
    short = train_small(tmp_path, tiny_data, *common, "train.epochs=1")
    resumed = train_small(tmp_path, tiny_data, "train.epochs=2", resume=short.run_dir)
    a, b = (torch.load(Path(s.run_dir) / "checkpoints" / "last.pt", weights_only=True) for s in (straight, resumed))
    assert [r["train_loss"] for r in _rows(resumed.run_dir)] == [r["train_loss"] for r in rows]
    assert all(torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"]["raw"][k], b["ema"]["raw"][k])
               for k in a["model"])

"""Head phase, best-checkpoint monitor, early stopping and extending a finished run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from _fixtures import train_small

from cnnft.run import checkpoint


def _rows(run: str) -> list[dict]:
    with open(Path(run) / "metrics.csv") as f:
        return list(csv.DictReader(f))


_train = train_small  # resnet18, the default backbone


def test_head_phase_runs_first_as_epoch_zero(tmp_path, tiny_data, pretrained_file):
    logged: list[str] = []
    s = _train(tmp_path, tiny_data, f"model.weights={pretrained_file}", "freeze.strategy=freeze_most",
               "train.epochs=2", log=logged.append)
    rows = _rows(s.run_dir)
    assert [(r["epoch"], r["phase"]) for r in rows] == [("0", "head"), ("1", "train"), ("2", "train")]
    assert rows[0]["lr_backbone"] == ""  # only the head learns in the head phase
    assert any(m.startswith("head phase:") and "on cached features" in m for m in logged)
    assert s.epochs_completed == 2  # the strategy's epochs; the head phase is epoch 0
    # off: the strategy's epochs only
    s2 = _train(tmp_path, tiny_data, f"model.weights={pretrained_file}", "freeze.strategy=freeze_most",
                "train.epochs=2", "train.head_phase=false")
    assert [r["phase"] for r in _rows(s2.run_dir)] == ["train", "train"]


def test_head_phase_is_the_floor_for_best(tmp_path, tiny_data, pretrained_file):
    # a learning rate so small the strategy's epochs cannot improve on the head phase
    s = _train(tmp_path, tiny_data, f"model.weights={pretrained_file}", "freeze.strategy=head_only",
               "train.epochs=1", "train.monitor=val_loss")
    rows = _rows(s.run_dir)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert s.best_epoch == int(best["epoch"])
    assert checkpoint.load(Path(s.run_dir) / "checkpoints" / "best.pt")["epoch"] == s.best_epoch


def test_patience_stops_early(tmp_path, tiny_data):
    logged: list[str] = []
    s = _train(tmp_path, tiny_data, "model.weights=none", "train.epochs=6", "train.lr=1e-9",
               "train.patience=1", "train.monitor=val_loss", log=logged.append)
    assert s.epochs_completed < 6
    assert any(m.startswith("early stop: val_loss has not improved for 1 epoch") for m in logged)


def test_extending_a_finished_run_restarts_the_schedule_and_trains(tmp_path, tiny_data):
    s = _train(tmp_path, tiny_data, "model.weights=none", "train.epochs=2", "train.lr=0.02")
    before = checkpoint.load(Path(s.run_dir) / "checkpoints" / "last.pt")["model"]
    s2 = _train(tmp_path, tiny_data, "train.epochs=4", resume=s.run_dir)
    after = checkpoint.load(Path(s2.run_dir) / "checkpoints" / "last.pt")
    assert after["epoch"] == 4 and after["schedule_start"] == 2
    assert any(not torch.equal(before[k], after["model"][k]) for k in before if before[k].is_floating_point())
    lrs = [float(r["lr_head"]) for r in _rows(s2.run_dir)]
    # 8 images / batch 4 = 2 steps an epoch: epochs 1-2 on the first cosine, 3-4 on a new one
    # that starts again at the full rate
    assert lrs == pytest.approx([0.02, 0.01, 0.02, 0.01])


def test_pretrained_run_optimizer_groups_carry_lr_and_backbone_scale(tmp_path, tiny_data, pretrained_file):
    s = _train(tmp_path, tiny_data, f"model.weights={pretrained_file}", "freeze.strategy=freeze_most",
               "train.epochs=1", "train.lr=0.02", "train.backbone_lr_scale=0.25", "train.scheduler=none",
               "train.head_phase=false")
    groups = checkpoint.load(Path(s.run_dir) / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates["head"] == pytest.approx(0.02) and rates["backbone"] == pytest.approx(0.005)
    row = _rows(s.run_dir)[0]
    assert float(row["lr_head"]) == pytest.approx(0.02) and float(row["lr_backbone"]) == pytest.approx(0.005)


def test_head_phase_solves_the_probe_as_logistic_regression_does():
    """On fixed features the head phase is softmax regression solved to convergence: its
    validation accuracy matches scikit-learn's LogisticRegression on the same features."""
    from sklearn.linear_model import LogisticRegression
    from torch import nn

    from cnnft.run import cached as _cached
    from cnnft.run import phases as _phases
    from cnnft.training import cache, runtime

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 0.6
    def draw(n):
        y = torch.arange(n) % 5
        return centres[y] + torch.randn(n, 32, generator=g), y
    (xt, yt), (xv, yv) = draw(300), draw(200)
    head = nn.Linear(32, 5)
    train = cache.CachedFeatures(cache.Store(xt[None]), yt.tolist(), 1)
    val = cache.CachedFeatures(cache.Store(xv[None]), yv.tolist(), 1)
    loader = cache.cached_loader(val, torch.utils.data.SequentialSampler(range(len(yv))), 64)
    rt = runtime.make_runtime("cpu", amp=False, channels_last=False)
    logged = []
    _, ev, _ = _phases._fit_head(_cached.Cached(head, None, loader, train), head, rt, logged.append,
                                 nn.CrossEntropyLoss(), None)
    probe = LogisticRegression(max_iter=5000).fit(xt.numpy(), yt.numpy()).score(xv.numpy(), yv.numpy())
    assert ev.acc >= probe - 0.01, (ev.acc, probe)
    assert ev.acc > 0.5 and "L-BFGS" in logged[0]

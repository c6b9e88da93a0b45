"""``train.time_budget``: the epochs are cut to what fits, the schedule refitted to end there,
a deadline stops an epoch at a step boundary, and the run ends resumable, saying why."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from _robust import make_dataset

from cnnft import config as config_mod
from cnnft.errors import ConfigError
from cnnft.recipes import train as train_recipe
from cnnft.run import checkpoint
from cnnft.training import budget, engine


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400), ("45", 45)])
def test_durations_are_read_in_seconds(text, seconds):
    assert config_mod.duration_seconds(text) == seconds
    assert config_mod.load(None, [f"train.time_budget={text}"]).train.time_budget == text


@pytest.mark.parametrize("bad", ["soon", "0s", "-5m", "true", "10 minutes"])
def test_a_bad_budget_names_the_key(bad):
    with pytest.raises(ConfigError) as exc:
        config_mod.load(None, [f"train.time_budget={bad}"])
    assert "train.time_budget" in str(exc.value)


def test_a_passed_deadline_stops_the_epoch_at_a_step_boundary():
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 0])) for _ in range(10)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from cnnft.training.runtime import make_runtime

    rt = make_runtime(torch.device("cpu"), False, False)
    flag = engine.StopFlag(deadline=time.monotonic() - 1)
    r = engine.train_one_epoch(model, batches, opt, None, torch.nn.CrossEntropyLoss(), rt, epoch=1, stop=flag)
    assert r.steps == 1 and flag.stopped and flag.signum is None
    assert not engine.StopFlag().stopped and not engine.StopFlag(time.monotonic() + 60).stopped


def test_the_refitted_schedule_ends_at_zero_without_a_jump():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = config_mod.TrainConfig(epochs=10)
    sched = engine.build_scheduler(opt, cfg, steps_per_epoch=4)
    for _ in range(8):  # two epochs of a ten-epoch cosine
        opt.step()
        sched.step()
    before = opt.param_groups[0]["lr"]
    budget.refit_schedule(sched, end_step=16)  # now four epochs in all
    assert math.isclose(sched.lr_lambdas[0](8), before)
    lrs = []
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_epochs_are_fitted_to_the_time_left():
    logs = []
    b = budget.Budget(100.0, log=logs.append)
    p = torch.nn.Parameter(torch.zeros(1))
    sched = engine.build_scheduler(torch.optim.SGD([p], lr=1.0), config_mod.TrainConfig(epochs=50), 2)
    b.drive(sched, 2, 50)
    b.deadline = time.monotonic() + 35  # 35 s left after a 10 s epoch: 3 more fit
    row = {"phase": "train", "epoch": 1, "epoch_seconds": 10.0}
    assert b.after_epoch(row, [row]) and b.epochs == 4 and b.ended
    assert "4 epochs instead of 50" in logs[-1]
    b.deadline = time.monotonic() + 5  # less than an epoch left: the run ends here
    row2 = {"phase": "train", "epoch": 2, "epoch_seconds": 10.0}
    assert b.after_epoch(row2, [row, row2]) is False


def test_a_budget_ends_the_run_resumable_and_says_so(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n=6)
    args = [f"data.train={data}", "model.backbone=lenet5", "model.weights=none", "data.batch_size=2",
            "data.num_workers=0", "train.epochs=100000", "train.time_budget=3s", f"output_dir={tmp_path / 'runs'}"]
    s = train_recipe.train(None, args, log=lambda m: None)
    assert s.status == "stopped" and s.stopped_by == "train.time_budget"
    assert 0 <= s.epochs_completed < 100000
    last = checkpoint.load(Path(s.run_dir) / "checkpoints" / "last.pt")
    assert last["epoch"] == s.epochs_completed  # the checkpoint is where the run stopped (maybe mid-epoch)
    # resumed with more time, the run goes on from its checkpoint under the new budget
    again = train_recipe.train(None, ["train.time_budget=8s"], resume=s.run_dir, log=lambda m: None)
    assert again.run_dir == s.run_dir and again.stopped_by == "train.time_budget"
    assert again.epochs_completed >= s.epochs_completed


def test_a_run_within_its_budget_completes_as_usual(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n=4)
    s = train_recipe.train(None, [f"data.train={data}", "model.backbone=lenet5", "model.weights=none",
                                  "data.num_workers=0", "train.epochs=1", "train.time_budget=1h",
                                  f"output_dir={tmp_path / 'runs'}"], log=lambda m: None)
    assert s.status == "completed" and s.stopped_by is None and s.epochs_completed == 1

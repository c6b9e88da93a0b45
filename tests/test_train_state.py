"""The loop's state and the optimizer/schedule builders restore a run exactly where it stopped."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cnnft.config import TrainConfig
from cnnft.training import engine


def _groups(model: nn.Module) -> list[dict]:
    return [{"name": "head", "params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.01}]


def _steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.ones(2, 3)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()


def test_rebuilt_optimizer_and_schedule_continue_bit_for_bit():
    cfg = TrainConfig(epochs=3, lr=0.1, optimizer="sgd", warmup_epochs=1)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = engine.build_optimizer(_groups(model), cfg)
    scheduler = engine.build_scheduler(optimizer, cfg, steps_per_epoch=4)
    _steps(model, optimizer, scheduler, 5)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))  # as on disk

    twin = nn.Linear(3, 2)
    twin.load_state_dict(saved[0])
    opt2 = engine.build_optimizer(_groups(twin), cfg, saved[1])
    sched2 = engine.build_scheduler(opt2, cfg, 4, saved[2])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    _steps(model, optimizer, scheduler, 4)
    _steps(twin, opt2, sched2, 4)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_no_schedule_is_a_constant_rate():
    optimizer = engine.build_optimizer(_groups(nn.Linear(3, 2)), TrainConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert engine.build_scheduler(optimizer, TrainConfig(scheduler="none"), 4) is None


def test_train_state_round_trips_through_its_state_dict():
    state = engine.TrainState()
    state.running = engine.Running(loss_sum=1.5, correct=3, seen=4, steps=1, seconds=0.2)
    state.step = 1
    assert state.end_epoch({"epoch": 1, "val_acc": 0.5, "wall_seconds": 2.0})
    assert not state.end_epoch({"epoch": 2, "val_acc": 0.5, "wall_seconds": 4.0})  # first of equals stays best
    state.running, state.step = engine.Running(loss_sum=0.5, seen=2, steps=1), 1
    back = engine.TrainState()
    back.load_state_dict(state.state_dict())
    assert back.state_dict() == state.state_dict()
    assert (back.epoch, back.step, back.best_epoch, back.best_val_acc) == (2, 1, 1, 0.5)
    assert back.wall_before == 4.0 and back.wall_seconds >= 4.0

"""The learning-rate range test: the sweep, the suggestion rule on synthetic curves, that it
leaves the model as it was, `cnnft lr-find` and `train.lr: auto`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from _fixtures import run_cli
from torch import nn

from cnnft import cli
from cnnft.cli import train_cmds
from cnnft.config import load
from cnnft.data import transforms
from cnnft.errors import ConfigError
from cnnft.recipes import lr_find as lr_find_recipe
from cnnft.recipes import train as train_recipe
from cnnft.run import build
from cnnft.training import lrfind, runtime

LRS = lrfind.sweep_rates(lrfind.START_LR, lrfind.END_LR, 100)
X = np.log10(LRS)
# flat at tiny rates, falling steeply around 1e-3, lowest near 1e-1, exploding beyond
VALLEY = 2.3 - 1.8 / (1 + np.exp(-2 * (X + 3))) + np.where(X > -1, 3 * (X + 1) ** 2, 0.0)


def _falling_at(curve: np.ndarray, lr: float) -> bool:
    i = int(np.argmin(np.abs(X - math.log10(lr))))
    return curve[min(i + 1, len(curve) - 1)] < curve[max(i - 1, 0)]


# ----------------------------------------------------------------------- the suggestion rule

def test_sweep_rates_are_increasing_and_geometric():
    rates = lrfind.sweep_rates(1e-7, 10.0, 100)
    assert rates[0] == pytest.approx(1e-7) and rates[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(rates, rates[1:])]
    assert all(r > 1 for r in ratios)
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)


def test_valley_suggestion_lies_where_the_loss_falls():
    lr, reason = lrfind.suggest_lr(LRS, list(VALLEY), fallback=1e-3)
    assert reason.startswith("valley")
    assert LRS[0] <= lr <= LRS[-1]
    assert lr < LRS[int(np.argmin(VALLEY))]  # before the minimum, whose rate is already too high
    assert _falling_at(VALLEY, lr)


@pytest.mark.parametrize("seed", range(5))
def test_noisy_valley_still_gives_a_falling_point(seed):
    noisy = VALLEY * (1 + np.random.default_rng(seed).normal(0, 0.05, VALLEY.shape))
    lr, reason = lrfind.suggest_lr(LRS, list(noisy), fallback=1e-3)
    assert reason.startswith("valley")
    assert LRS[0] <= lr <= LRS[-1]
    assert _falling_at(VALLEY, lr)  # on the curve beneath the noise


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_flat_curve_falls_back(noise):
    flat = 2.3 * (1 + np.random.default_rng(1).normal(0, noise, 100))
    lr, reason = lrfind.suggest_lr(LRS, list(flat), fallback=3e-4)
    assert lr == 3e-4
    assert "no valley" in reason


def test_suggestion_is_clipped_to_a_sane_range_and_to_the_sweep():
    # a valley entirely at huge rates: the suggestion stays at most SANE_RANGE's top
    rates = lrfind.sweep_rates(0.5, 10.0, 50)
    lr, _ = lrfind.suggest_lr(rates, list(np.linspace(3, 1, 50)), fallback=1e-3)
    assert lr == lrfind.SANE_RANGE[1]
    # a fallback outside a short sweep is brought into it
    short = LRS[:30]
    lr, _ = lrfind.suggest_lr(short, [2.3] * 30, fallback=5.0)
    assert lr == pytest.approx(max(short))


# ----------------------------------------------------------------------- the sweep itself

def _tiny_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.1},
              {"params": model[3].parameters(), "lr": 1.0}]
    return model, loader, torch.optim.AdamW(groups)


def test_range_test_restores_weights_optimizer_and_rng():
    model, loader, opt = _tiny_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    rng = torch.get_rng_state()
    rt = runtime.make_runtime("cpu", False, False)
    res = lrfind.range_test(model, loader, opt, nn.CrossEntropyLoss(), rt, fallback=1e-3, steps=30)
    assert len(res.lrs) == len(res.losses) >= 5  # 30 steps over an 8-batch loader: cycled
    assert all(b > a for a, b in zip(res.lrs, res.lrs[1:]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups] == opt_before
    assert not opt.state  # no moments left behind
    assert torch.equal(torch.get_rng_state(), rng)
    assert res.lrs[0] <= res.suggested_lr <= res.lrs[-1]


def test_range_test_scales_every_group_together_and_stops_on_divergence():
    model, loader, opt = _tiny_problem()
    seen = []
    orig = opt.step

    def spy(*a, **k):
        seen.append([g["lr"] for g in opt.param_groups])
        return orig(*a, **k)

    opt.step = spy
    rt = runtime.make_runtime("cpu", False, False)
    res = lrfind.range_test(model, loader, opt, nn.CrossEntropyLoss(), rt, fallback=1e-3, steps=100, end_lr=1e4)
    assert all(r[0] / r[2] == pytest.approx(0.1) and r[1] / r[2] == pytest.approx(0.1) for r in seen)
    assert [r[2] for r in seen] == pytest.approx(res.lrs)  # the head's rate is the one recorded
    assert res.diverged and len(res.lrs) < 100  # 1e4 blows any loss up well before the end


def test_range_test_is_deterministic():
    rt = runtime.make_runtime("cpu", False, False)
    runs = []
    for _ in range(2):
        model, loader, opt = _tiny_problem()
        runs.append(lrfind.range_test(model, loader, opt, nn.CrossEntropyLoss(), rt, fallback=1e-3, steps=40))
    assert runs[0] == runs[1]


# ------------------------------------------------------------------- the recipe and the CLI

def _tiny_overrides(data) -> list[str]:
    return [f"data.train={data}", "model.backbone=lenet5", "model.weights=none", "data.num_workers=0",
            "data.batch_size=4"]


def test_sweep_of_a_config_is_repeatable(tiny_data):
    """lr-find builds its model as train does, from the seed: the same config sweeps the same."""
    cfg = load(None, _tiny_overrides(tiny_data))
    cfg.data.augment, cfg.data.hflip = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, cfg.freeze.similar)
    rt = runtime.make_runtime("cpu", False, False)
    bundle = build.setup_data(cfg.data, None, cfg.seed, lambda m: None)
    results = []
    for _ in range(2):
        build.seed_everything(cfg.seed)
        results.append(build.sweep(cfg, bundle, rt, lambda m: None, steps=20))
    assert results[0] == results[1]


def test_cli_writes_the_png_and_json(tiny_data, tmp_path, monkeypatch, capsys):
    png = tmp_path / "curve.png"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "lr-find", *_tiny_overrides(tiny_data), "--steps", "20",
                             "--out", png, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert {"suggested_lr", "lrs", "losses", "plot"} <= set(got)
    assert got["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(got["lrs"]) == len(got["losses"]) and min(got["lrs"]) <= got["suggested_lr"] <= max(got["lrs"])
    assert not (tmp_path / "runs").exists()  # no run folder, nothing but the plot


def test_cli_default_steps_is_the_library_default():
    import inspect

    assert inspect.signature(train_cmds.lr_find_cmd).parameters["steps"].default.default == lrfind.STEPS


def test_cli_refuses_an_out_that_is_not_a_png(tiny_data, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "lr-find", *_tiny_overrides(tiny_data), "--out", tmp_path / "x.txt")
    assert code == 2
    assert "--out" in err


# --------------------------------------------------------------------------- train.lr: auto

def test_bad_lr_is_a_config_error_listing_auto():
    with pytest.raises(ConfigError) as exc:
        load(None, ["train.lr=fast"])
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith("train.lr:") and "'auto'" in exc.value.problems[0]
    assert "function-after" not in str(exc.value) and "literal[" not in str(exc.value)


def test_lr_auto_is_accepted_and_numbers_still_are():
    assert load(None, ["train.lr=auto"]).train.lr == "auto"
    assert load(None, ["train.lr=3e-4"]).train.lr == 3e-4
    assert load(None, []).train.lr == 1e-3


@pytest.mark.slow
def test_train_with_lr_auto_records_a_number(tiny_data, tmp_path):
    logs: list[str] = []
    overrides = [*_tiny_overrides(tiny_data), "train.lr=auto", "train.epochs=1", f"output_dir={tmp_path / 'runs'}"]
    summary = train_recipe.train(None, overrides, log=logs.append)
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "config.yaml").read_text())
    lr = saved["train"]["lr"]
    assert isinstance(lr, float) and lrfind.SANE_RANGE[0] <= lr <= lrfind.SANE_RANGE[1]
    assert any(m.startswith(f"train.lr: auto -> {lr:.3g}") for m in logs), logs
    plan = json.loads((tmp_path / "runs" / "run" / "freeze_plan.json").read_text())
    assert plan["lr"] == lr
    assert summary.status == "completed"
    # the same number given by hand trains the same run: the test left the RNGs as they were
    again = train_recipe.train(None, [*overrides[:-1], f"train.lr={lr}", f"output_dir={tmp_path / 'again'}"],
                               log=lambda m: None)
    assert again.best_val_acc == summary.best_val_acc and again.final_val_loss == summary.final_val_loss

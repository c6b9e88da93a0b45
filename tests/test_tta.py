"""Test-time augmentation (--tta): mirror averaging, only for runs trained with flips."""

from __future__ import annotations

import pytest
import torch
from _fixtures import run_cli

from cnnft import models
from cnnft.recipes import evaluate, predict
from cnnft.recipes import train as train_recipe
from cnnft.training import tta


def test_flip_average_is_the_mean_of_both_views():
    torch.manual_seed(0)
    m = models.build("lenet5", "none", 3).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (m(x) + m(x.flip(3))) / 2
        assert torch.allclose(tta.FlipAverage(m)(x), expected)


@pytest.fixture
def runs(tmp_path, tiny_data):
    made = {}
    for flip in ("true", "false"):
        made[flip] = train_recipe.train(None, [
            f"data.train={tiny_data}", "data.val_split=0.34", "model.backbone=lenet5", "model.weights=none",
            "data.augment=light", f"data.hflip={flip}", "train.epochs=1", f"output_dir={tmp_path / flip}"],
            log=lambda m: None).run_dir
    return made


def test_tta_on_a_run_trained_with_flips(runs, tiny_data, monkeypatch, capsys):
    plain = evaluate.evaluate(runs["true"], log=lambda m: None)
    ev = evaluate.evaluate(runs["true"], tta=True, log=lambda m: None)
    assert ev.out_dir.endswith("val-tta") and plain.out_dir.endswith("val")
    assert ev.images == plain.images
    preds = predict.predict(runs["true"], [str(tiny_data / "cats")], tta=True, log=lambda m: None)
    assert preds.predicted == 6
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", runs["true"], "--tta", "--json")
    assert code == 0, err


def test_tta_is_refused_where_mirrors_may_change_the_class(runs, tiny_data, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "predict", runs["false"], str(tiny_data / "cats"), "--tta")
    assert code == 2 and "trained without flips" in err

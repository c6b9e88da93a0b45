"""Imbalanced training sets: the warning, the loss weights and the balanced sampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cnnft.data import balance
from cnnft.data import folders as data
from cnnft.errors import ConfigError
from cnnft.recipes import train as train_recipe


def test_loss_weights():
    classes, per_class = ["a", "b"], [90, 10]
    w = balance.loss_weights("auto", classes, per_class)
    assert w is not None and w[1] / w[0] == pytest.approx(9.0) and float(w.mean()) == pytest.approx(1.0)
    assert balance.loss_weights("auto", classes, [50, 40]) is None  # balanced enough: plain loss
    assert balance.loss_weights("none", classes, per_class) is None
    assert balance.loss_weights({"b": 3.0}, classes, per_class).tolist() == [1.0, 3.0]
    with pytest.raises(ConfigError, match="unknown class"):
        balance.loss_weights({"c": 2.0}, classes, per_class)


def test_balanced_sampler_draws_classes_equally_and_repeats_per_epoch():
    labels = [0] * 90 + [1] * 10
    weights = balance.sample_weights(labels, balance.counts(labels, 2))
    s = data.EpochSampler(len(labels), seed=0, shuffle=True, weights=weights)
    drawn = Counter()
    for epoch in range(20):
        s.set_epoch(epoch)
        drawn.update(labels[i] for i in s)
    assert 0.4 < drawn[1] / (drawn[0] + drawn[1]) < 0.6
    s.set_epoch(3)
    first = list(s)
    s.set_epoch(3, start=10)
    assert list(s) == first[10:]  # a resumed epoch continues the same draw


def test_an_imbalanced_folder_is_reported_and_weighted(tmp_path, monkeypatch):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", classes=("big", "small"), per_class=12)
    for f in sorted((root / "small").iterdir())[3:]:
        f.unlink()  # 12 against 3
    losses = []
    real = torch.nn.CrossEntropyLoss

    def spy(*a, **k):
        losses.append(k.get("weight"))
        return real(*a, **k)

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", spy)
    logged: list[str] = []
    train_recipe.train(None, [f"data.train={root}", "data.val_split=0.34", "model.backbone=resnet18",
                              "model.weights=none", "data.image_size=32", "train.epochs=1",
                              f"output_dir={tmp_path / 'runs'}"], log=logged.append)
    assert any(m.startswith("warning: the training set is imbalanced") and "big 8" in m for m in logged)
    weighted = [w for w in losses if w is not None]
    assert weighted and float(weighted[0][1]) > float(weighted[0][0])

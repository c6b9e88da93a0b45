"""Training from cached activations of the frozen prefix: same results, reused only while valid."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from cnnft.recipes import train as train_recipe
from cnnft.training import cache


def _train(tmp_path: Path, data_dir: Path, *overrides: str) -> tuple[dict, list[str]]:
    logged: list[str] = []
    summary = train_recipe.train(None, [
        f"data.train={data_dir}", "data.val_split=0.34", "model.backbone=resnet18", "model.weights=none",
        "data.image_size=32", "freeze.strategy=freeze_most", "train.epochs=2", "data.num_workers=0",
        f"output_dir={tmp_path / 'runs'}", f"train.cache_dir={tmp_path / 'cache'}", *overrides],
        log=logged.append)
    return summary.to_dict(), logged


def _read(logged: list[str]) -> bool:
    """Both stored parts (train and val) were reused."""
    return sum("activations read from" in m for m in logged) == 2


def test_cached_run_equals_the_uncached_one_and_a_second_run_reuses_it(tmp_path, tiny_data):
    off, log_off = _train(tmp_path, tiny_data, "train.feature_cache=off", "data.augment=none")
    cold, log_cold = _train(tmp_path, tiny_data, "data.augment=none")
    warm, log_warm = _train(tmp_path, tiny_data, "data.augment=none")
    assert any("feature cache: off" in m for m in log_off)
    assert any("run once" in m for m in log_cold) and not any("read from" in m for m in log_cold)
    assert _read(log_warm)
    for a, b in ((off, cold), (cold, warm)):
        assert abs(a["best_val_acc"] - b["best_val_acc"]) <= 0.005
        assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-4, abs=1e-5)


def test_changed_file_size_or_setting_recomputes(tmp_path, tiny_data):
    _train(tmp_path, tiny_data, "data.augment=none")
    _, again = _train(tmp_path, tiny_data, "data.augment=none")
    assert _read(again)
    img = next((tiny_data / "cats").iterdir())
    later = time.time() + 5
    os.utime(img, (later, later))  # the same bytes, a new modification time
    _, touched = _train(tmp_path, tiny_data, "data.augment=none")
    assert not _read(touched)
    _, resized = _train(tmp_path, tiny_data, "data.augment=none", "data.image_size=40")
    assert not _read(resized)
    _, boundary = _train(tmp_path, tiny_data, "data.augment=none", "freeze.trainable_stages=2")
    assert not _read(boundary)


def test_augmented_views_and_the_disk_path_under_a_tiny_memory_budget(tmp_path, tiny_data, monkeypatch):
    kinds: list[type] = []
    original = cache.CachedFeatures.__init__

    def spy(self, store, *rest):
        kinds.append(type(store.data))
        original(self, store, *rest)

    monkeypatch.setattr(cache.CachedFeatures, "__init__", spy)
    summary, logged = _train(tmp_path, tiny_data, "data.augment=light", "train.cache_views=3",
                             "train.cache_budget_mb=0", "train.epochs=3")
    assert any("3 augmented view(s)" in m for m in logged)
    assert kinds and all(issubclass(k, np.memmap) for k in kinds)  # read from the cache folder, not memory
    assert summary["epochs_completed"] == 3
    assert list((tmp_path / "cache").glob("*.npy"))
    # never more views than epochs: a 2-epoch run computes 2 of the 3 asked for
    _, two = _train(tmp_path, tiny_data, "data.augment=light", "train.cache_views=3", "train.epochs=2")
    assert any("2 augmented view(s)" in m for m in two)


@pytest.mark.parametrize("strategy,views", [("head_only", 4), ("freeze_most", 2)])
def test_cache_views_auto_gives_a_frozen_backbone_more_views(tmp_path, tiny_data, strategy, views):
    # a fully frozen backbone leaves the head only the augmented views to learn from
    _, logged = _train(tmp_path, tiny_data, "data.augment=light", f"freeze.strategy={strategy}",
                       f"train.epochs={views}")
    assert any(f"{views} augmented view(s)" in m for m in logged), logged

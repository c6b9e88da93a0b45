"""Views computed in the epoch that first trains on them, the head phase's features from a pass
already made, the disk refused up front, and progress lines in long phases."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from cnnft import progress
from cnnft.errors import NoSpaceError
from cnnft.training import cache, store
from cnnft.data import folders

from _fixtures import train_small


def _tiny_split():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(10, 3, 8, 8)
    model(x[:2])
    for p in model[0].parameters():
        p.requires_grad_(False)
    split, why = cache.find_split(model, x[:2])
    assert split is not None, why
    return split, x


def test_each_view_is_computed_in_the_epoch_that_first_trains_on_it():
    split, x = _tiny_split()
    asked: list[tuple[int, list[list[int]]]] = []

    def images(view, batches):
        asked.append((view, batches))
        for b in batches:
            yield x[b] + view, torch.zeros(len(b), dtype=torch.long)

    shape = split.prefix(x[:1]).shape[1:]
    st = cache.Store.allocate(2, 10, shape, in_memory=True)
    ds = cache.CachedFeatures(st, [0] * 10, 2, cache.Live(split, images, lambda t: t))
    loader = cache.cached_loader(ds, torch.utils.data.RandomSampler(range(10)), 4)
    seen = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        seen.append([a for a, _ in loader])
        assert st.complete(0) and st.complete(1) == (epoch >= 1)
    assert [v for v, _ in asked] == [0, 1]  # one pass per view, none again once stored
    with torch.no_grad():
        assert torch.allclose(st.batch(1, [3]), split.prefix(x[3:4] + 1), atol=1e-6)
    served = torch.cat(seen[0]), torch.cat(seen[2])  # epoch 3 reads what epoch 1 computed
    assert sorted(served[0].flatten().tolist()) == pytest.approx(sorted(served[1].flatten().tolist()))


def test_a_store_too_big_for_the_disk_is_refused_before_anything_runs(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(NoSpaceError) as e:
        cache.Store.allocate(4, 100_000, (64, 16, 16), in_memory=False, disk=(tmp_path, "k"))
    need = store.size_of(4, 100_000, (64, 16, 16))
    assert e.value.needed == need and "train.cache_dir" in e.value.hint
    assert not list(tmp_path.glob("*.npy"))


def test_progress_lines_every_tenth_or_half_minute_with_rate_and_eta():
    now = [0.0]
    lines: list[str] = []
    p = progress.Lines("caching", 1000, lines.append, clock=lambda: now[0])
    for _ in range(4):  # 25 per second: a tenth done within the first 5 s, which stay quiet
        now[0] += 1
        p.update(25)
    assert lines == []
    now[0] += 1
    p.update(25)  # 125 done: a new tenth after the quiet start
    assert lines == ["caching: 125/1,000 images (12%), 25 images/s, ETA 35s"]
    now[0] += 31
    p.update(1)  # no new tenth, but half a minute since the last line
    assert len(lines) == 2 and "126/1,000" in lines[-1]
    p.close()
    assert lines[-1].startswith("caching: 126 images in 36s")


def test_the_pre_scan_reports_progress_in_plain_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(progress.Lines, "quiet_seconds", 0.0)
    paths = [str(tmp_path / f"{i}.png") for i in range(20)]
    for p in paths:
        open(p, "wb").close()
    lines: list[str] = []
    folders.verify_images(paths, "skip", "data", lines.append)
    assert any(m.startswith("checking images: ") and "images/s, ETA" in m for m in lines), lines


class _Marks:
    """Every image decode counted; ``log`` records each message with the decodes before it."""

    def __init__(self, monkeypatch) -> None:
        self.decodes, self.marks = 0, []
        original = folders.open_image

        def counted(*a, **k):
            self.decodes += 1
            return original(*a, **k)

        monkeypatch.setattr(folders, "open_image", counted)

    def log(self, m: str) -> None:
        self.marks.append((self.decodes, m))

    def at(self, text: str) -> int:
        """Images decoded before the first message containing ``text``."""
        return next(d for d, m in self.marks if text in m)


def test_the_head_phase_reads_the_strategys_un_augmented_view_zero(tmp_path, tiny_data, pretrained_file, monkeypatch):
    seen = _Marks(monkeypatch)
    summary = train_small(tmp_path, tiny_data, "freeze.strategy=head_only", f"model.weights={pretrained_file}",
                          "train.head_phase=true", "data.augment=light", "train.epochs=2", log=seen.log).to_dict()
    logged, at = [m for _, m in seen.marks], seen.at

    assert any("the un-augmented one (the head phase's), then 1 augmented" in m for m in logged), logged
    n = summary["train_images"]
    # the head phase computes view 0 (one pass over the training images, none of its own
    # besides), epoch 1 reads it without decoding an image, epoch 2 computes view 1 as it trains
    assert n <= at("the strategy's stored activations") - at("run once") <= n + 2  # + the cut's 2-image sample
    assert at("head phase  train") == at("the strategy's stored activations")
    assert at("epoch 1/2") == at("head phase  train")
    assert at("epoch 2/2") - at("epoch 1/2") == n


def _head_row(summary) -> dict:
    import csv
    from pathlib import Path

    with open(Path(summary.run_dir) / "metrics.csv", newline="") as f:
        return next(r for r in csv.DictReader(f) if r["epoch"] == "0")


def test_a_strategy_cut_earlier_feeds_the_head_phase_without_a_pass_of_its_own(tmp_path, tiny_data, pretrained_file,
                                                                             monkeypatch):
    """freeze_most cuts after layer3 (stage3), the head phase's features lie after the last stage: view 0
    is computed once, the frozen rest runs on it to give the head's inputs, and epoch 1 reads it."""
    from cnnft.run import cached

    seen = _Marks(monkeypatch)
    args = ("freeze.strategy=freeze_most", f"model.weights={pretrained_file}", "train.head_phase=true",
            "data.augment=light", "train.epochs=2")
    summary = train_small(tmp_path / "shared", tiny_data, *args, log=seen.log)
    logged, at = [m for _, m in seen.marks], seen.at

    assert any("stored activations after layer3" in m and "run on to the head" in m for m in logged), logged
    n = summary.train_images
    assert n <= at("the strategy's stored activations") - at("run once") <= n + 2  # + the cut's 2-image sample
    assert at("epoch 1/2") == at("the strategy's stored activations"), "epoch 1 reads view 0"
    assert at("epoch 2/2") - at("epoch 1/2") == n

    # the same head phase as one that makes its own pass over the images
    monkeypatch.setattr(cached, "_head_from_earlier_cut", lambda *a, **k: None)
    seen.marks.clear()
    own = train_small(tmp_path / "own", tiny_data, *args, log=seen.log)
    assert not any("run on to the head" in m for _, m in seen.marks)
    a, b = _head_row(summary), _head_row(own)
    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-4), k


def test_a_long_epoch_without_a_terminal_logs_plain_progress_lines(monkeypatch):
    monkeypatch.setattr(progress.Lines, "quiet_seconds", 0.0)
    lines: list[str] = []
    loader = progress.epoch_bar(list(range(20)), 2, 10, False, lines.append)
    assert list(loader) == list(range(20))  # every batch, in order
    assert any(m.startswith("training (epoch 3 of 10): ") and "steps/s, ETA" in m for m in lines), lines
    assert lines[-1].startswith("training (epoch 3 of 10): 20 steps in")
    assert not any("epoch 3/10" in m for m in lines), "never mistaken for the epoch's own line"
    assert progress.epoch_bar(loader, 2, 10, False) is loader  # no log: the loader as it is


def test_train_at_a_non_terminal_logs_epoch_progress_unless_quiet(tmp_path, tiny_data, monkeypatch, capsys):
    from _fixtures import run_cli

    monkeypatch.setattr(progress.Lines, "quiet_seconds", 0.0)
    args = ("train", f"data.train={tiny_data}", "data.val_split=0.34", "data.image_size=32", "data.num_workers=0",
            "data.batch_size=2", "model.backbone=lenet5", "model.weights=none", "train.epochs=1",
            f"output_dir={tmp_path / 'runs'}")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "training (epoch 1 of 1): " in err and "steps/s" in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "-q")
    assert code == 0 and "training (epoch 1 of 1)" not in err and "epoch 1/1" in err

"""Loaders and folder listing: loader workers leave signals to the main process, a training
loader never ends on a batch of one, and hidden files and folders are never data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _robust import make_dataset, subprocess_env
from torch.utils.data import Dataset

from cnnft.data import folders as data

REPO = Path(__file__).resolve().parents[1]


class _Pids(Dataset):
    """Item i -> the pid of the process that loaded it (slowly, so the loader is mid-epoch)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> int:
        time.sleep(0.01)
        return os.getpid()


def test_workers_ignore_sigterm_from_others_and_the_loader_finishes() -> None:
    """`kill -- -PGID`, `timeout` or Slurm signal the workers too; they must keep serving
    batches and leave the decision to the main process."""
    loader = data.make_loader(_Pids(), batch_size=2, num_workers=2)
    seen: list[int] = []
    for i, batch in enumerate(loader):
        seen += batch.tolist()
        if i == 2:
            workers = sorted(set(seen) - {os.getpid()})
            assert len(workers) == 2
            for pid in workers:  # sent by another process, as a group signal is
                subprocess.run(["kill", "-TERM", str(pid)], check=True)
            time.sleep(0.2)
    assert len(seen) == 40


def test_exit_with_a_live_loader_iterator_does_not_hang(tmp_path: Path) -> None:
    """At exit Python ends leftover loader workers with SIGTERM from the main process and waits
    for them: a worker that ignored every SIGTERM would hang the exit forever."""
    script = tmp_path / "live.py"
    script.write_text(textwrap.dedent("""
        from cnnft.data import folders as data
        loader = data.make_loader(list(range(100)), batch_size=2, num_workers=2)
        LIVE = iter(loader)
        next(LIVE)
        print("leaving with workers alive", flush=True)
    """))
    env = subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "leaving with workers alive" in res.stdout, res.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("n, sampler, sizes", [
    (9, True, [4, 4]),  # training: a lone last image is left out (BatchNorm cannot train on 1)
    (10, True, [4, 4, 2]),
    (9, False, [4, 4, 1]),  # evaluation sees every image
])
def test_training_loader_never_ends_on_a_batch_of_one(n: int, sampler: bool, sizes: list[int]) -> None:
    s = data.EpochSampler(n, seed=0, shuffle=True) if sampler else None
    loader = data.make_loader(torch.arange(n), batch_size=4, num_workers=0, sampler=s)
    assert [len(b) for b in loader] == sizes and len(loader) == len(sizes)
    if sampler:  # a resumed epoch (starting after whole batches) keeps the same batches
        s.set_epoch(0, start=4)
        assert [len(b) for b in loader] == sizes[1:]


def test_hidden_files_and_folders_are_never_data(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", n=2)
    make_dataset(root / "a" / ".ipynb_checkpoints", classes=("x",), n=2)
    make_dataset(root / "b" / "sub", classes=(".git",), n=1)
    make_dataset(root / "b" / "sub", classes=("deep",), n=1)
    (root / "a" / ".hidden.png").write_bytes((root / "a" / "000.png").read_bytes())
    make_dataset(root, classes=(".trash",), n=1)
    classes, paths, labels = data.scan_folder(root, "data.train")
    rel = [str(Path(p).relative_to(root)) for p in paths]
    assert classes == ["a", "b"]
    assert rel == ["a/000.png", "a/001.png", "b/000.png", "b/001.png", "b/sub/deep/000.png"]
    assert labels == [0, 0, 1, 1, 1]
    assert data.image_files(root / "a", "x") == [str(root / "a" / "000.png"), str(root / "a" / "001.png")]


def _augmented(root: Path, seed: int = 5):
    from cnnft.data import transforms
    from cnnft.models import Preprocess

    classes, paths, labels = data.scan_folder(str(make_dataset(root, n=5, size=24)), "data.train")
    pre = Preprocess(resize_size=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return data.ImageDataset(data._folder_source(paths, labels), transforms.train_transform(pre, "strong", True),
                             seed=seed)


def test_augmentation_is_fixed_per_image_and_epoch_whatever_the_worker(tmp_path: Path) -> None:
    """A sample's augmentation depends on (seed, epoch, index) only: not on the loader worker
    that draws it, nor on what was drawn before; the caller's global generator is untouched."""
    ds = _augmented(tmp_path)
    ds.set_epoch(3)
    state = torch.get_rng_state()
    alone = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(torch.get_rng_state(), state), "augmenting must not move the global generator"
    for workers in (0, 2):
        loader = data.make_loader(ds, batch_size=5, num_workers=workers, sampler=data.EpochSampler(len(ds), 0, True),
                                  generator=torch.Generator().manual_seed(workers))
        order = list(loader.sampler)
        drawn = torch.cat([x for x, _ in loader])
        assert torch.equal(drawn, alone[order]), f"num_workers={workers}"
    ds.set_epoch(4)
    assert not torch.equal(ds[0][0], alone[0]), "another epoch draws another augmentation"


def test_persistent_workers_draw_each_epochs_augmentation(tmp_path: Path) -> None:
    """Workers kept alive between epochs (the CUDA default) hold their own copy of the dataset:
    the epoch travels with each index, so epoch after epoch they draw what a fresh loader draws."""
    ds = _augmented(tmp_path)

    def epochs(persistent: bool) -> list[torch.Tensor]:
        sampler = data.EpochSampler(len(ds), 0, True)
        loader = data.make_loader(ds, batch_size=5, num_workers=1, sampler=sampler, persistent=persistent)
        assert loader.persistent_workers == persistent
        out = []
        for epoch in (1, 2, 3):
            sampler.set_epoch(epoch, start=1 if epoch == 3 else 0)  # epoch 3 resumed after one sample
            ds.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    fresh, kept = epochs(False), epochs(True)
    assert all(torch.equal(a, b) for a, b in zip(fresh, kept))
    assert not torch.equal(kept[0], kept[1]) and len(kept[2]) == len(ds) - 1
    assert not data.make_loader(ds, batch_size=5, num_workers=0, persistent=True).persistent_workers


def test_a_run_is_the_same_with_and_without_loader_workers(tmp_path: Path) -> None:
    """data.num_workers changes how fast images are augmented, never which augmentation they get."""
    import csv

    from cnnft.recipes import train as train_recipe

    make_dataset(tmp_path / "data", n=10, size=24)
    rows = {}
    for workers in (0, 2):
        s = train_recipe.train(None, [f"data.train={tmp_path / 'data'}", "data.image_size=32", "data.batch_size=4",
                                      "data.augment=light", f"data.num_workers={workers}", "model.backbone=lenet5",
                                      "model.weights=none", "train.epochs=2", "train.device=cpu", "seed=7",
                                      f"output_dir={tmp_path / 'runs'}", f"name=w{workers}"], log=lambda m: None)
        with open(Path(s.run_dir) / "metrics.csv", newline="") as f:
            rows[workers] = [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"]) for r in csv.DictReader(f)]
    assert rows[0] == rows[2]

"""Runs shared by the evaluate/predict/report/export tests, each trained once per session.

The test modules wrap these in session fixtures; the module-level cache makes sure a run
is trained once even though every module registers its own fixture.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cnnft.recipes import train as train_recipe

_cache: dict[str, object] = {}


def _once(key: str, make: Callable[[], dict]) -> dict:
    if key not in _cache:
        try:
            _cache[key] = make()
        except BaseException as exc:  # a failed training fails every test that needs it, once
            _cache[key] = exc
    value = _cache[key]
    if isinstance(value, BaseException):
        raise value
    return value  # type: ignore[return-value]


def hymenoptera_run(tmp_path_factory, hymenoptera: Path) -> dict:
    """The real run: efficientnet_lite0 (packaged ImageNet weights), head_only, 2 epochs."""

    def make() -> dict:
        base = tmp_path_factory.mktemp("hym")
        cfg = base / "hym.yaml"
        cfg.write_text(
            "name: hym\n"
            "seed: 0\n"
            "data:\n"
            f"  train: {hymenoptera / 'train'}\n"
            f"  val: {hymenoptera / 'val'}\n"
            "  augment: light\n"
            "  num_workers: 2\n"
            "model:\n"
            "  backbone: efficientnet_lite0\n"
            "freeze:\n"
            "  strategy: head_only\n"
            "train:\n"
            "  epochs: 2\n"
            "  lr: 0.01\n"
        )
        return train_recipe.train(cfg, [f"output_dir={base / 'runs'}"], log=lambda m: None).to_dict()

    return _once("hymenoptera", make)


def random_image_folder(root: Path, classes=("a", "b"), per_class: int = 6, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def tiny_run(tmp_path_factory) -> dict:
    """A random-init resnet18 trained one epoch on 2 classes x 6 random 40x40 PNGs at 32 px."""

    def make() -> dict:
        base = tmp_path_factory.mktemp("tiny")
        data = random_image_folder(base / "data")
        overrides = [f"data.train={data}", "data.image_size=32", "data.num_workers=0", "data.batch_size=4",
                     "model.backbone=resnet18", "model.weights=none", "train.epochs=1",
                     f"output_dir={base / 'runs'}", "name=tiny"]
        return train_recipe.train(None, overrides, log=lambda m: None).to_dict()

    return _once("tiny", make)


def train_small(tmp_path: Path, data_dir: Path, *overrides: str, resume=None, log=None):
    """Train on a tiny image folder (a third held out) at 32 px in batches of 4, caching into
    ``tmp_path``; a resumed run takes only ``overrides``."""
    base = [] if resume else [f"data.train={data_dir}", "data.val_split=0.34", "data.image_size=32",
                              "data.num_workers=0", "data.batch_size=4",
                              f"output_dir={tmp_path / 'runs'}", f"train.cache_dir={tmp_path / 'cache'}"]
    return train_recipe.train(None, base + list(overrides), resume=resume, log=log or (lambda m: None))


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``cnnft ARGS`` in-process through the real entry point (error -> exit code mapping)."""
    from cnnft import cli

    monkeypatch.setattr(sys, "argv", ["cnnft", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def random_batchnorm(model) -> None:
    """BatchNorm statistics and affine parameters far from a fresh layer's, so that merging
    them into a convolution has work to do."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)

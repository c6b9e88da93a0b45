"""Shared fixtures: the real datasets folder and tiny generated image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def datasets_dir() -> Path:
    """Real datasets: $CNNFT_DATASETS, else ../shared/datasets beside the repo."""
    return Path(os.environ.get("CNNFT_DATASETS", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    root = datasets_dir() / "hymenoptera_data"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        pytest.fail(f"real dataset missing: {root} (set CNNFT_DATASETS to the folder holding hymenoptera_data)")
    return root


def make_image_folder(root: Path, classes=("cats", "dogs"), per_class: int = 6, size: int = 24, seed: int = 0) -> Path:
    """A class-per-folder dataset of small random PNGs whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full((size, size, 3), 60 + 120 * c, dtype=np.float64)
            arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def pretrained_file(tmp_path: Path) -> Path:
    """A resnet18 state dict standing in for pretrained weights (a local weights file)."""
    import torch

    from cnnft import models

    torch.manual_seed(3)
    path = tmp_path / "resnet18.pth"
    torch.save(models.build("resnet18", "none", 1000).model.state_dict(), path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_a_temporary_folder(tmp_path_factory):
    """Runs keep their stored activations out of the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old

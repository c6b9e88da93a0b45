"""Packaged torchvision datasets: read from data.root when present, a clear error when absent
or when the download fails. Tiny stand-in files in torchvision's own format keep it offline."""

from __future__ import annotations

import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnft.config import DataConfig
from cnnft.data import folders as data
from cnnft.errors import DataError
from cnnft.recipes import train as train_recipe


def _idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format of (Fashion-)MNIST's raw files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 2  # classes 0 and 1, told apart by brightness
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 150
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def _build(root: Path, name: str, download: bool) -> data.DataBundle:
    return data.build_data(DataConfig(dataset=name, root=str(root), download=download), seed=0)


def test_packaged_torchvision_dataset_from_data_root(tmp_path):
    bundle = _build(_fashion_mnist(tmp_path / "datasets"), "FashionMNIST", download=False)
    assert bundle.classes[:2] == ["T-shirt/top", "Trouser"] and len(bundle.classes) == 10
    assert (len(bundle.train), len(bundle.val)) == (40, 20)  # the dataset's own test split as val
    img = bundle.train.load(1)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    assert bundle.train.labels[:4] == [0, 1, 0, 1]


def test_training_on_a_packaged_torchvision_dataset(tmp_path):
    _fashion_mnist(tmp_path / "datasets")
    cfg = {"name": "fm", "output_dir": str(tmp_path / "runs"),
           "data": {"dataset": "fashionmnist", "root": str(tmp_path / "datasets"), "image_size": 32,
                    "augment": "none", "batch_size": 8, "num_workers": 0},
           "model": {"backbone": "resnet18", "weights": "none"}, "train": {"epochs": 1, "lr": 0.01}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    summary = train_recipe.train(tmp_path / "cfg.yaml", [], log=lambda m: None).to_dict()
    assert (summary["train_images"], summary["val_images"], summary["epochs_completed"]) == (40, 20, 1)
    assert summary["classes"][1] == "Trouser"


def test_packaged_dataset_absent_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar10 is not present in") as info:
        _build(tmp_path, "cifar10", download=False)
    assert "data.download=true" in info.value.hint


def test_packaged_dataset_download_failure(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download fashionmnist into") as info:
        _build(tmp_path, "fashionmnist", download=True)
    assert "network" in info.value.hint and "data.root" in info.value.hint
    assert not list((tmp_path / "FashionMNIST" / "raw").glob("*-ubyte")), "nothing half-downloaded kept as data"


def test_stratified_split_keeps_proportions_sizes_and_no_overlap():
    from cnnft.data.samples import stratified_split

    labels = [0] * 50 + [1] * 30 + [2] * 20 + [3] * 1  # a class of one stays in training
    train, val = stratified_split(labels, 0.2, seed=5)
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(labels)))
    per_class = {c: sum(labels[i] == c for i in val) for c in range(4)}
    assert per_class == {0: 10, 1: 6, 2: 4, 3: 0}
    assert stratified_split(labels, 0.2, seed=5) == (train, val)  # the seed fixes it
    assert stratified_split(labels, 0.2, seed=6)[1] != val

"""Packaged datasets: scikit-learn's digits (offline) and torchvision's classification sets,
read from ``data.root`` (or downloaded into it when ``data.download`` allows)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import DataError
from .samples import Source, stratified_split, to_rgb


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images 8x8 in 0..16, targets), read from the file it ships
    without importing scikit-learn (a second or more: validate counts digits in a moment);
    through load_digits where the file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _digits() -> tuple[list[str], Source]:
    raw, target = digits_arrays()
    images = (raw * (255.0 / 16.0)).round().astype(np.uint8)

    def load(i: int, draft=None) -> Image.Image:
        return Image.fromarray(images[i], "L").convert("RGB")

    return [str(c) for c in range(10)], Source([f"digits:{i}" for i in range(len(images))],
                                               [int(t) for t in target], load)


def _tv(cls_name: str, train_kw: dict, val_kw: dict):
    def make(root: str, download: bool, split: str):
        import torchvision.datasets as D

        ds = getattr(D, cls_name)(root=root, download=download, **(train_kw if split == "train" else val_kw))
        classes = list(getattr(ds, "classes", []) or [])
        labels = [int(y) for y in _targets(ds)]
        if not classes:
            classes = [str(i) for i in range(max(labels) + 1)]

        def load(i: int, draft=None) -> Image.Image:
            return to_rgb(ds[i][0])

        return classes, Source([f"{cls_name.lower()}:{split}:{i}" for i in range(len(labels))], labels, load)

    return make


def _targets(ds) -> list[int]:
    for attr in ("targets", "_labels", "labels", "y"):
        t = getattr(ds, attr, None)
        if t is not None:
            return list(t.tolist() if hasattr(t, "tolist") else t)
    return [ds[i][1] for i in range(len(ds))]


# packaged datasets: name -> factory(root, download, split) -> (classes, Source); None for val
# means "split the training set by data.val_split"
PACKAGED: dict[str, Callable | None] = {
    "cifar10": _tv("CIFAR10", {"train": True}, {"train": False}),
    "cifar100": _tv("CIFAR100", {"train": True}, {"train": False}),
    "mnist": _tv("MNIST", {"train": True}, {"train": False}),
    "fashionmnist": _tv("FashionMNIST", {"train": True}, {"train": False}),
    "flowers102": _tv("Flowers102", {"split": "train"}, {"split": "val"}),
    "oxfordiiitpet": _tv("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "dtd": _tv("DTD", {"split": "train"}, {"split": "val"}),
    "food101": _tv("Food101", {"split": "train"}, {"split": "test"}),
    "stl10": _tv("STL10", {"split": "train"}, {"split": "test"}),
    "eurosat": _tv("EuroSAT", {}, {}),  # one split only: divided by data.val_split
}
NO_VAL_SPLIT = {"eurosat"}


def load_packaged(name: str, root: str, download: bool, val_split: float, seed: int) -> tuple[list[str], Source, Source]:
    """(classes, train, val) of a packaged dataset (digits offline; torchvision sets from ``root``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "digits":
        classes, src = _digits()
        tr, va = stratified_split(src.labels, val_split, seed)
        return classes, src.subset(tr), src.subset(va)
    if key not in PACKAGED:
        allowed = ", ".join(["digits", *PACKAGED])
        raise DataError(f"data.dataset: unknown dataset {name!r}; packaged datasets: {allowed}")
    make = PACKAGED[key]
    try:
        classes, train = make(root, download, "train")
        if key in NO_VAL_SPLIT:
            tr, va = stratified_split(train.labels, val_split, seed)
            return classes, train.subset(tr), train.subset(va)
        _, val = make(root, download, "val")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - torchvision raises several kinds for missing data
        where = Path(root).resolve()
        what = f"could not download {name} into {where}" if download else f"{name} is not present in {where}"
        raise DataError(
            f"data.dataset: {what} ({type(exc).__name__}: {str(exc)[:200]})",
            hint=("check the network connection, or download it elsewhere and copy it into data.root"
                  if download else "set data.download=true to fetch it, or point data.root at a copy"),
        ) from None
    return classes, train, val

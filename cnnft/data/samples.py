"""Datasets without torch: class folders listed (not decoded), samples as ids and labels with
a loader of RGB images, and the stratified split.

Kept apart from :mod:`cnnft.data.folders` (loaders, which need torch) so that ``cnnft validate``,
``cnnft init`` and the packaged sets can count images and classes without importing torch.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float greyscale are rescaled, not clipped;
    transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")

@dataclass
class Source:
    """Samples (ids and labels) and how to load one as an RGB image."""

    ids: list[str]
    labels: list[int]
    load: Callable[[int, int | None], Image.Image]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> "Source":
        base = self.load
        idx = list(idx)
        return Source([self.ids[i] for i in idx], [self.labels[i] for i in idx],
                      lambda i, draft=None: base(idx[i], draft))

def _hidden(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store, ._photo.jpg (macOS resource forks), .git ...
    return name.startswith(".")

def _unreadable_folder(key: str, folder: str | Path, exc: OSError) -> DataError:
    return DataError(f"{key}: cannot read folder {folder}: {exc.strerror or exc}",
                     hint=f"give your user read access to it (chmod -R u+rX {folder}), or move it out of the dataset")

def _entries(folder: Path, key: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise _unreadable_folder(key, folder, exc) from None

def _is_dir(entry: os.DirEntry, follow_symlinks: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False  # cannot even be examined: not a folder to descend into

def image_files(folder: str | Path, key: str) -> list[str]:
    """Image files under ``folder`` at any depth, sorted; hidden files and folders (a name
    starting with '.') are skipped at every level. A folder that cannot be listed is a
    DataError naming it; a file that cannot be examined is listed, so that the image check
    reports it like any other unreadable image."""
    found, todo = [], [Path(folder)]
    while todo:
        for e in _entries(todo.pop(), key):
            if _is_dir(e, follow_symlinks=False):
                todo.append(Path(e.path))
                continue
            if Path(e.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                ok = e.is_file()  # follows symlinks: a dangling one is no image
            except OSError:
                ok = True
            if ok:
                found.append(e.path)
    return sorted(found)

def _check_root(root: Path, key: str) -> None:
    try:
        st = root.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{key}: folder not found: {root}",
                            hint="check the path (relative paths are from the current directory)") from None
        raise _unreadable_folder(key, root, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{key}: not a folder: {root}", hint="point it at a folder with one sub-folder per class")

def listed(names: Sequence[str], most: int = 20) -> str:
    """Names for a message: the first ``most`` of a long list and how many more (10,000 empty
    class folders make one line, not 80 KB)."""
    shown = ", ".join(names[:most])
    return shown + (f", ... and {len(names) - most:,} more ({len(names):,} in all)" if len(names) > most else "")


def class_mismatch(key: str, classes: Sequence[str], other: Sequence[str], against: str,
                   missing: str) -> str | None:
    """What differs between a split's class folders (``other``, read at ``key``) and ``classes``:
    one sentence naming the folders only one side has (``missing`` labels those ``other`` lacks);
    None when both hold the same names."""
    if sorted(other) == sorted(classes):
        return None
    lacks, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
    return (f"{key}: class folders differ from {against}"
            + (f"; {missing}: {', '.join(lacks[:10])}" if lacks else "")
            + (f"; only in {key.split('.')[-1]}: {', '.join(extra[:10])}" if extra else ""))


def scan_folder(root: str | Path, key: str, min_classes: int = 2) -> tuple[list[str], list[str], list[int]]:
    """List a class-per-folder dataset: (classes, file paths, labels). Hidden folders and
    files are not part of it. Training needs 2 classes; evaluating or extracting features
    (``min_classes=1``) works on one."""
    root = Path(root).expanduser()
    _check_root(root, key)
    entries = _entries(root, key)
    classes = [e.name for e in entries if _is_dir(e)]
    if not classes:
        loose = any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in entries)
        raise DataError(
            f"{key}: {root} has no class sub-folders",
            hint="lay images out as ROOT/<class>/<image>" + (" (images found directly in ROOT)" if loose else ""),
        )
    if len(classes) < min_classes:
        raise DataError(f"{key}: {root} has a single class ({classes[0]}); a classifier needs at least 2",
                        hint="add a folder for each other class: ROOT/<class>/<image>")
    paths, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        files = image_files(root / cls, key)
        if not files:
            empty.append(cls)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise DataError(
            f"{key}: {len(empty):,} class folder(s) with no images in {root}: {listed(empty)}",
            hint=f"add images or remove the folder(s); image types read: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    return classes, paths, labels

def scan_images(root: str | Path, key: str) -> tuple[list[str], list[str], list[int], str | None]:
    """A folder to embed: class folders give labels as in :func:`scan_folder`; images lying
    directly in ``root`` (alone or beside sub-folders) make it unlabelled: every image under
    it, label -1, no classes, and a note that says so. Returns (classes, paths, labels, note)."""
    root = Path(root).expanduser()
    _check_root(root, key)
    entries = _entries(root, key)
    if not any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and not _is_dir(e) for e in entries):
        return (*scan_folder(root, key, min_classes=1), None)
    paths = image_files(root, key)
    beside = " (and in its sub-folders)" if any(_is_dir(e) for e in entries) else ""
    note = (f"{key}: images lie directly in {root}{beside}, so they have no class: labels are -1 and "
            f"classes is empty (for labels, put each class's images in ROOT/<class>/)")
    return [], paths, [-1] * len(paths), note

def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) keeping class proportions; the same seed gives the same split."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for y, idx in sorted(by_class.items()):
        idx = list(rng.permutation(idx))
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)

"""Exact duplicates: images whose decoded pixels are identical, within a split and across splits.

The hash is of the decoded RGB pixels and the image size, not of the file's bytes, so a PNG
saved from a JPEG, a copy with other metadata or another name still matches. One decode per
image also gives what the other checks need: its size, its colour mode and whether it reads at
all. ``train`` runs :func:`check_before_training` (``data.check``): images in more than one
split inflate the validation accuracy and pick the wrong checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from ..errors import DataError
from .folders import DataBundle
from .samples import Source, to_rgb

Log = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    """What one decode of an image tells: its pixel hash, size, colour mode, or why it failed."""

    hash: str | None
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str | None = None


def _decode(source: Source, i: int) -> ImageInfo:
    path = source.ids[i]
    try:
        if os.path.isfile(path):  # a file: its own colour mode, before conversion to RGB
            with Image.open(path) as img:
                mode = img.mode
                img.load()
                rgb = to_rgb(img)
        else:  # a packaged set's sample
            rgb = source.load(i, None)
            mode = rgb.mode
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the image unusable
        return ImageInfo(None, error=f"cannot decode: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}")
    h = hashlib.sha1(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return ImageInfo(h.hexdigest(), rgb.width, rgb.height, mode)


def scan(splits: dict[str, Source], workers: int | None = None) -> dict[str, list[ImageInfo]]:
    """Decode every image of every split once (threads: the decoders release the GIL)."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {name: list(pool.map(lambda i, s=src: _decode(s, i), range(len(src)))) for name, src in splits.items()}


def exact_groups(splits: dict[str, Source], infos: dict[str, list[ImageInfo]]) -> list[dict]:
    """Sets of two or more images with identical pixels: each lists its images (split, path,
    label index) and whether it spans splits (``leak``). Largest groups first."""
    by_hash: dict[str, list[dict]] = {}
    for name, src in splits.items():
        for i, info in enumerate(infos[name]):
            if info.hash is not None:
                by_hash.setdefault(info.hash, []).append({"split": name, "index": i, "path": src.ids[i],
                                                          "label": src.labels[i]})
    groups = []
    for h, members in by_hash.items():
        if len(members) > 1:
            names = sorted({m["split"] for m in members}, key=list(splits).index)
            groups.append({"hash": h, "images": members, "splits": names, "leak": len(names) > 1})
    return sorted(groups, key=lambda g: (-len(g["images"]), g["images"][0]["path"]))


def bundle_splits(bundle: DataBundle) -> dict[str, Source]:
    """The splits of a run's data: train, val and, when set, test."""
    return {"train": bundle.train, "val": bundle.val, **({"test": bundle.test} if bundle.test is not None else {})}


def check_before_training(mode: str, bundle: DataBundle, log: Log) -> list[dict]:
    """``data.check``: find images with identical pixels in more than one split and say so in one
    line (``warn``), stop with a DataError (``error``) or skip the check (``off``). Returns the leaks."""
    if mode == "off":
        return []
    splits = bundle_splits(bundle)
    leaks = [g for g in exact_groups(splits, scan(splits)) if g["leak"]]
    n = sum(len(s) for s in splits.values())
    if not leaks:
        log(f"data check: no exact copies across {'/'.join(splits)} ({n} images); "
            "`cnnft check CONFIG` also looks for near-duplicates and likely label errors")
        return []
    first = leaks[0]["images"]
    msg = (f"{len(leaks)} image(s) appear in more than one split as exact copies (e.g. {first[0]['path']} "
           f"[{first[0]['split']}] = {first[1]['path']} [{first[1]['split']}]): they inflate validation accuracy")
    if mode == "error":
        raise DataError(f"data check: {msg}", hint="remove the copies from one split (list them all with "
                        "`cnnft check CONFIG`), or set data.check=warn")
    log(f"warning: data check: {msg}; list them: cnnft check CONFIG (data.check=off skips this)")
    return leaks

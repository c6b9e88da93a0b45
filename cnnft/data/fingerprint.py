"""What a run was trained on, in a few numbers: images per class in train and val and a digest
of the file list with its labels. A checkpoint records it; ``--resume`` compares it with the
data as it is now, so a run never silently goes on with other images (files deleted, added,
renamed or moved between classes since it started re-split train and val)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter

from .samples import Source


def fingerprint(classes: list[str], train: Source, val: Source) -> dict:
    """The record of ``train`` and ``val`` kept in every checkpoint."""
    def counts(src: Source) -> list[int]:
        c = Counter(src.labels)
        return [c.get(i, 0) for i in range(len(classes))]

    return {"train": counts(train), "val": counts(val), "digest": _digest(train, val)}


def _digest(train: Source, val: Source) -> str:
    ids = [*train.ids, *val.ids]
    # relative to the folder they share, so the same files reached from another directory match
    root = os.path.commonpath(ids) if ids and all(os.sep in i for i in ids) else ""
    h = hashlib.sha256()
    for part, src in (("train", train), ("val", val)):
        for i, y in sorted(zip((os.path.relpath(i, root) if root else i for i in src.ids), src.labels)):
            h.update(f"{part}\0{y}\0{i}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def changes(before: dict, now: dict, classes: list[str]) -> str | None:
    """What differs between two fingerprints, in words (None: the same data)."""
    if before == now:
        return None
    said = []
    for part in ("train", "val"):
        was, got = before.get(part), now[part]
        if was != got and isinstance(was, list) and len(was) == len(got):
            diff = [f"{c} {a} -> {b}" for c, a, b in zip(classes, was, got) if a != b]
            said.append(f"{part} images per class: {', '.join(diff[:10])}" + (", ..." if len(diff) > 10 else "")
                        + f" ({sum(was)} -> {sum(got)} in all)")
    if not said:
        said.append("the same number of images per class, but other files (renamed, replaced or moved "
                    "between classes)")
    return "; ".join(said)

"""Forward passes over loose image files, for predict and extract.

Unlike a training dataset, a list of files given by a user may hold unreadable ones: each
becomes a per-file error instead of stopping the run.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import models, progress
from ..data import folders as data
from ..data import transforms
from .runtime import Runtime


class FileImages(Dataset):
    """Image files -> (index, tensor or None, reason or None): a bad file is a result, not a crash."""

    def __init__(self, paths: list[str], transform, draft: int | None) -> None:
        self.paths, self.transform, self.draft = paths, transform, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            return i, self.transform(data.open_image(path, self.draft)), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file unusable
            if not os.path.exists(path):
                return i, None, "file not found"
            return i, None, data.check_image(path) or f"cannot decode: {type(exc).__name__}: {exc}"[:200]


def _as_list(batch):
    return batch


@torch.inference_mode()
def forward_files(model: nn.Module, paths: list[str], pre: models.Preprocess, rt: Runtime, batch_size: int,
                  num_workers: int, show: str | None = None) -> Iterable[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
    """Yield (indices, logits, errors) per batch of files; unreadable files only appear in errors.

    ``show``: the label of a progress bar, or None for none.
    """
    model.eval()
    ds = FileImages(paths, transforms.eval_transform(pre), pre.resize_size)
    # not pinned: the samples are stacked into a new tensor after loading
    loader = data.make_loader(ds, batch_size, num_workers, collate_fn=_as_list)
    for batch in progress.bar(loader, show or "", show is not None):
        errors = {i: why for i, _, why in batch if why is not None}
        good = [(i, x) for i, x, why in batch if why is None]
        if not good:
            yield [], None, errors
            continue
        x = rt.images(torch.stack([x for _, x in good]))
        with rt.autocast():
            logits = models.logits_of(model(x)).float()
        yield [i for i, _ in good], logits.cpu(), errors

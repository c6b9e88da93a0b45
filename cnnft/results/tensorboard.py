"""TensorBoard event files for a run (optional: the tensorboard extra)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

# metrics.csv column -> TensorBoard tag (train and val share a chart)
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
                    "val_acc": "accuracy/val", "lr_head": "lr/head", "lr_backbone": "lr/backbone",
                    "images_per_second": "speed/images_per_second"}


def writer(enabled: bool):
    """A function writing one metrics row to TensorBoard, or None when ``train.tensorboard`` is off."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - missing optional dependency
        raise InputError("train.tensorboard: the tensorboard package is not installed",
                         hint="pip install 'cnnft[tensorboard]', or set train.tensorboard=false") from None
    writers: dict = {}

    def write(folder: Path, row: dict) -> None:
        w = writers.get(folder)
        if w is None:  # one event file per process, opened on the first epoch
            w = writers[folder] = SummaryWriter(str(folder))
        for key, tag in TENSORBOARD_TAGS.items():
            if row.get(key) is not None:
                w.add_scalar(tag, row[key], row["epoch"])
        w.flush()

    return write

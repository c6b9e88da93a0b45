"""Penultimate-layer features of a folder of images, saved as ``.npz`` for scikit-learn and
the like: labelled by class folders, or unlabelled (label -1) when images lie in it directly.

load a checkpoint (or a backbone's pretrained weights) -> hook the classifier's input ->
forward the files in batches -> write features, labels, classes and paths.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import files, models
from ..config import TrainConfig
from ..data import folders as data
from ..errors import CheckpointError, DataError, InputError
from ..results.rundir import RunDir
from ..run import checkpoint
from ..training import runtime
from ..training.inference import forward_files

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class Extraction:
    """What an extraction wrote: the .npz path, the model, and the images kept and skipped."""

    out: str
    model: str
    images: int
    feature_dim: int
    classes: list[str]
    skipped: list[dict]
    seconds: float
    note: str | None = None  # e.g. why the images have no labels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_checkpoint_arg(source: str | Path) -> bool:
    p = Path(source).expanduser()
    if p.exists():
        return True
    if p.suffix in (".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"checkpoint not found: {p}")
    return False


def _read_files(source: str | Path) -> tuple[tuple[Path, ...], RunDir | None]:
    """The checkpoint files ``source`` names (none for a backbone name) and its run folder."""
    p = Path(source).expanduser()
    if p.is_dir():
        run = RunDir(p)
        return (run.best, run.last), run
    return ((p,), RunDir.of_checkpoint(p)) if p.exists() else ((), None)


def _model_for(source: str | Path, device: str,
               log: Log) -> tuple[nn.Module, str, models.Preprocess, runtime.Runtime, float | None]:
    """A checkpoint's model, runtime and calibration temperature, or a backbone's pretrained one
    with the default runtime (and no temperature: its classes are not the data's)."""
    if _is_checkpoint_arg(source):
        lm = checkpoint.load_model(source)
        model, rt = lm.inference(device)
        return model, lm.name, lm.preprocess, rt, checkpoint.temperature_of(lm.checkpoint, log)
    bb = models.build(str(source), "DEFAULT", None)
    defaults = TrainConfig()
    rt = runtime.make_runtime(device, defaults.amp, defaults.channels_last, "--device")
    rt.prepare(bb.model.eval())
    return bb.model, bb.name, bb.preprocess, rt, None


def extract(
    source: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    log: Log = _stderr,
    show_progress: bool = False,
    uncalibrated: bool = False,
    force: bool = False,
) -> Extraction:
    """Penultimate-layer features (the classifier's input) for every image in a folder, saved
    as ``.npz`` with ``features``, ``labels``, ``classes`` and ``paths``. Class folders give
    the labels; images directly in the folder (the usual case for embedding) have label -1
    and ``classes`` is empty. From a checkpoint the ``.npz`` also holds ``probs``: its class
    probabilities, calibrated by its temperature (raw with ``uncalibrated``).

    ``source`` is a checkpoint/run folder, or a backbone name (its pretrained weights and
    their preprocessing, e.g. ``efficientnet_lite0`` offline). ``out`` is never one of the
    files read, nor an existing file unless ``force``.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    classes, paths, labels, note = data.scan_images(data_dir, "--data")
    if note:
        log(note)
    read, run = _read_files(source)
    out = files.check_output(out, "--out", force=force, inputs=(*read, *paths),
                             forbidden=(run.checkpoints,) if run is not None else ())
    model, name, pre, rt, temperature = _model_for(source, device, log)

    captured: list[torch.Tensor] = []
    hook = models.head_module(model).register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0].detach().float().flatten(1).cpu()))
    feats, kept, skipped, probs = [], [], [], []
    t0 = time.perf_counter()
    try:
        for idx, logits, errors in forward_files(model, paths, pre, rt, batch_size, num_workers,
                                                  "extract" if show_progress else None):
            for i, why in errors.items():
                skipped.append((paths[i], why))
                log(f"skipping unreadable {paths[i]}: {why}")
            if idx:
                feats.append(captured.pop())
                probs.append((logits.double() / (1.0 if uncalibrated else temperature or 1.0)).softmax(1))
                kept += idx
            captured.clear()
    finally:
        hook.remove()
    if not kept:
        raise DataError(f"--data: none of the {len(paths)} image(s) in {data_dir} could be read")
    features = torch.cat(feats).numpy().astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, features=features, labels=np.asarray([labels[i] for i in kept], dtype=np.int64),
             classes=np.asarray(classes, dtype=str), paths=np.asarray([paths[i] for i in kept], dtype=str),
             model=np.asarray(name, dtype=str),
             **({} if temperature is None else {"probs": torch.cat(probs).numpy().astype(np.float32)}))
    files.write_output(out, buf.getvalue(), force=force)
    return Extraction(str(out), name, len(kept), int(features.shape[1]), classes,
                      [{"path": p, "reason": r} for p, r in skipped], round(time.perf_counter() - t0, 3), note)

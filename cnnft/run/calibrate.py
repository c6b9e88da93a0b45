"""Calibrating a finished run: fit a temperature on the validation logits of each of its
checkpoints and store it in the checkpoint, so that every later use (evaluate, predict,
export, report) gives calibrated probabilities (see :mod:`cnnft.results.calibration`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .. import files
from ..data import folders as data
from ..data import transforms
from ..results import calibration
from ..results.rundir import RunDir
from ..training import engine
from . import checkpoint

Log = Callable[[str], None]


def val_probs(lm: checkpoint.LoadedModel, source: data.Source, device: str,
              batch_size: int, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw (temperature 1) softmax probabilities and labels of ``source`` under ``lm``."""
    model, rt = lm.inference(device)
    pre = lm.preprocess
    ds = data.ImageDataset(source, transforms.eval_transform(pre), pre.resize_size)
    loader = data.make_loader(ds, batch_size, num_workers, pin_memory=rt.pin_memory)
    ev = engine.evaluate(model, loader, rt)
    return ev.probs.numpy().astype(np.float64), ev.labels.numpy()


def calibrate_checkpoint(path: Path, source: data.Source, device: str, batch_size: int,
                         num_workers: int) -> dict:
    """Fit the temperature of the checkpoint at ``path`` on ``source`` and write it into the
    checkpoint (atomically); returns the fit's summary (ECE and NLL before and after)."""
    lm = checkpoint.load_model(path)
    probs, labels = val_probs(lm, source, device, batch_size, num_workers)
    t = calibration.fit_temperature(calibration.logits_from_probs(probs), labels)
    fit = calibration.summary(probs, labels, t)
    ckpt = {k: v for k, v in lm.checkpoint.items() if k != "path"}
    ckpt["temperature"], ckpt["calibration"] = fit["temperature"], fit
    checkpoint.save(ckpt, path)
    return fit


BATCH = 64  # validation images per forward pass of the fit


def calibrate_run(run: RunDir, val: data.Source, device: str, log: Log, batch_size: int = BATCH,
                  num_workers: int = 0) -> dict | None:
    """Calibrate best.pt (and last.pt when it is another file) on the validation set; returns
    ``{"val": best.pt's fit, "test": None}`` (summary.json's ``calibration``; the caller adds the
    test split's figures), or None when there is no best checkpoint or no validation image."""
    if not run.best.is_file() or len(val) == 0:
        return None
    same = run.last.is_file() and os.path.samefile(run.best, run.last)
    fit = calibrate_checkpoint(run.best, val, device, batch_size, num_workers)
    if same:  # one file under two names: keep it one
        files.atomic_link(run.best, run.last)
    elif run.last.is_file():
        calibrate_checkpoint(run.last, val, device, batch_size, num_workers)
    log(f"calibration: temperature {fit['temperature']:.3f} fitted on {fit['images']} validation images; "
        f"ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f}, NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}")
    return {"val": fit, "test": None}


def calibrated(probs: np.ndarray, labels: np.ndarray, temperature: float, uncalibrated: bool) -> tuple[np.ndarray, dict]:
    """The probabilities to report (at ``temperature``, or raw with ``uncalibrated``) and the
    calibration figures of both: ECE, NLL and the reliability table before and after."""
    cal = calibration.softmax(calibration.logits_from_probs(probs), temperature)
    fit = calibration.summary(probs, labels, temperature)
    fit.update(applied=not uncalibrated, reliability_before=calibration.reliability(probs, labels),
               reliability_after=calibration.reliability(cal, labels))
    return (probs if uncalibrated else cal), fit

"""Predict the classes of image files and folders with a trained model.

load checkpoint -> collect the files -> forward them in batches -> top-k per file. An
unreadable file is a row with an error, not a failure of the whole command.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..data import folders as data
from ..errors import DataError, InputError
from ..run import checkpoint
from ..training import runtime
from ..training.inference import forward_files
from ..training.tta import with_tta

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class Predictions:
    """Top-k classes per image; ``predictions`` rows hold path, class, prob, top_k and error."""

    checkpoint: str
    model: str
    classes: list[str]
    top_k: int
    images: int
    predicted: int
    failed: int
    predictions: list[dict]
    temperature: float = 1.0  # the calibration temperature the probabilities were computed at

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def collect_images(inputs: Iterable[str | Path], log: Log = _stderr) -> list[str]:
    """Files as given, and image files found by walking folders recursively (sorted, no
    hidden files); a path that does not exist is kept so that it is reported per file."""
    seen: dict[str, None] = {}
    for raw in inputs:
        p = Path(raw).expanduser()
        try:
            is_dir = p.is_dir()
        except OSError:  # unreadable: reported per file below
            is_dir = False
        if is_dir:
            found = data.image_files(p, str(p))
            if not found:
                log(f"{p}: no image files in this folder (looked for {', '.join(sorted(data.IMAGE_EXTENSIONS))})")
            seen.update(dict.fromkeys(found))
        else:
            seen[str(p)] = None
    return list(seen)


def _load(source: str | Path, device: str, log: Log):
    """(model, name, classes, preprocess, path, runtime, trained with flips, temperature) of a checkpoint, a run
    folder, an exported TorchScript / ONNX file with the FILE.json that ``export`` wrote beside it, or a timm
    model folder."""
    from ..models import exported as export
    from ..models import hf

    if hf.is_model_folder(source):  # a timm / Hugging Face folder: timm builds it, fp32 as exported
        folder = hf.load_folder(source)
        rt = runtime.make_runtime(device, False, False, "--device")
        rt.prepare(folder.model)
        return folder.model, folder.name, folder.classes, folder.preprocess, folder.path, rt, False, 1.0
    meta = export.export_metadata(source)
    if meta is None:
        lm = checkpoint.load_model(source)
        model, rt = lm.inference(device)
        return (model, lm.name, lm.classes, lm.preprocess, lm.path, rt, lm.config.data.hflip is True,
                checkpoint.temperature_of(lm.checkpoint, log))
    ex = export.load_export(source, meta)
    if ex.temperature is None:
        log(f"note: {ex.path}.json holds no calibration temperature (exported by an older cnnft): probabilities "
            "are uncalibrated (temperature 1)")
    # onnxruntime runs here on the CPU; a TorchScript module goes to the device asked for, in fp32
    rt = runtime.make_runtime(device if ex.export_format == "torchscript" else "cpu", False, False, "--device")
    rt.prepare(ex.model)
    return (ex.model, ex.name, ex.classes, ex.preprocess, ex.path, rt, meta.get("hflip") is True,
            1.0 if ex.temperature is None else ex.temperature)


def predict(
    source: str | Path,
    inputs: list[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    log: Log = _stderr,
    show_progress: bool = False,
    tta: bool = False,
    uncalibrated: bool = False,
) -> Predictions:
    """Class probabilities for image files and folders (walked recursively), in batches.

    ``source`` is a checkpoint, a run folder, a file written by ``export`` (TorchScript or
    ONNX) with its ``FILE.json`` beside it (classes and preprocessing), or a timm model folder
    (``export --format hf``, or one from the Hugging Face Hub: classes from its label_names).
    Probabilities are calibrated by the temperature the checkpoint or ``FILE.json`` holds (raw
    with ``uncalibrated``; a timm folder carries none).

    An unreadable file gets a row with an ``error`` and a line on ``log``; it is fatal only
    when no file at all could be read (DataError, exit code 2).
    """
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    model, name, classes, pre, path, rt, hflip_trained, temperature = _load(source, device, log)
    temperature = 1.0 if uncalibrated else temperature
    model = with_tta(model, tta, hflip_trained)
    paths = collect_images(inputs, log)
    if not paths:
        raise InputError("no image files to predict", hint="pass image files or folders that contain images")
    k = min(top_k, len(classes))
    rows: list[dict] = [{"path": p, "class": None, "prob": None, "top_k": [], "error": None} for p in paths]
    for idx, logits, errors in forward_files(model, paths, pre, rt, batch_size, num_workers,
                                             "predict" if show_progress else None):
        for i, why in errors.items():
            rows[i]["error"] = why
            log(f"cannot read {paths[i]}: {why}")
        if logits is None:
            continue
        p, c = (logits.double() / temperature).softmax(1).topk(k, dim=1)
        for row_i, ps, cs in zip(idx, p.tolist(), c.tolist()):
            top = [{"class": classes[ci], "prob": float(pi)} for pi, ci in zip(ps, cs)]
            rows[row_i].update({"class": top[0]["class"], "prob": top[0]["prob"], "top_k": top})
    failed = sum(r["error"] is not None for r in rows)
    if failed == len(rows):
        raise DataError(f"none of the {len(rows)} file(s) could be read as an image",
                        hint="check the paths; readable types: " + ", ".join(sorted(data.IMAGE_EXTENSIONS)))
    return Predictions(str(path), name, classes, k, len(rows), len(rows) - failed, failed, rows, temperature)

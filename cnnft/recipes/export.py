"""Export a checkpoint's model as TorchScript or ONNX, checked against the checkpoint.

load checkpoint -> trace/export to a temporary file -> reload and compare logits on a batch
of another size (the batch axis stays dynamic) -> rename into place -> write ``FILE.json``
with the classes and preprocessing beside it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__, checkpoint, models
from ..errors import CnnftError, InputError

EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_TOLERANCE = 1e-4  # max abs logit difference accepted between export and checkpoint
ONNX_OPSET = 17


@dataclass(frozen=True)
class Export:
    """An exported model: ``metadata()`` is ``FILE.json``; ``to_dict()`` adds where the files
    are and the tolerance checked."""

    export_format: str
    file: str
    model_name: str
    num_classes: int
    classes: list[str]
    preprocess: dict
    input_size: list[int]
    opset: int | None
    max_abs_diff: float
    checkpoint: str
    epoch: int
    out: str
    metadata_path: str
    tolerance: float

    def metadata(self) -> dict:
        """The description written beside the export (``FILE.json``)."""
        return {
            "format": "cnnft-export",
            "export_format": self.export_format,
            "file": self.file,
            "model_name": self.model_name,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "preprocess": self.preprocess,
            "input_size": self.input_size,
            "input_name": "input",
            "output_name": "logits",
            "output": "logits [batch, num_classes]; apply softmax for probabilities",
            "dynamic_batch": True,
            "opset": self.opset,
            "max_abs_diff": self.max_abs_diff,
            "checkpoint": self.checkpoint,
            "epoch": self.epoch,
            "cnnft_version": __version__,
            "torch_version": torch.__version__,
        }

    def to_dict(self) -> dict:
        return {**self.metadata(), "out": self.out, "metadata": self.metadata_path, "tolerance": self.tolerance}


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise InputError(f"--format onnx needs the onnx and onnxruntime packages ({exc.name} is not installed)",
                         hint="pip install 'cnnft[onnx]'   (or: pip install onnx onnxruntime)") from None
    return onnx, onnxruntime


def export(source: str | Path, fmt: str, out: str | Path, *, tolerance: float = EXPORT_TOLERANCE) -> Export:
    """Export a checkpoint's model as TorchScript or ONNX (dynamic batch axis), check that it
    gives the checkpoint's logits (max abs diff <= ``tolerance``) and write ``FILE.json``
    beside it with the classes and preprocessing.

    load checkpoint -> trace/export to a temporary file -> reload and compare -> rename.
    """
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format: unknown format {fmt!r}; use {' or '.join(EXPORT_FORMATS)}")
    onnx_mods = _onnx_modules() if fmt == "onnx" else None
    lm = checkpoint.load_model(source)
    model = lm.model.float().eval()
    size = lm.preprocess.crop_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    check = torch.randn(3, 3, size, size, generator=gen)  # another batch size: checks the dynamic axis

    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out.parent}: {exc.strerror or exc}") from None
    diff = _write_checked(model, fmt, out, example, check, tolerance, onnx_mods)

    res = Export(
        export_format=fmt, file=out.name, model_name=lm.name, num_classes=len(lm.classes), classes=lm.classes,
        preprocess=lm.preprocess.to_dict(), input_size=[3, size, size], opset=ONNX_OPSET if fmt == "onnx" else None,
        max_abs_diff=diff, checkpoint=str(lm.path), epoch=lm.checkpoint["epoch"], out=str(out),
        metadata_path=str(out.with_name(out.name + ".json")), tolerance=tolerance,
    )
    checkpoint.atomic_write_json(res.metadata_path, res.metadata())
    return res


def _write_checked(model: nn.Module, fmt: str, out: Path, example: torch.Tensor, check: torch.Tensor,
                   tolerance: float, onnx_mods) -> float:
    """Export to a temporary file, compare its logits on ``check`` with the model's, and rename
    it to ``out`` only when they agree; returns the max abs difference."""
    with torch.inference_mode():
        expected = models.logits_of(model(check)).float()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter notices, not problems
            if fmt == "torchscript":
                with torch.no_grad():
                    traced = torch.jit.trace(model, example, check_trace=False)  # checked below, on another batch
                torch.jit.save(traced, str(tmp))
                with torch.inference_mode():
                    got = torch.jit.load(str(tmp), map_location="cpu")(check)
            else:
                onnx, ort = onnx_mods
                # the TorchScript-based exporter: the dynamo one needs onnxscript, which the
                # `onnx` extra does not install
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                                  output_names=["logits"], opset_version=ONNX_OPSET,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                onnx.checker.check_model(str(tmp))
                sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(sess.run(None, {"input": check.numpy()})[0])
        diff = float((models.logits_of(got).float() - expected).abs().max())
        if not diff <= tolerance:
            raise CnnftError(f"the exported {fmt} model's logits differ from the checkpoint's by {diff:.3g} "
                             f"(more than {tolerance:g}); nothing was written",
                             hint="run again with --debug and please report it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff

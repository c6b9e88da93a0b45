"""Export a checkpoint's model as TorchScript or ONNX, checked against the checkpoint.

load checkpoint -> trace/export in memory -> reload and compare logits on a batch of another
size (the batch axis stays dynamic) -> write atomically (never over the checkpoint, over an
existing file only when forced) -> write ``FILE.json`` with the classes and preprocessing beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__, files, models
from ..errors import CnnftError, InputError
from ..models import exported, hf
from ..models.exported import EXPORT_FORMATS
from ..results.rundir import RunDir
from ..run import checkpoint, lock

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
    temperature: float = 1.0

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
            "output": "logits [batch, num_classes]; softmax(logits / temperature) gives calibrated probabilities",
            "temperature": self.temperature,
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


def export(source: str | Path, fmt: str, out: str | Path, *, tolerance: float = EXPORT_TOLERANCE,
           force: bool = False, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Export:
    """Export a checkpoint's model as TorchScript or ONNX (dynamic batch axis), check that it
    gives the checkpoint's logits (max abs diff <= ``tolerance``) and write ``FILE.json``
    beside it with the classes and preprocessing.

    An existing ``out`` is replaced only with ``force``; the checkpoint itself never is.
    load checkpoint -> export in memory -> reload and compare -> write atomically.
    """
    if fmt == "hf":
        return _export_hf(source, Path(out).expanduser(), tolerance, force)
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format: unknown format {fmt!r}; use {', '.join(EXPORT_FORMATS)} or hf")
    onnx_mods = exported.onnx_modules() if fmt == "onnx" else None
    lm = checkpoint.load_model(source)
    out = Path(out).expanduser()
    metadata_path = out.with_name(out.name + ".json")
    _check_out(out, metadata_path, lm.path, force)
    for p in (out, metadata_path):
        files.check_output(p, "--out", force=force, inputs=(lm.path,))
    run = RunDir.of_checkpoint(lm.path)
    # a run still training is refused, as any second user of its folder
    with lock.hold(run.root, "export", reading=True) if run is not None else contextlib.nullcontext():
        return _export(lm, fmt, out, metadata_path, tolerance, force, onnx_mods, log)


def _export(lm: checkpoint.LoadedModel, fmt: str, out: Path, metadata_path: Path, tolerance: float, force: bool,
            onnx_mods, log: Callable[[str], None]) -> Export:
    model = lm.model.float().eval()
    size = lm.preprocess.crop_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    check = torch.randn(3, 3, size, size, generator=gen)  # another batch size: checks the dynamic axis

    data, diff = _export_checked(model, lm.name, fmt, example, check, tolerance, onnx_mods)
    res = Export(
        export_format=fmt, file=out.name, model_name=lm.name, num_classes=len(lm.classes), classes=lm.classes,
        preprocess=lm.preprocess.to_dict(), input_size=[3, size, size], opset=ONNX_OPSET if fmt == "onnx" else None,
        max_abs_diff=diff, checkpoint=str(lm.path), epoch=lm.checkpoint["epoch"], out=str(out),
        metadata_path=str(metadata_path), tolerance=tolerance,
        temperature=checkpoint.temperature_of(lm.checkpoint, log),
    )
    # a temporary file made by mkstemp, renamed over the target: a symlink planted in the
    # folder meanwhile is replaced, never followed
    files.write_output(out, data, force=force)
    files.write_output(metadata_path, (json.dumps(res.metadata(), indent=2) + "\n").encode(), force=force)
    return res


def _export_hf(source: str | Path, out: Path, tolerance: float, force: bool) -> Export:
    """The checkpoint's model as a timm / Hugging Face folder (``timm.create_model("local-dir:OUT",
    pretrained=True)``), read back through timm and checked against the checkpoint's logits
    and preprocessing before it takes its place."""
    lm = checkpoint.load_model(source)
    _check_out_folder(out, lm.path, force)
    model = lm.model.float().eval()
    twin = hf.timm_twin(lm.name, model, len(lm.classes))
    size = lm.preprocess.crop_size
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = models.logits_of(model(check)).float()
    diff = []

    def fill(folder: Path) -> None:
        hf.write_folder(twin, lm.classes, lm.preprocess, folder)
        back = hf.load_folder(folder)
        with torch.inference_mode():
            diff.append(float((back.model(check).float() - expected).abs().max()))
        if not diff[0] <= tolerance or back.preprocess != lm.preprocess or back.classes != lm.classes:
            raise CnnftError(f"the timm folder read back differs from the checkpoint (logits by {diff[0]:.3g}, "
                             f"preprocessing {back.preprocess} vs {lm.preprocess}); nothing was written",
                             hint="run again with --debug and please report it")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out.parent}: {exc.strerror or exc}") from None
    files.atomic_folder(out, fill)
    return Export(
        export_format="hf", file="model.safetensors", model_name=lm.name, num_classes=len(lm.classes),
        classes=lm.classes, preprocess=lm.preprocess.to_dict(), input_size=[3, size, size], opset=None,
        max_abs_diff=diff[0], checkpoint=str(lm.path), epoch=lm.checkpoint["epoch"], out=str(out),
        metadata_path=str(out / "config.json"), tolerance=tolerance)


def _check_out_folder(out: Path, source: Path, force: bool) -> None:
    """Refuse an ``--out`` folder that holds the checkpoint, is a file, or exists (unless
    ``force``, and then only a timm model folder or an empty one is replaced)."""
    if out.is_file() or out.is_symlink():
        raise InputError(f"--out: {out} is a file; --format hf writes a folder", hint="give a new folder name")
    if out.is_dir():
        if source.resolve().is_relative_to(out.resolve()) or _same_file(out, source.parent):
            raise InputError(f"--out: {out} holds the checkpoint being exported; cnnft never writes over it",
                             hint="choose a new folder outside the run, e.g. --out model-hf")
        if any(out.iterdir()) and not (force and hf.is_model_folder(out)):
            raise InputError(f"--out: {out} already exists; nothing was written",
                             hint="choose a new folder, or pass --force to replace a timm model folder")


def _check_out(out: Path, metadata_path: Path, source: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a folder, that would replace the checkpoint being exported,
    or that exists (unless ``force``), before any work."""
    if out.is_dir():
        raise InputError(f"--out: {out} is a folder", hint=f"give a file name, e.g. --out {out / 'model.onnx'}")
    for p in (out, metadata_path):
        if _same_file(p, source):
            raise InputError(f"--out: {p} is the checkpoint being exported; cnnft never overwrites it",
                             hint="choose another --out file")
    run = RunDir.of_checkpoint(source)
    if run is not None and _same_file(out.parent, run.checkpoints):
        raise InputError(f"--out: {out} is inside the run's checkpoints folder, which holds only its checkpoints",
                         hint=f"choose a file outside {run.checkpoints}, e.g. --out {run.root / out.name}")
    if not force:
        for p in (out, metadata_path):
            if os.path.lexists(p):
                raise InputError(f"--out: {p} already exists; nothing was written",
                                 hint="choose another --out file, or pass --force to replace it")


def _same_file(p: Path, source: Path) -> bool:
    try:
        return os.path.samefile(p, source) or p.resolve() == source.resolve()
    except OSError:  # p does not exist (or cannot be examined): it is not the checkpoint
        return False


def _export_checked(model: nn.Module, name: str, fmt: str, example: torch.Tensor, check: torch.Tensor,
                    tolerance: float, onnx_mods) -> tuple[bytes, float]:
    """The exported file's bytes, made in memory and reloaded to compare its logits on
    ``check`` with the model's; returns them only when they agree, with the max abs difference."""
    with torch.inference_mode():
        expected = models.logits_of(model(check)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices, not problems
        data = _export_bytes(model, name, fmt, example, onnx_mods)
        if fmt == "torchscript":
            with torch.inference_mode():
                got = torch.jit.load(io.BytesIO(data), map_location="cpu")(check)
        else:
            onnx, ort = onnx_mods
            onnx.checker.check_model(data)
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {"input": check.numpy()})[0])
    diff = float((models.logits_of(got).float() - expected).abs().max())
    if not diff <= tolerance:
        raise CnnftError(f"the exported {fmt} model's logits differ from the checkpoint's by {diff:.3g} "
                         f"(more than {tolerance:g}); nothing was written",
                         hint="run again with --debug and please report it")
    return data, diff


def _export_bytes(model: nn.Module, name: str, fmt: str, example: torch.Tensor, onnx_mods) -> bytes:
    """Trace (TorchScript) or export (ONNX) ``model`` at ``example``'s size into bytes; an
    operation the format cannot express is an error that names it."""
    buf = io.BytesIO()
    try:
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False)  # checked on another batch
            torch.jit.save(traced, buf)
        else:
            exportable_adaptive_pools(model, example)
            # the TorchScript-based exporter: the dynamo one needs onnxscript, which the
            # `onnx` extra does not install. It prints the graph when it fails: not for users
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["input"],
                                  output_names=["logits"], opset_version=ONNX_OPSET,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - the exporters fail in many ways; all mean "not exportable"
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = why.split(" Please feel free")[0].split(" [Caused by")[0][:300]
        other = "onnx" if fmt == "torchscript" else "torchscript"
        raise CnnftError(f"{name} cannot be exported to {fmt} at {example.shape[-1]} px: {why}; nothing was written",
                         hint=f"try --format {other}") from None
    return buf.getvalue()


class _MatrixAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` for one fixed input size as two averaging matrices: ONNX has no
    adaptive pooling, and the exporter refuses output sizes that do not divide the input
    (LeNet5's 12 -> 5 at 32 px, VGG's 2 -> 7 at 64 px). Same windows, same result."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _averaging_matrix(in_hw[0], out_hw[0]))  # [oh, H]
        self.register_buffer("cols", _averaging_matrix(in_hw[1], out_hw[1]).t().contiguous())  # [W, ow]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


def _averaging_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Row i averages input cells [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)), as adaptive pooling does."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def exportable_adaptive_pools(model: nn.Module, example: torch.Tensor) -> int:
    """Replace, in place, each ``AdaptiveAvgPool2d`` whose output size does not divide its
    input at ``example``'s size by its fixed-size matrix form; returns how many were replaced."""
    seen: dict[str, tuple[int, int]] = {}
    pools = {n: m for n, m in model.named_modules() if type(m) is nn.AdaptiveAvgPool2d}
    hooks = [m.register_forward_hook(lambda _m, args, _o, n=n: seen.__setitem__(n, tuple(args[0].shape[-2:])))
             for n, m in pools.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    replaced = 0
    for n, in_hw in seen.items():
        size = pools[n].output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        out_hw = tuple(i if o is None else o for i, o in zip(in_hw, size))
        if all(i % o == 0 for i, o in zip(in_hw, out_hw)):
            continue  # exported as a plain average pool
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _MatrixAdaptiveAvgPool2d(in_hw, out_hw))
        replaced += 1
    return replaced





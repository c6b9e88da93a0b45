"""Exported models read back: a TorchScript or ONNX file with the ``FILE.json`` that
``cnnft export`` wrote beside it (classes, preprocessing), so predict needs no checkpoint."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict
from torch import nn

from ..errors import CnnftError, InputError
from . import described
from .backbone import Preprocess

EXPORT_FORMATS = ("torchscript", "onnx")


class ExportMeta(described.Classified):
    """``FILE.json`` beside an export, as read back (figures such as max_abs_diff are kept
    as written: nothing reads them)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)

    format: Literal["cnnft-export"]
    export_format: Literal[EXPORT_FORMATS]  # type: ignore[valid-type]


def onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise InputError(f"--format onnx needs the onnx and onnxruntime packages ({exc.name} is not installed)",
                         hint="pip install 'cnnft[onnx]'   (or: pip install onnx onnxruntime)") from None
    return onnx, onnxruntime


@dataclass(frozen=True)
class LoadedExport:
    """An exported model ready to run on the CPU: its classes and preprocessing come from the
    ``FILE.json`` that ``export`` wrote beside it, so the checkpoint is not needed."""

    model: nn.Module
    name: str
    classes: list[str]
    preprocess: Preprocess
    path: Path
    export_format: str
    temperature: float | None = None  # calibration: logits / temperature before softmax (None: exported before it)


class _OnnxModel(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` call that the inference loop uses."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"input": x.float().contiguous().numpy()})[0])


def export_metadata(path: str | Path) -> dict | None:
    """The ``FILE.json`` beside an exported file (checked by :class:`ExportMeta`), or None when
    ``path`` is not an export."""
    p = Path(path)
    if not p.is_file():
        return None
    meta_path = p.with_name(p.name + ".json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("format") == "cnnft-export":
            described.read(ExportMeta, meta, meta_path, "export description",
                           hint=f"the file was edited or damaged: export again with `cnnft export RUN --format ... "
                                f"--out {p.name}` (it writes {meta_path.name} beside the model)")
            return meta
    if p.suffix.lower() == ".onnx" or _is_torchscript(p):
        raise InputError(f"{p} looks like an exported model but {meta_path.name} is missing or unreadable beside it",
                         hint=f"keep the {meta_path.name} that `cnnft export` wrote next to {p.name} (it holds the "
                              "classes and preprocessing), or pass the run folder / checkpoint instead")
    return None


def _is_torchscript(p: Path) -> bool:
    """A TorchScript archive is a zip holding code/ and constants.pkl (a checkpoint holds neither)."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_export(path: str | Path, meta: dict) -> LoadedExport:
    """Load an exported TorchScript (``torch.jit.load``) or ONNX (onnxruntime, CPU) model with
    its metadata ``meta`` (from :func:`export_metadata`)."""
    p = Path(path)
    fmt = meta.get("export_format")
    try:
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                model = torch.jit.load(str(p), map_location="cpu")
        elif fmt == "onnx":
            _, ort = onnx_modules()
            model = _OnnxModel(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]))
        else:
            raise InputError(f"{p}.json: unknown export_format {fmt!r}; expected {' or '.join(EXPORT_FORMATS)}")
        pre = Preprocess.from_dict(meta["preprocess"])
        classes = [str(c) for c in meta["classes"]]
        _check_outputs(model, pre.crop_size, len(classes), p)
        temperature = _temperature(meta.get("temperature"), p)
    except CnnftError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt export breaks the loaders in many ways
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"cannot load the exported {fmt} model {p}: {why}",
                         hint="export it again with `cnnft export RUN --format ... --out FILE`") from None
    return LoadedExport(model, str(meta.get("model_name", p.name)), classes, pre, p, fmt, temperature)


def _check_outputs(model: nn.Module, size: int, n_classes: int, p: Path) -> None:
    """The model's logits are as wide as the class list its description gives."""
    with torch.no_grad():
        width = model(torch.zeros(1, 3, size, size)).shape[-1]
    if width != n_classes:
        raise InputError(f"{p}.json: classes lists {n_classes} name(s) but the model in {p.name} gives {width} "
                         "output(s): every output needs one name, in order",
                         hint=f"use the {p.name}.json that `cnnft export` wrote with this model, or export again")




def _temperature(value, p: Path) -> float | None:
    """FILE.json's ``temperature`` (absent in exports written before calibration): a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{p}.json: temperature must be a finite number > 0, got {value!r}",
                         hint="export the model again with `cnnft export`")
    return float(value)

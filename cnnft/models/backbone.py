"""The types every source produces (Backbone, Preprocess, Stage) and the operations that act
on any built model whatever its source: head replacement, stage lookup, meta-device init."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_INIT_STD = 0.01  # small so a fresh head starts near uniform predictions


@dataclass(frozen=True)
class Preprocess:
    """What the weights expect: eval resize -> centre crop -> normalise."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def with_size(self, size: int | None) -> "Preprocess":
        if size is None or size == self.crop_size:
            return self
        ratio = self.resize_size / self.crop_size
        return Preprocess(size, int(round(size * ratio)), self.mean, self.std, self.interpolation)


@dataclass(frozen=True)
class Stage:
    """A named stage: the parameter-name prefixes that belong to it."""

    name: str
    prefixes: tuple[str, ...]


@dataclass
class Backbone:
    """A built model and everything needed to train, save and rebuild it."""

    model: nn.Module
    name: str
    weights: str  # what was loaded, as model.weights spells it: none, a weights name, a file path
    pretrained: bool
    num_classes: int
    preprocess: Preprocess
    stages: list[Stage] = field(default_factory=list)
    in_features: int = 0  # width of the penultimate layer


@contextlib.contextmanager
def empty_init(enabled: bool = True):
    """Build modules with parameters and buffers on the meta device: no memory, no init
    cost, while constructor arithmetic on plain tensors (RegNet's widths) still works."""
    if not enabled:
        yield
        return
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_p(self, name, param)
        if param is not None and param.device.type != "meta":
            kw = self._parameters[name].__dict__
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            self._parameters[name].__dict__.update(kw)

    def register_buffer(self, name, tensor, persistent=True):
        reg_b(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b


def replace_heads(model: nn.Module, heads: tuple[str, ...], num_classes: int, pooled: int | None = None) -> int:
    """Put a fresh, small-initialised classifier with ``num_classes`` outputs at each head
    path (optional aux heads may be absent); return the main head's input width. A model
    published without a classifier (an ``nn.Identity`` there) gets a linear head of its
    pooled width ``pooled``."""
    in_features = 0
    for i, path in enumerate(heads):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr, None)
        if old is None:
            if i == 0:
                raise RuntimeError(f"head {path} not found")
            continue
        if isinstance(old, nn.Identity):
            if pooled is None:
                raise RuntimeError(f"head {path} of {type(model).__name__} is empty and its pooled width is unknown")
            like = next(iter(model.parameters()))
            new, width = nn.Linear(pooled, num_classes, device=like.device, dtype=like.dtype), pooled
        elif isinstance(old, nn.Conv2d):
            factory = {"device": old.weight.device, "dtype": old.weight.dtype}
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, **factory)
            width = old.in_channels
        else:
            new = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
            width = old.in_features
        if new.weight.device.type != "meta":
            nn.init.trunc_normal_(new.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(new.bias)
        setattr(parent, attr, new)
        if i == 0:
            in_features = width
    return in_features


def head_out(model: nn.Module, path: str) -> int:
    """Number of outputs of the classifier layer at ``path`` (0: the model has none)."""
    m = model.get_submodule(path)
    if isinstance(m, nn.Identity):
        return 0
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def head_in(model: nn.Module, path: str, pooled: int | None = None) -> int:
    """Input width of the classifier layer at ``path`` (the feature width; ``pooled`` where
    the model has no classifier)."""
    m = model.get_submodule(path)
    if isinstance(m, nn.Identity):
        return pooled or 0
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def param_stage_map(model: nn.Module, stages: list[Stage]) -> dict[str, str]:
    """Map every parameter name to its stage; a parameter in no stage is a table bug."""
    out: dict[str, str] = {}
    for pname, _ in model.named_parameters():
        for st in stages:
            if any(pname == p or pname.startswith(p + ".") for p in st.prefixes):
                out[pname] = st.name
                break
        else:
            raise RuntimeError(f"parameter {pname} of {type(model).__name__} is in no stage")
    return out


def module_stage(name: str, stages: list[Stage]) -> str | None:
    """The stage a module (by dotted name) belongs to, if any."""
    for st in stages:
        if any(name == p or name.startswith(p + ".") for p in st.prefixes):
            return st.name
    return None


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters())


def stage_modules(model: nn.Module, stages: list[Stage]) -> dict[str, list[str]]:
    """Per stage, the outermost modules that belong to it. Stage prefixes are module paths
    (torchvision) or parameter names (timm); a parameter stands for its owning module,
    widened to the largest ancestor whose parameters all lie in the same stage."""
    named = dict(model.named_modules())
    owner = param_stage_map(model, stages)

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


def first_tensor(output) -> torch.Tensor | None:
    """The main tensor of a module's output: itself, a named tuple's logits, or the first tensor."""
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


@contextlib.contextmanager
def last_stage_outputs(model: nn.Module, modules: dict[str, list[str]]) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks on each stage's modules (from :func:`stage_modules`); the dict yielded holds, per
    stage, the output of its module that finished last in the latest forward pass: the
    stage's output. Clear it between passes; the hooks are removed on exit."""
    latest: dict[str, torch.Tensor] = {}

    def hook(stage: str):
        def record(_m, _inputs, output):
            t = first_tensor(output)
            if t is not None:
                latest[stage] = t
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(stage))
               for stage, names in modules.items() for n in names]
    try:
        yield latest
    finally:
        for h in handles:
            h.remove()

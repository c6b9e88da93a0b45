"""The four fine-tuning strategies, the plan for a given model, and applying it.

Which layers learn follows dataset size x similarity to ImageNet:

    ============  ======================================  ===================================
    dataset       similar to ImageNet                     different
    ============  ======================================  ===================================
    large         freeze_early: stem + early stages       full: train the whole network
                  frozen, the rest trains
    small         head_only: the backbone is a fixed      freeze_most: all but the last
                  feature extractor                       stage(s) frozen
    ============  ======================================  ===================================

Early layers (edges, colours, textures) are generic and are the last to unfreeze; late
layers are task-specific. The new head learns at the base LR, pretrained layers that train
at ``lr x backbone_lr_scale`` (1/10 by default) so they adapt without forgetting; with a
layer decay d, each trainable pretrained stage k stages below the deepest trainable one
learns at ``lr x backbone_lr_scale x d**k`` (BEiT's layer-wise decay): the more generic a
stage, the slower it moves. BatchNorm inside frozen stages is pinned to eval mode: its
running statistics never change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models import Stage, param_stage_map
from .strategies import frozen_names


@dataclass
class StagePlan:
    name: str
    frozen: bool
    params: int
    trainable_params: int
    lr: float | None  # None when frozen


@dataclass
class FreezePlan:
    """Which stages are frozen and the learning rate of each trainable one."""

    strategy: str
    stages: list[StagePlan]
    lr: float
    backbone_lr: float  # the deepest trainable pretrained stage's rate
    layer_decay: float | None = None
    batchnorm: str = "train"  # BatchNorm in trainable pretrained stages: train (batch statistics) or eval

    @property
    def frozen(self) -> list[str]:
        return [s.name for s in self.stages if s.frozen]

    @property
    def trainable_params(self) -> int:
        return sum(s.trainable_params for s in self.stages)

    @property
    def total_params(self) -> int:
        return sum(s.params for s in self.stages)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "lr": self.lr,
            "backbone_lr": self.backbone_lr,
            "batchnorm": self.batchnorm,
            "layer_decay": self.layer_decay,
            "stages": [asdict(s) for s in self.stages],
            "frozen_stages": self.frozen,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }


def frozen_stage_names(
    stages: list[Stage], strategy: str, frozen_stages: int | None = None, trainable_stages: int = 1
) -> set[str]:
    """Names of the stages a strategy freezes (see :func:`cnnft.training.strategies.frozen_names`)."""
    return frozen_names([s.name for s in stages], strategy, frozen_stages, trainable_stages)


def make_plan(
    model: nn.Module,
    stages: list[Stage],
    strategy: str,
    lr: float,
    backbone_lr_scale: float = 0.1,
    *,
    pretrained: bool = True,
    frozen_stages: int | None = None,
    trainable_stages: int = 1,
    layer_decay: float | None = None,
    batchnorm: str = "train",
) -> FreezePlan:
    """The plan for ``model``: per stage, frozen or not, parameter counts and learning rate.
    A randomly initialised backbone has nothing to preserve, so it learns at the full LR;
    ``layer_decay`` (None: off) scales each trainable stage below the deepest one by
    ``layer_decay`` once more per stage. ``batchnorm`` (train|eval): what BatchNorm in the
    trainable pretrained stages does."""
    frozen = frozen_stage_names(stages, strategy, frozen_stages, trainable_stages)
    backbone_lr = lr * backbone_lr_scale if pretrained else lr
    owner = param_stage_map(model, stages)
    counts = {s.name: 0 for s in stages}
    for name, p in model.named_parameters():
        counts[owner[name]] += p.numel()
    rates = _stage_rates([s.name for s in stages if s.name not in frozen], lr, backbone_lr, layer_decay)
    plans = [StagePlan(s.name, s.name in frozen, counts[s.name], 0 if s.name in frozen else counts[s.name],
                       rates.get(s.name)) for s in stages]
    return FreezePlan(strategy, plans, lr, backbone_lr, layer_decay, batchnorm if pretrained else "train")


def _stage_rates(trainable: list[str], lr: float, backbone_lr: float, layer_decay: float | None) -> dict[str, float]:
    """The rate of each trainable stage (in model order): the head at ``lr``, the deepest
    pretrained stage at ``backbone_lr`` and each one below it ``layer_decay`` times slower."""
    body = [name for name in trainable if name != "head"]
    decay = 1.0 if layer_decay is None else layer_decay
    rates = {name: backbone_lr * decay ** (len(body) - 1 - i) for i, name in enumerate(body)}
    return {**rates, **({"head": lr} if "head" in trainable else {})}


def _keep_eval(module: nn.Module, _inputs) -> None:
    # Runs before every forward: model.train() anywhere cannot make frozen BN update its stats.
    if module._cnnft_pinned:
        module.training = False


def _owner_stage(name: str, module: nn.Module, owner: dict[str, str], stages: list[Stage]) -> str | None:
    """The stage a module belongs to by the parameters it owns (stage prefixes may name
    parameters, as timm's do, or modules, as the family table's do)."""
    own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    if own:
        return owner[own[0]]
    for st in stages:  # a BatchNorm without affine parameters: its module name or a prefix below it
        if any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in st.prefixes):
            return st.name
    return None


def apply_plan(model: nn.Module, stages: list[Stage], plan: FreezePlan,
               frozen: list[str] | None = None) -> list[nn.Module]:
    """Set ``requires_grad`` per the plan and pin BatchNorm in frozen stages to eval mode (and in
    the trainable pretrained stages too when the plan keeps their statistics: ``batchnorm``
    eval). ``frozen`` (gradual unfreezing) names the stages frozen for now instead of the
    plan's; BatchNorm of a stage no longer frozen is released. Returns the pinned BatchNorm modules."""
    frozen_now = set(plan.frozen if frozen is None else frozen)
    kept = frozen_now | ({s.name for s in stages if s.name != "head"} if plan.batchnorm == "eval" else set())
    owner = param_stage_map(model, stages)
    for name, p in model.named_parameters():
        p.requires_grad_(owner[name] not in frozen_now)
    pinned = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        pin = _owner_stage(name, m, owner, stages) in kept
        if pin and not hasattr(m, "_cnnft_pinned"):
            m.register_forward_pre_hook(_keep_eval)
        if pin or hasattr(m, "_cnnft_pinned"):
            m._cnnft_pinned = pin
        if pin:
            m.eval()
            pinned.append(m)
    return pinned


def gradual_frozen(plan: FreezePlan, epoch: int) -> list[str]:
    """Gradual unfreezing (ULMFiT): the stages frozen in training epoch ``epoch`` (0: the
    first). The head and the deepest trainable pretrained stage learn from the start and one
    more stage below joins each epoch, until the plan's trainable stages all learn."""
    body = [s.name for s in plan.stages if not s.frozen and s.name != "head"]
    return plan.frozen + body[:max(len(body) - 1 - epoch, 0)]


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # biases, norm scales and 1-d embeddings/tokens are not weight-decayed (standard practice)
    return p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name


def param_groups(
    model: nn.Module, stages: list[Stage], plan: FreezePlan, weight_decay: float
) -> list[dict]:
    """Optimizer parameter groups at the plan's rates: the head (``head``), the trainable
    pretrained stages (``backbone``, or ``backbone.STAGE`` per stage under a layer decay);
    frozen parameters are left out. Each group carries a ``name``."""
    owner = param_stage_map(model, stages)
    rate = {s.name: s.lr for s in plan.stages}
    order = {s.name: i for i, s in enumerate(stages)}
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    first_stage: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        stage = owner[name]
        part = "head" if stage == "head" else "backbone" if plan.layer_decay is None else f"backbone.{stage}"
        first_stage.setdefault(part, stage)
        buckets.setdefault((part, _no_decay(name, p)), []).append(p)
    groups = []
    for (part, nd), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != "head",
                                                                       order[first_stage[kv[0][0]]], kv[0][1])):
        groups.append({
            "name": part + ("_no_decay" if nd else ""),
            "params": params,
            "lr": rate[first_stage[part]],
            "weight_decay": 0.0 if nd else weight_decay,
        })
    return groups

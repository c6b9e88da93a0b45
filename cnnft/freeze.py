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
at ``lr x backbone_lr_scale`` (1/10 by default) so they adapt without forgetting. BatchNorm
inside frozen stages is pinned to eval mode: its running statistics never change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import ConfigError
from .models import Stage, param_stage_map
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
    backbone_lr: float
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
            "stages": [asdict(s) for s in self.stages],
            "frozen_stages": self.frozen,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }


def frozen_stage_names(
    stages: list[Stage], strategy: str, frozen_stages: int | None = None, trainable_stages: int = 1
) -> set[str]:
    """Names of the stages a strategy freezes (see :func:`cnnft.strategies.frozen_names`)."""
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
    batchnorm: str = "train",
) -> FreezePlan:
    """The plan for ``model``: per stage, frozen or not, parameter counts and learning rate.
    A randomly initialised backbone has nothing to preserve, so it learns at the full LR.
    ``batchnorm`` (train|eval): what BatchNorm in the trainable pretrained stages does."""
    frozen = frozen_stage_names(stages, strategy, frozen_stages, trainable_stages)
    backbone_lr = lr * backbone_lr_scale if pretrained else lr
    owner = param_stage_map(model, stages)
    counts = {s.name: 0 for s in stages}
    for name, p in model.named_parameters():
        counts[owner[name]] += p.numel()
    plans = []
    for s in stages:
        is_frozen = s.name in frozen
        rate = None if is_frozen else (lr if s.name == "head" else backbone_lr)
        plans.append(StagePlan(s.name, is_frozen, counts[s.name], 0 if is_frozen else counts[s.name], rate))
    return FreezePlan(strategy, plans, lr, backbone_lr, batchnorm if pretrained else "train")


def _keep_eval(module: nn.Module, _inputs) -> None:
    # Runs before every forward: model.train() anywhere cannot make frozen BN update its stats.
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


def apply_plan(model: nn.Module, stages: list[Stage], plan: FreezePlan) -> list[nn.Module]:
    """Set ``requires_grad`` per the plan and pin BatchNorm in frozen stages to eval mode (and in
    the trainable pretrained stages too when the plan keeps their statistics: ``batchnorm``
    eval). Returns the pinned BatchNorm modules."""
    frozen = set(plan.frozen)
    kept = frozen | ({s.name for s in stages if s.name != "head"} if plan.batchnorm == "eval" else set())
    owner = param_stage_map(model, stages)
    for name, p in model.named_parameters():
        p.requires_grad_(owner[name] not in frozen)
    pinned = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _owner_stage(name, m, owner, stages) in kept:
            if not getattr(m, "_cnnft_pinned", False):
                m.register_forward_pre_hook(_keep_eval)
                m._cnnft_pinned = True
            m.eval()
            pinned.append(m)
    return pinned


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # biases, norm scales and 1-d embeddings/tokens are not weight-decayed (standard practice)
    return p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name


def param_groups(
    model: nn.Module, stages: list[Stage], plan: FreezePlan, weight_decay: float
) -> list[dict]:
    """Optimizer parameter groups: the head at ``plan.lr``, trainable pretrained stages at
    ``plan.backbone_lr``; frozen parameters are left out. Each group carries a ``name``."""
    owner = param_stage_map(model, stages)
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = "head" if owner[name] == "head" else "backbone"
        buckets.setdefault((role, _no_decay(name, p)), []).append(p)
    groups = []
    for (role, nd), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != "head", kv[0][1])):
        groups.append({
            "name": role + ("_no_decay" if nd else ""),
            "params": params,
            "lr": plan.lr if role == "head" else plan.backbone_lr,
            "weight_decay": 0.0 if nd else weight_decay,
        })
    return groups

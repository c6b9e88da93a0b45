"""``cnnft freeze-plan`` and ``cnnft validate``: the strategy for a dataset, the plan for a
model, and a config with every default filled in; nothing is trained or written."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config as config_mod, strategies
from ..errors import InputError

if TYPE_CHECKING:  # torch is loaded only to plan a model (--model): the advice alone needs none
    from ..freeze import FreezePlan

# classes of the head in a plan when --classes is not given: the smallest classifier, so that
# the head's parameter count is not ImageNet's 1000 classes (2.05 M for resnet50) by surprise
DEFAULT_PLAN_CLASSES = 2


@dataclass(frozen=True)
class FreezeAdvice:
    """The strategy for a dataset quadrant, why, and (given a model) its per-stage plan."""

    strategy: str
    size: str | None
    similar: bool | None
    rationale: str
    size_rule: str | None  # how --images/--classes gave the size, when they did
    model: str | None = None
    num_classes: int | None = None
    plan: FreezePlan | None = None
    classes_defaulted: bool = False  # the head was sized by DEFAULT_PLAN_CLASSES, not --classes

    def to_dict(self) -> dict:
        """The ``--json`` form: the advice, then the model and its plan's fields when planned."""
        d: dict = {"strategy": self.strategy, "size": self.size, "similar": self.similar,
                   "rationale": self.rationale, "size_rule": self.size_rule}
        if self.plan is not None:
            d.update(model=self.model, num_classes=self.num_classes, classes_defaulted=self.classes_defaulted,
                     **self.plan.to_dict())
        return d


def resolve_config(path: str | Path | None, overrides: list[str]) -> dict:
    """Load and validate a config with overrides; return it with every default filled in."""
    return config_mod.load(path, overrides).to_dict()


def freeze_plan(
    *,
    size: str | None = None,
    similar: bool | None = None,
    images: int | None = None,
    classes: int | None = None,
    model: str | None = None,
    strategy: str | None = None,
    lr: float | None = None,
    frozen_stages: int | None = None,
    trainable_stages: int | None = None,
    layer_decay: float | None = None,
) -> FreezeAdvice:
    """Recommend a strategy for a quadrant and, given a model, plan it stage by stage."""
    size_rule = None
    if images is not None:
        if classes is None:
            raise InputError("--images needs --classes (the size class is images per class)")
        derived = strategies.size_class(images, classes)
        size_rule = (f"{images} images / {classes} classes = {images / classes:.0f} per class: "
                     f"'{derived}' (large from {strategies.LARGE_IMAGES_PER_CLASS} per class)")
        if size is not None and size != derived:
            raise InputError(f"--size {size} contradicts --images/--classes, which give '{derived}'")
        size = derived
    if strategy is None:
        if size is None or similar is None:
            raise InputError(
                "say how large and how similar the dataset is: --size small|large (or --images N "
                "--classes K) and --similar yes|no; or pick --strategy full|freeze_early|freeze_most|head_only"
            )
        strategy = strategies.choose_strategy("auto", size=size, similar=similar)[0]
    advice = FreezeAdvice(strategy, size, similar, strategies.RATIONALE[strategy], size_rule)
    if model is None:
        return advice
    from .. import freeze, models

    defaults_train = config_mod.TrainConfig()
    defaults_freeze = config_mod.FreezeConfig()
    lr = defaults_train.lr if lr is None else lr
    if lr <= 0:
        raise InputError(f"--lr must be > 0 (got {lr})")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise InputError(f"--layer-decay must be in (0, 1] (got {layer_decay}), e.g. --layer-decay 0.7")
    bb = models.build(model, "DEFAULT", DEFAULT_PLAN_CLASSES if classes is None else classes, on_meta=True)
    plan = freeze.make_plan(
        bb.model, bb.stages, strategy, lr, defaults_train.backbone_lr_scale,
        pretrained=True,
        frozen_stages=frozen_stages,
        trainable_stages=defaults_freeze.trainable_stages if trainable_stages is None else trainable_stages,
        layer_decay=defaults_train.layer_decay if layer_decay is None else layer_decay,
    )
    return replace(advice, model=model, num_classes=bb.num_classes, plan=plan, classes_defaulted=classes is None)

"""``cnnft freeze-plan`` and ``cnnft validate``: the strategy for a dataset, the plan for a
model, and a config with every default filled in; nothing is trained or written."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config as config_mod
from ..errors import InputError
from ..training import strategies
from ..training.strategies import Decision

if TYPE_CHECKING:  # torch is loaded only to plan a model (--model): the advice alone needs none
    from ..data.samples import Source
    from ..training.freeze import FreezePlan

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
    measured: Decision | None = None  # --data: the probe curve's decision
    sample: dict | None = None  # what it was measured on (images, per_class, folds, seconds...)
    note: str | None = None  # e.g. where --similar and the measurement disagree

    def to_dict(self) -> dict:
        """The ``--json`` form: the advice, then the model and its plan's fields when planned;
        measured (--data): the decision's fields with the per-stage probe table as ``stages``
        and the plan under ``plan``."""
        d: dict = {"strategy": self.strategy, "size": self.size, "similar": self.similar,
                   "rationale": self.rationale, "size_rule": self.size_rule}
        if self.measured is not None and self.plan is not None:
            m = self.measured
            return {**d, "frozen_stages": self.plan.frozen, "trainable_stages": _trainable_count(self.plan),
                    "measured_similar": m.similar, "measured_strategy": m.strategy, "peak": m.peak,
                    "reason": m.reason, "stages": [asdict(s) for s in m.stages], "sample": self.sample,
                    "note": self.note, "model": self.model, "num_classes": self.num_classes,
                    "plan": self.plan.to_dict()}
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
    from .. import models

    _check_rates(lr, layer_decay)
    bb = models.build(model, "DEFAULT", DEFAULT_PLAN_CLASSES if classes is None else classes, on_meta=True)
    trainable = strategies.DEFAULT_TRAINABLE_STAGES if trainable_stages is None else trainable_stages
    # the quadrant's plan for the model's DEFAULT weights (built on the meta device, nothing loaded)
    plan = _plan(bb, strategy, size or "small", lr, frozen_stages, trainable, layer_decay, pretrained=True)
    return replace(advice, model=model, num_classes=bb.num_classes, plan=plan, classes_defaulted=classes is None)


def _check_rates(lr: float | None, layer_decay: float | None) -> None:
    """Refuse --lr and --layer-decay values no run could use, before a model is built."""
    if lr is not None and lr <= 0:
        raise InputError(f"--lr must be > 0 (got {lr})")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise InputError(f"--layer-decay must be in (0, 1] (got {layer_decay}), e.g. --layer-decay 0.7")


def _plan(bb, strategy: str, size: str, lr: float | None, frozen_stages: int | None, trainable_stages: int,
          layer_decay: float | None, pretrained: bool) -> FreezePlan:
    """The stage-by-stage plan of ``strategy`` for ``bb``, unset rates taken from the schema's defaults."""
    from ..training import freeze

    t = config_mod.TrainConfig()
    return freeze.make_plan(
        bb.model, bb.stages, strategy, t.lr if lr is None else lr, t.backbone_lr_scale,
        pretrained=pretrained, frozen_stages=frozen_stages, trainable_stages=trainable_stages,
        layer_decay=t.layer_decay if layer_decay is None else layer_decay,
        batchnorm=strategies.resolve_batchnorm(config_mod.FreezeConfig().batchnorm, size, pretrained),
    )


def _trainable_count(plan: FreezePlan) -> int:
    """Stages after the stem that train under ``plan``."""
    return sum(1 for s in plan.stages if s.name not in ("stem", "head") and not s.frozen)


def training_images(data_dir: str | None, dataset: str | None) -> tuple[list[str], Source, str]:
    """(classes, images, description) of ``--data DIR`` (class folders, or a dataset root whose
    train/ holds them) or ``--dataset NAME`` (a packaged set: its training split)."""
    from ..data import folders as data
    from ..data import packaged, samples

    if (data_dir is None) == (dataset is None):
        raise InputError("give one of --data DIR (class folders) and --dataset NAME (e.g. digits)")
    if dataset is not None:
        defaults = config_mod.DataConfig()
        classes, train, _ = packaged.load_packaged(dataset, defaults.root, False, defaults.val_split, 0)
        return classes, train, f"{dataset} (training split)"
    root = Path(data_dir).expanduser()
    folder = root / "train" if (root / "train").is_dir() else root
    classes, paths, labels = samples.scan_folder(folder, "--data")
    return classes, samples.Source(paths, labels, lambda i, draft=None: data.open_image(paths[i], draft)), str(folder)


def measured_plan(
    *,
    model: str,
    data_dir: str | None = None,
    dataset: str | None = None,
    weights: str = "DEFAULT",
    image_size: int | None = None,
    similar: bool | None = None,
    strategy: str | None = None,
    lr: float | None = None,
    frozen_stages: int | None = None,
    trainable_stages: int | None = None,
    layer_decay: float | None = None,
    show_progress: bool = False,
    log=None,
) -> FreezeAdvice:
    """Measure the data's similarity to ImageNet with ``model`` (see :mod:`cnnft.training.similarity`)
    and plan the strategy it gives: size from the image count, similar from the probe curve.
    An explicit ``similar`` or ``strategy`` wins; a disagreeing ``similar`` is noted."""
    from .. import models
    from ..training import similarity

    _check_rates(lr, layer_decay)
    classes, source, where = training_images(data_dir, dataset)
    size = strategies.size_class(len(source), len(classes))
    size_rule = (f"{len(source)} images / {len(classes)} classes in {where} = {len(source) / len(classes):.0f} "
                 f"per class: '{size}' (large from {strategies.LARGE_IMAGES_PER_CLASS} per class)")
    bb = models.build(model, weights, len(classes))
    if image_size is not None and image_size < models.min_input(bb.model):
        raise InputError(f"--image-size: {model} needs inputs of at least {models.min_input(bb.model)} px "
                         f"(got {image_size})")
    bb.preprocess = bb.preprocess.with_size(image_size)
    decision, m = similarity.assess(bb, source, size, show_progress=show_progress, log=log)
    if not bb.pretrained:  # the curve is shown, but random features say nothing about ImageNet
        decision = replace(decision, similar=False, strategy="full", reason=f"model weights {bb.weights}: "
                           "no pretrained features, so nothing to compare with ImageNet -> full")
    note = None
    if similar is not None and similar != decision.similar:
        note = (f"--similar {'yes' if similar else 'no'} disagrees with the measurement, which finds the data "
                f"{'similar to' if decision.similar else 'different from'} ImageNet and recommends "
                f"{decision.strategy}; planning with --similar as given")
    chosen = strategy or (strategies.recommend(size, similar) if note else decision.strategy)
    trainable = trainable_stages if trainable_stages is not None else strategies.trainable_stages(
        "auto", decision if chosen == decision.strategy else None)
    plan = _plan(bb, chosen, size, lr, frozen_stages, trainable, layer_decay, pretrained=bb.pretrained)
    sample = {k: v for k, v in m.to_dict().items() if k != "stages"}
    return FreezeAdvice(chosen, size, decision.similar if similar is None else similar, strategies.RATIONALE[chosen],
                        size_rule, model, bb.num_classes, plan, False, decision, sample, note)

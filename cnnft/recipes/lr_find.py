"""``cnnft lr-find``: a learning-rate range test of the run a config describes (see
:mod:`cnnft.lrfind` for the sweep and the suggestion rule).

resolve config -> data -> model -> freeze plan -> parameter groups, optimizer -> sweep -> plot.
Everything up to the sweep is built by ``cnnft train``'s own builders, so the test sweeps the
very run that would train: the same images, augmentation, frozen stages, parameter groups
(pretrained stages at ``train.backbone_lr_scale`` of the head's rate), optimizer and loss.
The model is a throwaway; nothing is written but the plot.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import config as config_mod
from .. import engine, freeze, lrfind, plots, runtime, strategies, transforms
from ..config import Config, TrainConfig
from ..data import DataBundle
from ..errors import InputError
from . import train as train_recipe

DEFAULT_OUT = "lr_find.png"

Log = Callable[[str], None]


@dataclass(frozen=True)
class LRFind:
    """What ``cnnft lr-find`` found; ``to_dict()`` is its ``--json`` output."""

    suggested_lr: float
    lrs: list[float]
    losses: list[float]
    plot: str
    reason: str
    diverged: bool

    def to_dict(self) -> dict:
        return asdict(self)


def lr_find(config_path: str | Path | None, overrides: list[str] | None = None, *,
            out: str | Path = DEFAULT_OUT, steps: int = lrfind.STEPS,
            log: Log = lambda m: print(m, file=sys.stderr)) -> LRFind:
    """Run the range test (``steps`` batches) of the run ``config_path`` (with ``overrides``)
    describes, plot it to ``out`` and return the suggested rate with the curve."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png" or not out.parent.is_dir():
        raise InputError(f"--out: {out} is not a .png file in an existing folder",
                         hint="pass a path such as lr_find.png or runs/lr_find.png")
    cfg = config_mod.load(config_path, list(overrides or []))
    similar = train_recipe._similar(cfg.freeze.similar, cfg.model.weights != "none", None)
    cfg.data.augment, cfg.data.hflip = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, similar)
    train_recipe.seed_everything(cfg.seed)
    rt = runtime.make_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
    bundle = train_recipe._setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    test = sweep(cfg, bundle, rt, log, steps)
    title = f"{cfg.name}: {cfg.model.backbone}, learning-rate range test"
    plots.lr_curve(out, test.lrs, test.losses, suggested=test.suggested_lr, title=title)
    return LRFind(test.suggested_lr, test.lrs, test.losses, str(out), test.reason, test.diverged)


def sweep(cfg: Config, bundle: DataBundle, rt: runtime.Runtime, log: Log, steps: int = lrfind.STEPS,
          measured: "strategies.Decision | None" = None) -> lrfind.RangeTest:
    """The range test (``steps`` batches) of the run ``cfg`` describes on ``bundle``, with a
    model of its own (frozen as ``measured`` says, when the similarity was measured); a curve
    without a valley suggests ``train.lr``'s default."""
    if cfg.train.lr == "auto":  # the plan's rates only set the groups' ratios, which the sweep keeps
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": lrfind.START_LR})})
    bb = train_recipe._setup_backbone(cfg, len(bundle.classes))
    plan, _ = train_recipe._setup_plan(bb, cfg, len(bundle.train), measured, log)
    model = train_recipe._setup_model(bb, plan, rt, None)
    loaders = train_recipe._setup_loaders(cfg.data, bundle, bb.preprocess, cfg.seed, rt.pin_memory)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    if not groups:
        raise InputError(f"freeze.strategy: {plan.strategy} leaves no parameter of {bb.name} to train, "
                         "so there is no learning rate to find", hint="choose a strategy that trains the head")
    optimizer = engine.build_optimizer(groups, cfg.train)
    criterion = train_recipe._setup_criterion(cfg, bundle, log)
    return lrfind.range_test(model, loaders.train, optimizer, criterion, rt, fallback=_default_lr(), steps=steps,
                             scaler=rt.grad_scaler(), grad_clip=cfg.train.grad_clip,
                             new_pass=lambda k: loaders.position(k, 0))


def _default_lr() -> float:
    """``train.lr``'s default in the schema (the one home of defaults)."""
    return TrainConfig.model_fields["lr"].default

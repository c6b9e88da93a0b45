"""Builders of a run from its config: data bundle, backbone, measured or quadrant plan, model on
its runtime, loaders and feature cache, parameter groups' schedule start, criterion, mixing,
gradual unfreezing, and the ``lr: auto`` range test. ``train``, ``lr-find`` and ``tune`` build
runs with these, so a run is built one way. Each takes the config section it needs; when a
run is resumed it restores its own part of the checkpoint where it is built.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import models
from ..config import Config, DataConfig, TrainConfig
from ..data import balance, mixing, transforms
from ..data import folders as data
from ..errors import ConfigError, InputError
from ..results.rundir import RunDir
from ..training import budget, cache, distributed, engine, freeze, lrfind, runtime, strategies
from ..training.ema import WeightEma
from ..training.freeze import FreezePlan
from . import cached as _cached
from . import checkpoint

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_data(cfg: DataConfig, num_classes: int | None, seed: int, log: Callable[[str], None]) -> data.DataBundle:
    """The training and validation images, checked against ``model.num_classes``."""
    bundle = data.build_data(cfg, seed, log)
    if num_classes is not None and num_classes != len(bundle.classes):
        raise ConfigError(f"model.num_classes: {num_classes} but the data has "
                          f"{len(bundle.classes)} classes ({', '.join(bundle.classes[:10])}); "
                          f"remove model.num_classes or set it to {len(bundle.classes)}")
    if bundle.skipped:
        log(f"skipping {len(bundle.skipped)} unreadable image(s):")
        for p, why in bundle.skipped:
            log(f"  {p}: {why}")
    return bundle


def setup_backbone(cfg: Config, n_classes: int) -> models.Backbone:
    """The backbone with a new ``n_classes`` head, checked against ``data.image_size`` and
    preprocessing at that size (checkpoints record what was used)."""
    bb = models.build(cfg.model.backbone, cfg.model.weights, n_classes)
    check_input_size(bb, cfg.data.image_size)
    bb.preprocess = bb.preprocess.with_size(cfg.data.image_size)
    return bb


def check_input_size(bb: models.Backbone, size: int | None) -> None:
    """Refuse an image size the architecture cannot run on, before the run folder exists
    (None: the weights' own size, which always fits)."""
    smallest = models.min_input(bb.model)
    if size is not None and size < smallest:
        raise ConfigError(f"data.image_size: {bb.name} needs inputs of at least {smallest} px (got {size}); "
                          f"set data.image_size={max(smallest, bb.preprocess.crop_size)}")


def setup_budget(setting: str | None, resumed: dict | None, dd: distributed.Dist,
                 log: Callable[[str], None]) -> budget.Budget | None:
    """``train.time_budget``'s clock, started now (None: unset); one process only, since every
    process would have to stop at the same step."""
    if setting is not None and dd.active:
        raise ConfigError("train.time_budget: not supported under torchrun (each process would stop at its own "
                          "step); leave it out or train in one process")
    return budget.Budget.of(setting, resumed, log)


def measure_similarity(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, device: torch.device,
              resume: Path | None, log: Callable[[str], None], show: bool) -> strategies.Decision | None:
    """``freeze.similar: auto`` with ``freeze.strategy: auto``: the probe curve's decision,
    measured on the training images (a resumed run reuses its own); None when not measured."""
    fc = cfg.freeze
    if fc.similar != "auto" or fc.strategy != "auto" or not bb.pretrained:
        return None
    if resume is not None and RunDir(resume).freeze_plan.is_file():
        kept = json.loads(RunDir(resume).freeze_plan.read_text(encoding="utf-8")).get("similarity")
        if kept:
            return strategies.Decision.from_dict(kept)
    from ..training import similarity

    log(f"freeze.similar auto: measuring on at most {similarity.PER_CLASS} training images per class ...")
    size = strategies.size_class(len(bundle.train), bb.num_classes)
    decision, m = similarity.assess(bb, bundle.train, size, seed=cfg.seed, device=device, show_progress=show,
                                    log=log)
    log(f"similarity measured on {m.images} images ({m.folds}-fold probes) in {m.seconds:.0f}s: {decision.reason}")
    return decision


def is_similar(setting: bool | str, pretrained: bool, measured: strategies.Decision | None) -> bool:
    """Whether the data is taken as similar to ImageNet: as measured, as set, or for ``auto``
    unmeasured: not without pretrained weights (a random network's features say nothing of
    ImageNet), else yes (an explicit strategy needs no measurement; photos are the usual case)."""
    if measured is not None:
        return measured.similar
    if setting == "auto":
        return pretrained
    return bool(setting)


def setup_plan(bb: models.Backbone, cfg: Config, n_images: int, measured: strategies.Decision | None,
                log: Callable[[str], None]) -> tuple[FreezePlan, str | None]:
    """The freeze plan for ``bb`` (``auto`` resolved from the data's size and similarity,
    measured or given) and why, if chosen."""
    n_classes = bb.num_classes
    size = strategies.size_class(n_images, n_classes)
    size_reason = f"{n_images} images / {n_classes} classes is '{size}'"
    if measured is not None:
        strategy, why = measured.strategy, f"auto: {size_reason}; measured: {measured.reason}"
    else:
        similar = is_similar(cfg.freeze.similar, bb.pretrained, None)
        strategy, why = strategies.choose_strategy(cfg.freeze.strategy, size=size, similar=similar,
                                                   pretrained=bb.pretrained, weights=cfg.model.weights,
                                                   size_reason=size_reason)
    if why:
        log(why)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, cfg.train.lr, cfg.train.backbone_lr_scale,
                            pretrained=bb.pretrained, frozen_stages=cfg.freeze.frozen_stages,
                            trainable_stages=strategies.trainable_stages(cfg.freeze.trainable_stages, measured),
                            batchnorm=strategies.resolve_batchnorm(cfg.freeze.batchnorm, size, bb.pretrained),
                            layer_decay=cfg.train.layer_decay)
    return plan, why


def resolve_lr(cfg: Config, bundle: data.DataBundle, rt: runtime.Runtime, dd: distributed.Dist,
                log: Callable[[str], None], measured: strategies.Decision | None = None) -> float:
    """``train.lr``, with ``auto`` replaced by the suggestion of a learning-rate range test
    (``cnnft lr-find``) on a model of its own, rounded to 3 significant digits. Torch's, NumPy's
    and Python's generators are put back afterwards, so the run is the one ``train.lr`` set to
    that number would give; under torchrun rank 0 runs the test and every process takes its number."""
    if cfg.train.lr != "auto":
        return cfg.train.lr
    found = None
    if dd.is_main:
        rng = checkpoint.rng_state()
        try:
            test = sweep(cfg, bundle, rt, lambda _m: None, measured=measured)  # its builders' notes are this run's, logged later
        finally:
            checkpoint.set_rng_state(rng)
        found = float(f"{test.suggested_lr:.3g}"), f"over {len(test.lrs)} steps; {test.reason}"
    lr, how = dd.from_main(found)
    log(f"train.lr: auto -> {lr:.3g} by a learning-rate range test ({how}); saved in the run's config.yaml")
    return lr


def setup_model(bb: models.Backbone, plan: FreezePlan, rt: runtime.Runtime, state: dict | None) -> nn.Module:
    """The model frozen as ``plan`` says, on the runtime's device, with a resumed run's weights."""
    freeze.apply_plan(bb.model, bb.stages, plan)
    rt.prepare(bb.model)
    return restore(bb.model, state)


def setup_ema(model: nn.Module, decay: float | None, resumed: dict | None) -> WeightEma | None:
    """The weight average ``train.ema`` asks for (None: off), continued from a resumed run;
    its checkpoint's ``model`` holds the average and ``ema`` the raw weights."""
    if decay is None:
        return None
    averaged = WeightEma(model, decay)
    if resumed is not None:
        averaged.load(resumed["model"], resumed["ema"]["updates"])
    return averaged


@dataclass
class Loaders:
    """The training loader, positioned per epoch (and per step, when resuming), and the validation one."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    dataset: data.ImageDataset  # the training images, augmented per (seed, epoch, image)
    sampler: data.EpochSampler
    generator: torch.Generator
    seed: int
    batch_size: int
    views: "cache.CachedFeatures | None" = None

    def position(self, epoch: int, step: int) -> None:
        """Serve ``epoch``'s batches from ``step`` on, as a run that never stopped saw them."""
        self.generator.manual_seed(self.seed * 7_919 + epoch * 104_729 + step)
        self.sampler.set_epoch(epoch, start=step * self.batch_size)
        self.dataset.set_epoch(epoch)
        if self.views is not None:
            self.views.set_epoch(epoch)

    def lost(self, log: Callable[[str], None]) -> list[tuple[str, str]]:
        """Images that vanished or broke while the run trained: skipped, and logged once here."""
        sets = [self.dataset, getattr(self.val, "dataset", None)]
        found = [f for ds in sets if isinstance(ds, data.ImageDataset) for f in ds.lost_files()]
        if found:
            log(f"skipped {len(found)} image(s) that could not be read any more during training:")
            for p, why in found:
                log(f"  {p}: {why}")
        return found

    def use_cache(self, cached: "_cached.Cached | None", model: nn.Module) -> nn.Module:
        """Train and validate from stored activations when ``cached``; return the module to fit."""
        if cached is None:
            return model
        self.train, self.val, self.views = cached.train, cached.val, cached.views
        return cached.rest


def setup_loaders(cfg: DataConfig, bundle: data.DataBundle, pre: models.Preprocess, seed: int, pin: bool,
                   dd: distributed.Dist = distributed.Dist()) -> Loaders:
    """Training (augmented, shuffled per epoch) and validation loaders; under torchrun, this
    process's shard of each."""
    draft = pre.resize_size
    train_ds = data.ImageDataset(bundle.train, transforms.train_transform(pre, cfg.augment, cfg.hflip), draft, seed)
    val_ds = data.ImageDataset(bundle.val, transforms.eval_transform(pre), draft)
    per_class = balance.counts(bundle.train.labels, len(bundle.classes))
    weights = balance.sample_weights(bundle.train.labels, per_class) if cfg.balanced_sampler else None
    sampler = dd.sampler(len(train_ds), seed, cfg.batch_size, weights)
    gen = torch.Generator()
    train_loader = data.make_loader(train_ds, cfg.batch_size, cfg.num_workers, sampler=sampler, generator=gen, pin_memory=pin)
    if dd.active:
        val_ds = torch.utils.data.Subset(val_ds, dd.eval_indices(len(val_ds)))
    val_loader = data.make_loader(val_ds, cfg.batch_size, cfg.num_workers, pin_memory=pin)
    return Loaders(train_loader, val_loader, train_ds, sampler, gen, seed, cfg.batch_size)


def setup_criterion(cfg: Config, bundle: data.DataBundle, log: Callable[[str], None]) -> nn.Module:
    """The training loss: cross-entropy with ``train.class_weights`` and ``train.label_smoothing``."""
    return nn.CrossEntropyLoss(weight=loss_class_weights(cfg, bundle, log), label_smoothing=cfg.train.label_smoothing)


def loss_class_weights(cfg: Config, bundle: data.DataBundle, log: Callable[[str], None]) -> torch.Tensor | None:
    """``train.class_weights`` for this training set, with a warning when it is imbalanced."""
    per_class = balance.counts(bundle.train.labels, len(bundle.classes))
    note = balance.imbalance(bundle.classes, per_class)
    weights = balance.loss_weights(cfg.train.class_weights, bundle.classes, per_class)
    if note:
        how = ("the loss weights classes by inverse frequency (train.class_weights)" if weights is not None
               else "consider train.class_weights=auto or data.balanced_sampler=true")
        log(f"{note}; {how}")
    return weights


def train_cache(cfg: Config, bb: models.Backbone, plan: FreezePlan, bundle: data.DataBundle,
                 sampler: data.EpochSampler, rt: runtime.Runtime, log: Callable[[str], None], show: bool,
                 dd: distributed.Dist) -> "_cached.Cached | None":
    """Stored activations of the plan's frozen prefix to train from, unless mixing is on. Under
    train.gradual_unfreeze the cut is still the plan's: stages frozen only for now run live."""
    if cfg.train.mixup or cfg.train.cutmix:
        log("feature cache: off (train.mixup/train.cutmix blend input images, which stored activations "
            "of the frozen layers cannot be; set both to 0 to train from the cache)")
        return None
    return dd.main_first(_cached.setup, cfg, bb, plan.frozen, bundle, sampler, rt, log, show)


def setup_mixer(cfg: Config, num_classes: int) -> mixing.Mixer | None:
    """Mixup/CutMix of the training batches as ``train.mixup`` / ``train.cutmix`` ask (None: off)."""
    if not (cfg.train.mixup or cfg.train.cutmix):
        return None
    return mixing.Mixer(num_classes, cfg.train.mixup, cfg.train.cutmix)


def maybe_compiled(fit: nn.Module, enabled: bool) -> nn.Module:
    """``fit`` through torch.compile when ``train.compile`` asks (it shares the model's parameters)."""
    return torch.compile(fit) if enabled else fit


def setup_state(resumed: dict | None, run_dir: Path | None, log: Callable[[str], None],
                 monitor: str) -> engine.TrainState:
    """A new loop state, or a resumed run's with the RNG states it stopped with."""
    state = engine.TrainState(monitor=monitor)
    if resumed is not None:
        state.load_state_dict(resumed)
        checkpoint.set_rng_state(resumed["rng"])
        log(f"resuming {run_dir} after epoch {state.epoch}" + (f", step {state.step}" if state.step else ""))
    elif run_dir is not None:
        log(f"{run_dir} holds no finished epoch (no checkpoints/last.pt): starting it fresh from epoch 1")
    return state


def schedule_start(resumed: dict | None, epochs: int) -> int:
    """The epoch the learning-rate curve starts at: 0, or where a finished run was extended to
    more epochs (its curve had ended; the added epochs get a new one)."""
    if resumed is None:
        return 0
    before = resumed.get("schedule_start", 0)  # checkpoints older than this key started at 0
    if epochs != resumed["config"]["train"]["epochs"]:
        return resumed["epoch"]
    return before


def checkpoint_part(resumed: dict | None, key: str):
    """One piece of a resumed run's checkpoint; None for a new run."""
    return None if resumed is None else resumed[key]


def trained_weights(resumed: dict | None, averaged: bool) -> dict | None:
    """A resumed run's own weights (None for a new run): under train.ema the checkpoint's
    ``model`` holds the average and ``ema`` the weights training goes on from."""
    if resumed is None:
        return None
    return resumed["ema"]["raw"] if averaged else resumed["model"]


def restore(obj, state: dict | None):
    """``obj`` with ``state`` loaded into it when both exist (a resumed run)."""
    if obj is not None and state is not None:
        obj.load_state_dict(state)
    return obj


def setup_unfreezing(cfg: Config, bb: models.Backbone, plan: FreezePlan, dd: distributed.Dist,
                log: Callable[[str], None]) -> Callable[[int], list[str]]:
    """The stages that learn in each epoch, set on the model when asked: the plan's, or under
    ``train.gradual_unfreeze`` a function of the epoch alone (so a resumed run gets the same)."""
    final = [s.name for s in plan.stages if not s.frozen]
    if not cfg.train.gradual_unfreeze:
        return lambda epoch: final
    if dd.active:  # DistributedDataParallel fixes the parameters it synchronises when it wraps the model
        raise ConfigError("train.gradual_unfreeze: not supported under torchrun, which fixes the trainable "
                          "parameters when training starts; set train.gradual_unfreeze=false or train in one process")

    def at(epoch: int) -> list[str]:
        frozen = freeze.gradual_frozen(plan, epoch)
        freeze.apply_plan(bb.model, bb.stages, plan, frozen)
        now = [name for name in final if name not in frozen]
        log(f"gradual unfreezing: epoch {epoch + 1} trains {', '.join(now)}"
            + ("" if len(now) == len(final) else f" ({len(final) - len(now)} more stage(s) to unfreeze)"))
        return now

    return at


def sweep(cfg: Config, bundle: data.DataBundle, rt: runtime.Runtime, log: Log, steps: int = lrfind.STEPS,
          measured: "strategies.Decision | None" = None) -> lrfind.RangeTest:
    """The range test (``steps`` batches) of the run ``cfg`` describes on ``bundle``, with a
    model of its own (frozen as ``measured`` says, when the similarity was measured); a curve
    without a valley suggests ``train.lr``'s default."""
    if cfg.train.lr == "auto":  # the plan's rates only set the groups' ratios, which the sweep keeps
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": lrfind.START_LR})})
    bb = setup_backbone(cfg, len(bundle.classes))
    plan, _ = setup_plan(bb, cfg, len(bundle.train), measured, log)
    model = setup_model(bb, plan, rt, None)
    loaders = setup_loaders(cfg.data, bundle, bb.preprocess, cfg.seed, rt.pin_memory)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    if not groups:
        raise InputError(f"freeze.strategy: {plan.strategy} leaves no parameter of {bb.name} to train, "
                         "so there is no learning rate to find", hint="choose a strategy that trains the head")
    optimizer = engine.build_optimizer(groups, cfg.train)
    criterion = setup_criterion(cfg, bundle, log)
    return lrfind.range_test(model, loaders.train, optimizer, criterion, rt, fallback=default_lr(), steps=steps,
                             scaler=rt.grad_scaler(), grad_clip=cfg.train.grad_clip,
                             new_pass=lambda k: loaders.position(k, 0))


def default_lr() -> float:
    """``train.lr``'s default in the schema (the one home of defaults)."""
    return TrainConfig.model_fields["lr"].default

"""``cnnft train``: fine-tune a pretrained backbone as a config says and write a run folder.

resolve config -> data -> model -> freeze plan -> optimizer, schedule -> fit -> summary.
Each builder takes its own config section and, when a run is resumed, restores its own
part of the checkpoint where it is built.
"""

from __future__ import annotations

import contextlib
import json
import random
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import balance, cache, checkpoint, data, distributed, engine, freeze, mixing, models, progress, runtime, strategies, transforms
from ..checkpoint import RunDir
from ..config import Config, DataConfig
from ..ema import WeightEma
from ..errors import ConfigError
from ..freeze import FreezePlan
from . import _cached, _phases, _records, _run, _tensorboard


@dataclass(frozen=True)
class TrainSummary:
    """What a completed run reports; ``to_dict()`` is its summary.json and ``--json`` output."""

    status: str
    run_dir: str
    best_val_acc: float
    best_epoch: int
    final_val_acc: float | None
    final_val_loss: float | None
    epochs_completed: int
    wall_seconds: float
    checkpoints: dict[str, str]
    model: str
    weights: str
    strategy: str
    trainable_params: int
    total_params: int
    classes: list[str]
    train_images: int
    val_images: int
    skipped_images: int
    skipped: list[dict]
    device: str
    test_acc: float | None = None  # best.pt on data.test, when set: reported apart from val
    test_images: int | None = None

    def to_dict(self) -> dict:
        """The summary as plain JSON-ready values, keys in summary.json's order."""
        return asdict(self)


def train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    resume: str | Path | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress_bar: bool = False,
) -> TrainSummary:
    """Fine-tune a pretrained backbone as the config says (or continue the run in ``resume``);
    write the run folder and return its summary."""
    resume = Path(resume) if resume is not None else None
    with _run.on_ctrl_c(_rerun(config_path, overrides, resume)) as disk:
        return _train(config_path, list(overrides or []), resume, log, progress_bar, disk)


def _rerun(config_path: str | Path | None, overrides: list[str] | None, resume: Path | None) -> str:
    """The command line that starts this run again."""
    head = ["--resume", str(resume)] if resume is not None else [str(config_path)] if config_path else []
    return shlex.join(["cnnft", "train", *head, *(overrides or [])])


def _train(config_path: str | Path | None, overrides: list[str], resume: Path | None,
           log: Callable[[str], None], progress_bar: bool, disk: _run.OnDisk) -> TrainSummary:
    cfg, resumed = _run.resolve(config_path, overrides, resume)
    if resume is not None:  # what a Ctrl-C from here on leaves: the run's own last checkpoint
        disk.run, disk.last = RunDir(resume), None if resumed is None else (resumed["epoch"], resumed["step"])
    dd, log, progress_bar = _setup_process(cfg.train.device, resumed, log, progress_bar)
    seed_everything(cfg.seed)
    rt = runtime.make_runtime(dd.device(cfg.train.device), cfg.train.amp, cfg.train.channels_last)
    writer = _tensorboard.writer(cfg.train.tensorboard and dd.is_main)

    bundle = _setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    bb = _setup_backbone(cfg, len(bundle.classes))
    measured = _measured(cfg, bb, bundle, rt.device, resume, log, progress_bar)
    similar = _similar(cfg.freeze.similar, bb.pretrained, measured)
    # the augmentation follows what the data is like (auto: flips and wider crops for photos)
    cfg.data.augment, cfg.data.hflip = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, similar)
    cfg.train.lr = _resolve_lr(cfg, bundle, rt, dd, log, measured)  # before anything reads it
    plan, why = _setup_plan(bb, cfg, len(bundle.train), measured, log)
    if resumed is not None:
        _run.check_resumable(resumed, bb, bundle.classes, plan)
    model = _setup_model(bb, plan, rt, _trained_weights(resumed, cfg.train.ema is not None))
    averaged = _setup_ema(model, cfg.train.ema, resumed)

    loaders = _setup_loaders(cfg.data, bundle, bb.preprocess, cfg.seed, rt.pin_memory, dd)
    fit = loaders.use_cache(_train_cache(cfg, bb, plan, bundle, loaders.sampler, rt, log, progress_bar, dd), model)
    fit = _compiled(dd.wrap(fit, rt.device, cfg.train.sync_bn, log), cfg.train.compile)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    optimizer = engine.build_optimizer(groups, cfg.train, _part(resumed, "optimizer"))
    steps = len(loaders.train)
    start = _schedule_start(resumed, cfg.train.epochs)
    scheduler = engine.build_scheduler(optimizer, cfg.train, steps, _part(resumed, "scheduler"), start)
    scaler = _restored(rt.grad_scaler(), _part(resumed, "scaler"))
    criterion = _setup_criterion(cfg, bundle, log)
    mix, unfreeze = _mixer(cfg, len(bundle.classes)), _unfreezing(cfg, bb, plan, dd, log)
    state = dd.own_share(_setup_state(resumed, resume, log, cfg.train.monitor))  # last: restores the RNGs of the stop

    run = disk.run = dd.run_dir(_run.open_run_dir, cfg, resume, _records.plan_record(plan, bb, why, measured), log)
    log(_describe(bb, bundle, plan, rt.device))
    saved = _records.Saved({**_records.header(bb, bundle, plan, cfg), "schedule_start": start, **dd.header()},
                           model, optimizer, scheduler, scaler, disk, averaged)

    with dd.stop_flag(engine.StopFlag()) as stop, _run.failed_summary(run, state.history, log, write=dd.is_main):
        _run_head_phase(cfg, bb, bundle, rt, state, saved, run, writer, log, progress_bar, criterion,
                        loaders.sampler.weights, dd)
        while state.epoch < cfg.train.epochs and not _records.patience_spent(state, cfg.train.patience, log):
            _Epoch(fit, loaders, optimizer, scheduler, scaler, criterion, rt, dd, saved, run, writer, log,
                   mix, averaged, unfreeze).run(state, stop, cfg, progress_bar)

    return _finish(_summary(run, state, plan, bb, bundle, rt.device), run, bundle, cfg.train.device, dd, log)


def _setup_process(device: str, resumed: dict | None, log: Callable[[str], None], progress_bar: bool):
    """This process's place in a torchrun job (one process otherwise); only rank 0 logs."""
    dd = distributed.setup(device)
    dd.check_resumable(resumed)
    return dd, dd.quiet(log), progress_bar and dd.is_main


@dataclass
class _Epoch:
    """What one training epoch uses; ``run`` trains it, validates it and records it."""

    fit: nn.Module
    loaders: "_Loaders"
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    rt: runtime.Runtime
    dd: distributed.Dist
    saved: "_records.Saved"
    run_dir: RunDir
    writer: Callable | None
    log: Callable[[str], None]
    mix: mixing.Mixer | None
    ema: WeightEma | None
    trainable: Callable[[int], list[str]]  # sets, and names, the stages that learn in an epoch

    def run(self, state: engine.TrainState, stop, cfg: Config, progress_bar: bool) -> None:
        """Train epoch ``state.epoch + 1`` (or the rest of it), validate, save; a stop request
        saves a resumable checkpoint and raises Interrupted."""
        epoch, steps = state.epoch, len(self.loaders.train)
        if state.step == 0:  # a new epoch, not the rest of a stopped one
            seed_everything(data.epoch_seed(cfg.seed, epoch))
            state.running = None
        self.loaders.position(epoch, state.step)
        trainable = self.trainable(epoch)
        self.fit.train()
        lrs = _records.lrs(self.optimizer)  # the rates this epoch starts with, as it trains with them
        loader = _progress(self.loaders.train, epoch, cfg.train.epochs, progress_bar)
        state.running = self.dd.sum_running(engine.train_one_epoch(
            self.fit, loader, self.optimizer, self.scheduler, self.criterion, self.rt, epoch=epoch + 1,
            running=state.running, scaler=self.scaler, grad_clip=cfg.train.grad_clip, stop=stop,
            on_step=_after_step(getattr(loader, "on_step", None), self.ema), mix=self.mix))
        state.step = state.running.steps
        if stop.stopped and state.step < steps:
            if self.dd.is_main:
                checkpoint.save(self.saved.checkpoint(state), self.run_dir.last)
                self.saved.disk.last = (state.epoch, state.step)
            raise _run.interrupted(stop.signum, self.run_dir, epoch + 1, state.step, steps)
        # validation loss is plain cross-entropy: comparable across label_smoothing values and
        # equal to what `cnnft evaluate` reports
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():  # validate the average
            ev = self.dd.evaluate(self.fit, self.loaders.val, self.rt, criterion=nn.CrossEntropyLoss())
        _records.end_epoch(state, _records.row(state, "train", lrs, state.running, ev, trainable), self.saved, self.run_dir, self.writer,
                   self.log, cfg.train.epochs, write=self.dd.is_main)
        if stop.stopped:
            raise _run.interrupted(stop.signum, self.run_dir, epoch + 1, 0, steps)


def _unfreezing(cfg: Config, bb: models.Backbone, plan: FreezePlan, dd: distributed.Dist,
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


def _after_step(show: Callable[[engine.Running], None] | None,
                averaged: WeightEma | None) -> Callable[[engine.Running], None] | None:
    """What runs after each optimizer step: the EMA update, then the progress bar."""
    if averaged is None:
        return show

    def step(r: engine.Running) -> None:
        averaged.update()
        if show is not None:
            show(r)

    return step


def _finish(summary: "TrainSummary", run: RunDir, bundle: data.DataBundle, device: str, dd: distributed.Dist,
            log: Callable[[str], None]) -> "TrainSummary":
    """Evaluate best.pt on data.test when there is one; write summary.json (rank 0)."""
    if dd.is_main and bundle.test is not None:  # best.pt was picked on val; the test set is its unbiased figure
        from .evaluate import evaluate
        ev = evaluate(run.best, split="test", device=device, log=log)
        log(f"test accuracy {ev.accuracy:.4f} (best.pt, epoch {ev.epoch}) on {ev.images} images: {ev.out_dir}")
        summary = replace(summary, test_acc=ev.accuracy, test_images=ev.images)
    if dd.is_main:
        checkpoint.atomic_write_json(run.summary, summary.to_dict())
    return summary


def _class_weights(cfg: Config, bundle: data.DataBundle, log: Callable[[str], None]) -> torch.Tensor | None:
    """``train.class_weights`` for this training set, with a warning when it is imbalanced."""
    per_class = balance.counts(bundle.train.labels, len(bundle.classes))
    note = balance.imbalance(bundle.classes, per_class)
    weights = balance.loss_weights(cfg.train.class_weights, bundle.classes, per_class)
    if note:
        how = ("the loss weights classes by inverse frequency (train.class_weights)" if weights is not None
               else "consider train.class_weights=auto or data.balanced_sampler=true")
        log(f"{note}; {how}")
    return weights


def _train_cache(cfg: Config, bb: models.Backbone, plan: FreezePlan, bundle: data.DataBundle,
                 sampler: data.EpochSampler, rt: runtime.Runtime, log: Callable[[str], None], show: bool,
                 dd: distributed.Dist) -> "_cached.Cached | None":
    """Stored activations of the plan's frozen prefix to train from, unless mixing is on. Under
    train.gradual_unfreeze the cut is still the plan's: stages frozen only for now run live."""
    if cfg.train.mixup or cfg.train.cutmix:
        log("feature cache: off (train.mixup/train.cutmix blend input images, which stored activations "
            "of the frozen layers cannot be; set both to 0 to train from the cache)")
        return None
    return dd.main_first(_cached.setup, cfg, bb, plan.frozen, bundle, sampler, rt, log, show)


def _mixer(cfg: Config, num_classes: int) -> mixing.Mixer | None:
    """Mixup/CutMix of the training batches as ``train.mixup`` / ``train.cutmix`` ask (None: off)."""
    if not (cfg.train.mixup or cfg.train.cutmix):
        return None
    return mixing.Mixer(num_classes, cfg.train.mixup, cfg.train.cutmix)


def _compiled(fit: nn.Module, enabled: bool) -> nn.Module:
    """``fit`` through torch.compile when ``train.compile`` asks (it shares the model's parameters)."""
    return torch.compile(fit) if enabled else fit


def _describe(bb: models.Backbone, bundle: data.DataBundle, plan: FreezePlan, device: torch.device) -> str:
    return (f"{bb.name} ({bb.weights}) -> {len(bundle.classes)} classes, strategy {plan.strategy}: "
            f"{plan.trainable_params:,} of {plan.total_params:,} parameters train; "
            f"{len(bundle.train)} train / {len(bundle.val)} val images; device {device}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _part(resumed: dict | None, key: str):
    """One piece of a resumed run's checkpoint; None for a new run."""
    return None if resumed is None else resumed[key]


def _trained_weights(resumed: dict | None, averaged: bool) -> dict | None:
    """A resumed run's own weights (None for a new run): under train.ema the checkpoint's
    ``model`` holds the average and ``ema`` the weights training goes on from."""
    if resumed is None:
        return None
    return resumed["ema"]["raw"] if averaged else resumed["model"]


def _restored(obj, state: dict | None):
    """``obj`` with ``state`` loaded into it when both exist (a resumed run)."""
    if obj is not None and state is not None:
        obj.load_state_dict(state)
    return obj


# ------------------------------------------------------------------------------- builders

def _setup_data(cfg: DataConfig, num_classes: int | None, seed: int, log: Callable[[str], None]) -> data.DataBundle:
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


def _resolve_lr(cfg: Config, bundle: data.DataBundle, rt: runtime.Runtime, dd: distributed.Dist,
                log: Callable[[str], None], measured: strategies.Decision | None = None) -> float:
    """``train.lr``, with ``auto`` replaced by the suggestion of a learning-rate range test
    (``cnnft lr-find``) on a model of its own, rounded to 3 significant digits. Torch's, NumPy's
    and Python's generators are put back afterwards, so the run is the one ``train.lr`` set to
    that number would give; under torchrun rank 0 runs the test and every process takes its number."""
    if cfg.train.lr != "auto":
        return cfg.train.lr
    from .lr_find import sweep

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


def _setup_backbone(cfg: Config, n_classes: int) -> models.Backbone:
    """The backbone with a new ``n_classes`` head, checked against ``data.image_size`` and
    preprocessing at that size (checkpoints record what was used)."""
    bb = models.build(cfg.model.backbone, cfg.model.weights, n_classes)
    _check_input_size(bb, cfg.data.image_size)
    bb.preprocess = bb.preprocess.with_size(cfg.data.image_size)
    return bb


def _setup_criterion(cfg: Config, bundle: data.DataBundle, log: Callable[[str], None]) -> nn.Module:
    """The training loss: cross-entropy with ``train.class_weights`` and ``train.label_smoothing``."""
    return nn.CrossEntropyLoss(weight=_class_weights(cfg, bundle, log), label_smoothing=cfg.train.label_smoothing)


def _check_input_size(bb: models.Backbone, size: int | None) -> None:
    """Refuse an image size the architecture cannot run on, before the run folder exists
    (None: the weights' own size, which always fits)."""
    smallest = models.min_input(bb.model)
    if size is not None and size < smallest:
        raise ConfigError(f"data.image_size: {bb.name} needs inputs of at least {smallest} px (got {size}); "
                          f"set data.image_size={max(smallest, bb.preprocess.crop_size)}")


def _measured(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, device: torch.device,
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
    from .. import similarity

    log(f"freeze.similar auto: measuring on at most {similarity.PER_CLASS} training images per class ...")
    size = strategies.size_class(len(bundle.train), bb.num_classes)
    decision, m = similarity.assess(bb, bundle.train, size, seed=cfg.seed, device=device, show_progress=show,
                                    log=log)
    log(f"similarity measured on {m.images} images ({m.folds}-fold probes) in {m.seconds:.0f}s: {decision.reason}")
    return decision


def _similar(setting: bool | str, pretrained: bool, measured: strategies.Decision | None) -> bool:
    """Whether the data is taken as similar to ImageNet: as measured, as set, or for ``auto``
    unmeasured: not without pretrained weights (a random network's features say nothing of
    ImageNet), else yes (an explicit strategy needs no measurement; photos are the usual case)."""
    if measured is not None:
        return measured.similar
    if setting == "auto":
        return pretrained
    return bool(setting)


def _setup_plan(bb: models.Backbone, cfg: Config, n_images: int, measured: strategies.Decision | None,
                log: Callable[[str], None]) -> tuple[FreezePlan, str | None]:
    """The freeze plan for ``bb`` (``auto`` resolved from the data's size and similarity,
    measured or given) and why, if chosen."""
    n_classes = bb.num_classes
    size = strategies.size_class(n_images, n_classes)
    size_reason = f"{n_images} images / {n_classes} classes is '{size}'"
    if measured is not None:
        strategy, why = measured.strategy, f"auto: {size_reason}; measured: {measured.reason}"
    else:
        similar = _similar(cfg.freeze.similar, bb.pretrained, None)
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


def _setup_model(bb: models.Backbone, plan: FreezePlan, rt: runtime.Runtime, state: dict | None) -> nn.Module:
    """The model frozen as ``plan`` says, on the runtime's device, with a resumed run's weights."""
    freeze.apply_plan(bb.model, bb.stages, plan)
    rt.prepare(bb.model)
    return _restored(bb.model, state)


def _setup_ema(model: nn.Module, decay: float | None, resumed: dict | None) -> WeightEma | None:
    """The weight average ``train.ema`` asks for (None: off), continued from a resumed run;
    its checkpoint's ``model`` holds the average and ``ema`` the raw weights."""
    if decay is None:
        return None
    averaged = WeightEma(model, decay)
    if resumed is not None:
        averaged.load(resumed["model"], resumed["ema"]["updates"])
    return averaged


@dataclass
class _Loaders:
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

    def use_cache(self, cached: "_cached.Cached | None", model: nn.Module) -> nn.Module:
        """Train and validate from stored activations when ``cached``; return the module to fit."""
        if cached is None:
            return model
        self.train, self.val, self.views = cached.train, cached.val, cached.views
        return cached.rest


def _setup_loaders(cfg: DataConfig, bundle: data.DataBundle, pre: models.Preprocess, seed: int, pin: bool,
                   dd: distributed.Dist = distributed.Dist()) -> _Loaders:
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
    return _Loaders(train_loader, val_loader, train_ds, sampler, gen, seed, cfg.batch_size)


def _setup_state(resumed: dict | None, run_dir: Path | None, log: Callable[[str], None],
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


# ---------------------------------------------------------------------- records of the run


def _run_head_phase(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, rt: runtime.Runtime,
                    state: engine.TrainState, saved: _records.Saved, run: RunDir, writer, log, show: bool,
                    criterion: nn.Module, sample_weights: torch.Tensor | None, dd: distributed.Dist) -> None:
    """Train the new head alone first and record it as epoch 0 (a candidate for best.pt); only
    on pretrained layers (a random backbone has no features worth a probe) and only once."""
    if not (cfg.train.head_phase and bb.pretrained and not state.history and state.step == 0):
        return
    if dd.active:  # its cached features are not sharded across processes
        log("head phase: skipped under torchrun (train.head_phase runs in a single process)")
        return
    done = _phases.head_phase(cfg, bb, bundle, rt, log, show, criterion, sample_weights)
    if done is not None:
        running, ev, _ = done
        lrs = {"lr_head": cfg.train.lr, "lr_backbone": None}
        _records.end_epoch(state, _records.row(state, "head", lrs, running, ev, ["head"]), saved, run, writer, log, cfg.train.epochs)


def _schedule_start(resumed: dict | None, epochs: int) -> int:
    """The epoch the learning-rate curve starts at: 0, or where a finished run was extended to
    more epochs (its curve had ended; the added epochs get a new one)."""
    if resumed is None:
        return 0
    before = resumed.get("schedule_start", 0)  # checkpoints older than this key started at 0
    if epochs != resumed["config"]["train"]["epochs"]:
        return resumed["epoch"]
    return before


def _summary(run: RunDir, state: engine.TrainState, plan: FreezePlan, bb: models.Backbone,
             bundle: data.DataBundle, device: torch.device) -> TrainSummary:
    last = state.history[-1] if state.history else None
    return TrainSummary(
        status="completed",
        run_dir=str(run),
        best_val_acc=state.best_val_acc,
        best_epoch=state.best_epoch,
        final_val_acc=last["val_acc"] if last else None,
        final_val_loss=last["val_loss"] if last else None,
        epochs_completed=state.epoch,  # the strategy's epochs; the head phase is epoch 0
        wall_seconds=round(last["wall_seconds"] if last else state.wall_seconds, 3),
        checkpoints={"best": str(run.best), "last": str(run.last)},
        model=bb.name,
        weights=bb.weights,
        strategy=plan.strategy,
        trainable_params=plan.trainable_params,
        total_params=plan.total_params,
        classes=bundle.classes,
        train_images=len(bundle.train),
        val_images=len(bundle.val),
        skipped_images=len(bundle.skipped),
        skipped=[{"path": p, "reason": r} for p, r in bundle.skipped],
        device=str(device),
    )


# ------------------------------------------------------------------------ progress and curves

def _progress(loader, epoch: int, epochs: int, enabled: bool):
    """The loader, wrapped in a bar that shows the running loss and accuracy when ``enabled``."""
    if not enabled:
        return loader
    bar = progress.bar(loader, f"epoch {epoch + 1}/{epochs}", True)

    class _Bar:
        def __iter__(self):
            return iter(bar)

        def on_step(self, r: engine.Running) -> None:
            bar.set_postfix(loss=f"{r.loss:.3f}", acc=f"{r.acc:.3f}", refresh=False)

    return _Bar()

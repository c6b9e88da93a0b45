"""``cnnft train``: fine-tune a pretrained backbone as a config says and write a run folder.

resolve config -> data -> model -> freeze plan -> optimizer, schedule -> fit -> summary.
Each builder takes its own config section and, when a run is resumed, restores its own
part of the checkpoint where it is built.
"""

from __future__ import annotations

import copy
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__, cache, checkpoint, data, distributed, engine, freeze, metrics, models, progress, runtime, strategies, transforms
from ..checkpoint import RunDir
from ..config import Config, DataConfig
from ..errors import ConfigError, InputError
from ..freeze import FreezePlan
from . import _cached, _run

# metrics.csv column -> TensorBoard tag (train and val share a chart)
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
                    "val_acc": "accuracy/val", "lr_head": "lr/head", "lr_backbone": "lr/backbone",
                    "images_per_second": "speed/images_per_second"}


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
    cfg, resumed = _run.resolve(config_path, list(overrides or []), resume)
    dd = distributed.setup(cfg.train.device)  # torchrun: this process's rank; else one process
    log, progress_bar = dd.quiet(log), progress_bar and dd.is_main
    dd.check_resumable(resumed)
    seed_everything(cfg.seed)
    rt = runtime.make_runtime(dd.device(cfg.train.device), cfg.train.amp, cfg.train.channels_last)
    writer = _tensorboard(cfg.train.tensorboard and dd.is_main)

    bundle = _setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    bb = models.build(cfg.model.backbone, cfg.model.weights, len(bundle.classes))
    _check_input_size(bb, cfg.data.image_size)
    bb.preprocess = bb.preprocess.with_size(cfg.data.image_size)  # checkpoints record what was used
    plan, why = _setup_plan(bb, cfg, len(bundle.train), log)
    if resumed is not None:
        _run.check_resumable(resumed, bb, bundle.classes, plan)
    model = _setup_model(bb, plan, rt, _part(resumed, "model"))

    loaders = _setup_loaders(cfg.data, bundle, bb.preprocess, cfg.seed, rt.pin_memory, dd)
    fit = loaders.use_cache(dd.main_first(_cached.setup, cfg, bb, plan.frozen, bundle, loaders.sampler, rt, log,
                                          progress_bar), model)
    fit = dd.wrap(fit, rt.device, cfg.train.sync_bn, log)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    optimizer = engine.build_optimizer(groups, cfg.train, _part(resumed, "optimizer"))
    steps = len(loaders.train)
    scheduler = engine.build_scheduler(optimizer, cfg.train, steps, _part(resumed, "scheduler"))
    scaler = _restored(rt.grad_scaler(), _part(resumed, "scaler"))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    state = dd.own_share(_setup_state(resumed, resume, log))  # last: it restores the RNGs as they were at the stop

    run = dd.run_dir(_run.open_run_dir, cfg, resume, _plan_record(plan, bb, why), log)
    log(f"{bb.name} ({bb.weights}) -> {len(bundle.classes)} classes, strategy {plan.strategy}: "
        f"{plan.trainable_params:,} of {plan.total_params:,} parameters train; "
        f"{len(bundle.train)} train / {len(bundle.val)} val images; device {rt.device}")
    saved = _Saved({**_header(bb, bundle, plan, cfg), **dd.header()}, model, optimizer, scheduler, scaler)

    with dd.stop_flag(engine.StopFlag()) as stop, _run.failed_summary(run, state.history, log, write=dd.is_main):
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            if state.step == 0:  # a new epoch, not the rest of a stopped one
                seed_everything(data.epoch_seed(cfg.seed, epoch))
                state.running = None
            loaders.position(epoch, state.step)
            fit.train()
            loader = _progress(loaders.train, epoch, cfg.train.epochs, progress_bar)
            state.running = dd.sum_running(engine.train_one_epoch(
                fit, loader, optimizer, scheduler, criterion, rt, epoch=epoch + 1,
                running=state.running, scaler=scaler, grad_clip=cfg.train.grad_clip, stop=stop,
                on_step=getattr(loader, "on_step", None)))
            state.step = state.running.steps
            if stop.stopped and state.step < steps:
                if dd.is_main:
                    checkpoint.save(saved.checkpoint(state), run.last)
                raise _run.interrupted(stop.signum, run, epoch + 1, state.step, steps)
            # validation loss is plain cross-entropy: comparable across label_smoothing values and
            # equal to what `cnnft evaluate` reports
            ev = dd.evaluate(fit, loaders.val, rt, criterion=nn.CrossEntropyLoss())
            _end_epoch(state, ev, saved, run, writer, log, cfg.train.epochs, write=dd.is_main)
            if stop.stopped:
                raise _run.interrupted(stop.signum, run, epoch + 1, 0, steps)

    summary = _summary(run, state, plan, bb, bundle, rt.device)
    if dd.is_main:
        checkpoint.atomic_write_json(run.summary, summary.to_dict())
    return summary


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _part(resumed: dict | None, key: str):
    """One piece of a resumed run's checkpoint; None for a new run."""
    return None if resumed is None else resumed[key]


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


def _check_input_size(bb: models.Backbone, size: int | None) -> None:
    """Refuse an image size the architecture cannot run on, before the run folder exists
    (None: the weights' own size, which always fits)."""
    smallest = models.min_input(bb.model)
    if size is not None and size < smallest:
        raise ConfigError(f"data.image_size: {bb.name} needs inputs of at least {smallest} px (got {size}); "
                          f"set data.image_size={max(smallest, bb.preprocess.crop_size)}")


def _setup_plan(bb: models.Backbone, cfg: Config, n_images: int, log: Callable[[str], None]) -> tuple[FreezePlan, str | None]:
    """The freeze plan for ``bb`` (``auto`` resolved from the data's size) and why, if chosen."""
    n_classes = bb.num_classes
    size = strategies.size_class(n_images, n_classes)
    strategy, why = strategies.choose_strategy(cfg.freeze.strategy, size=size, similar=cfg.freeze.similar,
                                           pretrained=bb.pretrained, weights=cfg.model.weights,
                                           size_reason=f"{n_images} images / {n_classes} classes is '{size}'")
    if why:
        log(why)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, cfg.train.lr, cfg.train.backbone_lr_scale,
                            pretrained=bb.pretrained, frozen_stages=cfg.freeze.frozen_stages,
                            trainable_stages=cfg.freeze.trainable_stages)
    return plan, why


def _setup_model(bb: models.Backbone, plan: FreezePlan, rt: runtime.Runtime, state: dict | None) -> nn.Module:
    """The model frozen as ``plan`` says, on the runtime's device, with a resumed run's weights."""
    freeze.apply_plan(bb.model, bb.stages, plan)
    rt.prepare(bb.model)
    return _restored(bb.model, state)


@dataclass
class _Loaders:
    """The training loader, positioned per epoch (and per step, when resuming), and the validation one."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    sampler: data.EpochSampler
    generator: torch.Generator
    seed: int
    batch_size: int
    views: "cache.CachedFeatures | None" = None

    def position(self, epoch: int, step: int) -> None:
        """Serve ``epoch``'s batches from ``step`` on, as a run that never stopped saw them."""
        self.generator.manual_seed(self.seed * 7_919 + epoch * 104_729 + step)
        self.sampler.set_epoch(epoch, start=step * self.batch_size)
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
    train_ds = data.ImageDataset(bundle.train, transforms.train_transform(pre, cfg.augment), draft)
    val_ds = data.ImageDataset(bundle.val, transforms.eval_transform(pre), draft)
    sampler = dd.sampler(len(train_ds), seed, cfg.batch_size)
    gen = torch.Generator()
    train_loader = data.make_loader(train_ds, cfg.batch_size, cfg.num_workers, sampler=sampler, generator=gen, pin_memory=pin)
    if dd.active:
        val_ds = torch.utils.data.Subset(val_ds, dd.eval_indices(len(val_ds)))
    val_loader = data.make_loader(val_ds, cfg.batch_size, cfg.num_workers, pin_memory=pin)
    return _Loaders(train_loader, val_loader, sampler, gen, seed, cfg.batch_size)


def _setup_state(resumed: dict | None, run_dir: Path | None, log: Callable[[str], None]) -> engine.TrainState:
    """A new loop state, or a resumed run's with the RNG states it stopped with."""
    state = engine.TrainState()
    if resumed is not None:
        state.load_state_dict(resumed)
        checkpoint.set_rng_state(resumed["rng"])
        log(f"resuming {run_dir} after epoch {state.epoch}" + (f", step {state.step}" if state.step else ""))
    elif run_dir is not None:
        log(f"{run_dir} holds no finished epoch (no checkpoints/last.pt): starting it fresh from epoch 1")
    return state


# ---------------------------------------------------------------------- records of the run

def _plan_record(plan: FreezePlan, bb: models.Backbone, why: str | None) -> dict:
    """freeze_plan.json: the plan and the model it was made for."""
    return {**plan.to_dict(), "model": bb.name, "weights": bb.weights, "pretrained": bb.pretrained,
            "num_classes": bb.num_classes, "auto": why}


def _header(bb: models.Backbone, bundle: data.DataBundle, plan: FreezePlan, cfg: Config) -> dict:
    """What every checkpoint of a run says about itself: enough to use it with nothing else."""
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "cnnft_version": __version__,
        "model_name": bb.name,
        "weights": bb.weights,
        "pretrained": bb.pretrained,
        "num_classes": bb.num_classes,
        "classes": list(bundle.classes),
        "preprocess": bb.preprocess.to_dict(),
        "freeze_plan": plan.to_dict(),
        "skipped_images": [list(s) for s in bundle.skipped],
        "config": cfg.to_dict(),
    }


@dataclass
class _Saved:
    """What a checkpoint holds: the run's header and the state of what training changes."""

    header: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None

    def checkpoint(self, state: engine.TrainState) -> dict:
        """A resumable checkpoint at ``state``."""
        return {
            **self.header,
            **state.state_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": checkpoint.rng_state(),
        }


def _group_lr(optimizer: torch.optim.Optimizer, role: str) -> float | None:
    for g in optimizer.param_groups:
        if g["name"] == role:
            return g["lr"]
    return None


def _end_epoch(state: engine.TrainState, ev: engine.EvalResult, saved: _Saved, run: RunDir,
               writer, log: Callable[[str], None], epochs: int, *, write: bool = True) -> None:
    """Record a finished epoch: metrics row, checkpoints (best too when it improved), log line.
    ``write=False`` (the other processes of a distributed run) keeps the state in step, writes nothing."""
    running, optimizer = state.running, saved.optimizer
    row = {
        "epoch": state.epoch + 1,
        "lr_head": _group_lr(optimizer, "head") or _group_lr(optimizer, "head_no_decay"),
        "lr_backbone": _group_lr(optimizer, "backbone") or _group_lr(optimizer, "backbone_no_decay"),
        "train_loss": running.loss, "train_acc": running.acc,
        "val_loss": ev.loss, "val_acc": ev.acc,
        "epoch_seconds": round(running.seconds + ev.seconds, 3),
        "images_per_second": round(running.seen / max(running.seconds, 1e-9), 1),
        "wall_seconds": round(state.wall_seconds, 3),
    }
    # the epoch is recorded (history, metrics.csv, and so the summary of a run that fails
    # later) only once its checkpoint is on disk: a failed save leaves no false bookkeeping
    after = copy.copy(state)
    after.history = list(state.history)
    improved = after.end_epoch(row)
    if not write:
        state.end_epoch(row)
        return
    ckpt = saved.checkpoint(after)
    if improved:  # the same bytes: link rather than write them twice. best first: a kill in
        checkpoint.save(ckpt, run.best)  # between leaves last.pt one epoch behind, and the
        checkpoint.atomic_link(run.best, run.last)  # resumed run redoes it (never a stale best)
    else:
        checkpoint.save(ckpt, run.last)
    state.end_epoch(row)
    metrics.write_csv(run.metrics, state.history, metrics.EPOCH_COLUMNS)
    if writer is not None:
        writer(run.tensorboard, row)
    log(f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  |  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{'  *' if improved else ''}"
        f"  |  {row['epoch_seconds']:.1f}s, {row['images_per_second']:.0f} img/s")


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
        epochs_completed=len(state.history),
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


def _tensorboard(enabled: bool):
    """A function writing one metrics row to TensorBoard, or None when ``train.tensorboard`` is off."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - missing optional dependency
        raise InputError("train.tensorboard: the tensorboard package is not installed",
                         hint="pip install 'cnnft[tensorboard]', or set train.tensorboard=false") from None
    writers: dict = {}

    def write(folder: Path, row: dict) -> None:
        w = writers.get(folder)
        if w is None:  # one event file per process, opened on the first epoch
            w = writers[folder] = SummaryWriter(str(folder))
        for key, tag in TENSORBOARD_TAGS.items():
            if row.get(key) is not None:
                w.add_scalar(tag, row[key], row["epoch"])
        w.flush()

    return write

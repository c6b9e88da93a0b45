"""The records of a training run: what checkpoints say about themselves, one metrics row per
epoch, and recording an epoch (checkpoints first, then history and metrics.csv)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .. import __version__, files, models
from ..config import Config
from ..data import folders as data
from ..data.fingerprint import fingerprint
from ..results import metrics
from ..results.rundir import RunDir
from ..training import engine
from ..training.ema import WeightEma
from ..training.freeze import FreezePlan
from . import checkpoint
from . import folder as _run


def plan_record(plan: FreezePlan, bb: models.Backbone, why: str | None, measured=None) -> dict:
    """freeze_plan.json: the plan, the model it was made for and, when ``freeze.similar`` was
    measured, the measurement (``similarity``: the decision and its per-stage probe table)."""
    return {**plan.to_dict(), "model": bb.name, "weights": bb.weights, "pretrained": bb.pretrained,
            "num_classes": bb.num_classes, "auto": why,
            "similarity": None if measured is None else measured.to_dict()}



def describe(bb: models.Backbone, bundle: data.DataBundle, plan: FreezePlan, device: torch.device) -> str:
    """The line that opens a run's log: model, classes, strategy, trainable parameters, images, device."""
    return (f"{bb.name} ({bb.weights}) -> {len(bundle.classes)} classes, strategy {plan.strategy}: "
            f"{plan.trainable_params:,} of {plan.total_params:,} parameters train; "
            f"{len(bundle.train)} train / {len(bundle.val)} val images; device {device}")



def header(bb: models.Backbone, bundle: data.DataBundle, plan: FreezePlan, cfg: Config) -> dict:
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
        "data": fingerprint(bundle.classes, bundle.train, bundle.val),  # what --resume checks the data against
        "config": cfg.to_dict(),
    }



@dataclass
class Saved:
    """What a checkpoint holds: the run's header and the state of what training changes."""

    header: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    disk: _run.OnDisk  # what the run holds on disk, updated as last.pt is written (for Ctrl-C's message)
    ema: WeightEma | None = None

    def checkpoint(self, state: engine.TrainState) -> dict:
        """A resumable checkpoint at ``state``. Under train.ema, ``model`` holds the averaged
        weights (what predict/evaluate use) and ``ema`` the raw ones a resumed run trains on."""
        weights = _cpu(self.model.state_dict())
        averaged = {} if self.ema is None else {
            "model": _cpu(self.ema.averaged_state()),
            "ema": {"decay": self.ema.decay, "updates": self.ema.updates, "raw": weights}}
        return {
            **self.header,
            **state.state_dict(),
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": checkpoint.rng_state(),
            **averaged,
        }


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}



def lrs(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """The current rate of the head and of the trainable pretrained stages: the deepest one's,
    under a layer decay (None: none train now)."""
    learning = [g for g in optimizer.param_groups if any(p.requires_grad for p in g["params"])]
    head = [g["lr"] for g in learning if g["name"].removesuffix("_no_decay") == "head"]
    backbone = [g["lr"] for g in learning if g["name"].startswith("backbone")]
    return {"lr_head": head[0] if head else None, "lr_backbone": max(backbone, default=None)}



def row(state: engine.TrainState, phase: str, lrs: dict, running: engine.Running, ev: engine.EvalResult,
        trainable: list[str]) -> dict:
    """metrics.csv's row for an epoch just finished (the head phase is epoch 0); ``trainable``:
    the stages that learnt in it."""
    return {
        "epoch": state.epoch + 1 if phase == "train" else 0, "phase": phase, **lrs,
        "train_loss": running.loss, "train_acc": running.acc,
        "val_loss": ev.loss, "val_acc": ev.acc, "val_f1": macro_f1(ev),
        "epoch_seconds": round(running.seconds + ev.seconds, 3),
        "images_per_second": round(running.seen / max(running.seconds, 1e-9), 1),
        # the share of the training time spent waiting for images: near 1, the input is the limit
        "data_wait": round(running.data_seconds / max(running.seconds, 1e-9), 3),
        "wall_seconds": round(state.wall_seconds, 3),
        "trainable_stages": "+".join(trainable),
    }



def macro_f1(ev: engine.EvalResult) -> float:
    classes = ev.probs.shape[1] if ev.probs.ndim == 2 else 0
    cm = metrics.confusion_matrix(ev.labels.numpy(), ev.probs.argmax(1).numpy(), classes)
    return metrics.per_class(cm, [str(i) for i in range(classes)])["macro"]["f1"]



def end_epoch(state: engine.TrainState, row: dict, saved: Saved, run: RunDir,
               writer, log: Callable[[str], None], epochs: int, *, write: bool = True) -> None:
    """Record a finished epoch: metrics row, checkpoints (best too when it improved), log line.
    ``write=False`` (the other processes of a distributed run) keeps the state in step, writes nothing."""
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
        files.atomic_link(run.best, run.last)  # resumed run redoes it (never a stale best)
    else:
        checkpoint.save(ckpt, run.last)
    saved.disk.last = (after.epoch, 0)
    state.end_epoch(row)
    metrics.write_csv(run.metrics, state.history, metrics.EPOCH_COLUMNS)
    if writer is not None:
        writer(run.tensorboard, row)
    where = "head phase" if row["phase"] == "head" else f"epoch {row['epoch']}/{epochs}"
    log(f"{where}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
        f"  |  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{'  *' if improved else ''}"
        f"  |  {row['epoch_seconds']:.1f}s, {row['images_per_second']:.0f} img/s")



def patience_spent(state: engine.TrainState, patience: int | None, log: Callable[[str], None]) -> bool:
    """True (and said once) when ``train.patience`` epochs passed without a better monitor value."""
    if patience is None or state.epoch == 0 or state.epochs_since_best() < patience:
        return False
    log(f"early stop: {state.monitor} has not improved for {patience} epoch(s) since epoch {state.best_epoch}")
    return True


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
    calibration: dict | None = None  # the temperature fitted on val; ECE/NLL before and after (val, and test)
    stopped_by: str | None = None  # "train.time_budget" when the budget ended the run

    def to_dict(self) -> dict:
        """The summary as plain JSON-ready values, keys in summary.json's order."""
        return asdict(self)


def summary(run: RunDir, state: engine.TrainState, plan: FreezePlan, bb: models.Backbone,
             bundle: data.DataBundle, device: torch.device, status: str = "completed") -> TrainSummary:
    last = state.history[-1] if state.history else None
    return TrainSummary(
        status=status,
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

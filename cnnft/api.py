"""The recipes: each reads top to bottom and composes plain functions.

``train``: resolve config -> build data -> build model -> plan freeze -> fit -> save.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import __version__, checkpoint, data, engine, freeze, metrics, models, progress, runtime, transforms
from . import config as config_mod
from .config import Config
from .errors import CheckpointError, ConfigError, InputError, Interrupted

# metrics.csv column -> TensorBoard tag (train and val share a chart)
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
                    "val_acc": "accuracy/val", "lr_head": "lr/head", "lr_backbone": "lr/backbone",
                    "images_per_second": "speed/images_per_second"}
# keys that may change when a run is resumed; everything else defines the run
RESUMABLE_KEYS = ("train.epochs", "train.device", "data.num_workers", "train.tensorboard")


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
) -> dict:
    """Recommend a strategy for a quadrant and, given a model, plan it stage by stage."""
    size_rule = None
    if images is not None:
        if classes is None:
            raise InputError("--images needs --classes (the size class is images per class)")
        derived = freeze.size_class(images, classes)
        size_rule = (f"{images} images / {classes} classes = {images / classes:.0f} per class: "
                     f"'{derived}' (large from {freeze.LARGE_IMAGES_PER_CLASS} per class)")
        if size is not None and size != derived:
            raise InputError(f"--size {size} contradicts --images/--classes, which give '{derived}'")
        size = derived
    if strategy is None:
        if size is None or similar is None:
            raise InputError(
                "say how large and how similar the dataset is: --size small|large (or --images N "
                "--classes K) and --similar yes|no; or pick --strategy full|freeze_early|freeze_most|head_only"
            )
        strategy = freeze.choose_strategy("auto", size=size, similar=similar)[0]
    result: dict = {
        "strategy": strategy,
        "size": size,
        "similar": similar,
        "rationale": freeze.RATIONALE[strategy],
        "size_rule": size_rule,
    }
    if model is None:
        return result
    defaults_train = config_mod.TrainConfig()
    defaults_freeze = config_mod.FreezeConfig()
    lr = defaults_train.lr if lr is None else lr
    if lr <= 0:
        raise InputError(f"--lr must be > 0 (got {lr})")
    bb = models.build(model, "DEFAULT", classes, on_meta=True)
    plan = freeze.make_plan(
        bb.model, bb.stages, strategy, lr, defaults_train.backbone_lr_scale,
        pretrained=True,
        frozen_stages=frozen_stages,
        trainable_stages=defaults_freeze.trainable_stages if trainable_stages is None else trainable_stages,
    )
    result.update(model=model, num_classes=bb.num_classes, **plan.to_dict())
    return result



# ----------------------------------------------------------------------------------- train

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_run_dir(output_dir: str, name: str) -> Path:
    """Create a fresh run folder ``output_dir/name``; an existing one is never reused
    (``name-2``, ``name-3``... instead)."""
    parent = Path(output_dir).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            cand = parent / (name if i == 1 else f"{name}-{i}")
            try:
                cand.mkdir()
            except FileExistsError:
                continue
            (cand / "checkpoints").mkdir()
            return cand
    except (NotADirectoryError, FileExistsError):
        raise InputError(f"output_dir: {parent} exists and is not a folder",
                         hint="set output_dir to a folder path (output_dir=runs)") from None
    except PermissionError:
        raise InputError(f"output_dir: cannot create a run folder in {parent}: permission denied",
                         hint="set output_dir to a writable folder") from None
    except OSError as exc:
        raise InputError(f"output_dir: cannot create a run folder in {parent}: {exc.strerror}",
                         hint="set output_dir to a writable folder") from None
    raise InputError(f"output_dir: too many runs named {name} in {parent}; choose another name")


def _check_writable(output_dir: str) -> None:
    """Fail before any work if the run folder could not be created."""
    p = Path(output_dir).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output_dir: {probe} is a file, not a folder", hint="set output_dir to a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"output_dir: {probe} is not writable", hint="set output_dir to a writable folder")
    # os.access says yes to root everywhere; /proc, /sys and read-only mounts refuse only a real try
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cnnft-probe-", dir=probe))
    except OSError as exc:
        raise InputError(f"output_dir: cannot create folders in {probe}: {exc.strerror or exc}",
                         hint="set output_dir to a writable folder") from None


def _resolve_strategy(cfg: Config, n_images: int, n_classes: int, pretrained: bool = True) -> tuple[str, str | None]:
    size = freeze.size_class(n_images, n_classes)
    return freeze.choose_strategy(cfg.freeze.strategy, size=size, similar=cfg.freeze.similar, pretrained=pretrained,
                                  weights=cfg.model.weights,
                                  size_reason=f"{n_images} images / {n_classes} classes is '{size}'")


def _group_lr(optimizer: torch.optim.Optimizer, role: str) -> float | None:
    for g in optimizer.param_groups:
        if g.get("name") == role:
            return g["lr"]
    return None


def _checkpoint(*, cfg_dict, bb: models.Backbone, classes, plan, model, optimizer, scheduler, scaler,
                epoch, step, running, history, best_val_acc, best_epoch, skipped) -> dict:
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "cnnft_version": __version__,
        "model_name": bb.name,
        "weights": bb.weights,
        "pretrained": bb.pretrained,
        "num_classes": bb.num_classes,
        "classes": list(classes),
        "preprocess": bb.preprocess.to_dict(),
        "freeze_plan": plan.to_dict(),
        "epoch": epoch,  # completed epochs
        "step": step,  # batches done in epoch+1 (0 at an epoch boundary)
        "running": asdict(running) if running else None,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": checkpoint.rng_state(),
        "history": history,
        "best_val_acc": best_val_acc,
        "best_epoch": best_epoch,
        "skipped_images": [list(s) for s in skipped],
        "config": cfg_dict,
    }


def _resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, dict | None]:
    if not run_dir.is_dir():
        raise InputError(f"--resume: run folder not found: {run_dir}",
                         hint="pass the folder `cnnft train` printed as 'run folder: ...' (OUTPUT_DIR/NAME)")
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise InputError(f"--resume: {run_dir} has no config.yaml; is it a cnnft run folder?")
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"{key}: cannot be changed when resuming (only {', '.join(RESUMABLE_KEYS)})")
    cfg = config_mod.load(cfg_file, overrides)
    last = run_dir / "checkpoints" / "last.pt"
    state = checkpoint.load(last) if last.exists() else None
    if state is not None and state["step"] == 0 and state["epoch"] >= cfg.train.epochs:
        done = state["epoch"]
        raise InputError(
            f"train.epochs: the run in {run_dir} has already completed {done} epoch(s)"
            + (f", more than the {cfg.train.epochs} asked for" if done > cfg.train.epochs else ""),
            hint=f"to train longer, resume with a larger total: cnnft train --resume {run_dir} train.epochs={done + 5}")
    return cfg, state


def train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    resume: str | Path | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    progress_bar: bool = False,
) -> dict:
    """Fine-tune a pretrained backbone as the config says; return the run summary.

    resolve config -> build data -> build model -> plan freeze -> fit -> save.
    """
    overrides = list(overrides or [])
    # --- resolve config
    if resume is not None:
        run_dir = Path(resume)
        cfg, state = _resume_config(run_dir, overrides)
    else:
        cfg, state, run_dir = config_mod.load(config_path, overrides), None, None
        _check_writable(cfg.output_dir)
    seed_everything(cfg.seed)
    rt = runtime.make_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
    device = rt.device
    writer = _tensorboard(cfg.train.tensorboard)

    # --- build data
    d = cfg.data
    bundle = data.build_data(d, cfg.seed, log)
    if cfg.model.num_classes is not None and cfg.model.num_classes != len(bundle.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} but the data has "
                          f"{len(bundle.classes)} classes ({', '.join(bundle.classes[:10])}); "
                          f"remove model.num_classes or set it to {len(bundle.classes)}")
    if bundle.skipped:
        log(f"skipping {len(bundle.skipped)} unreadable image(s):")
        for p, why in bundle.skipped:
            log(f"  {p}: {why}")

    # --- build model
    bb = models.build(cfg.model.backbone, cfg.model.weights, len(bundle.classes))
    model = bb.model
    pre = bb.preprocess = bb.preprocess.with_size(d.image_size)  # checkpoints record what was used

    # --- plan freeze
    strategy, why = _resolve_strategy(cfg, len(bundle.train), len(bundle.classes), bb.pretrained)
    if why:
        log(why)
    plan = freeze.make_plan(model, bb.stages, strategy, cfg.train.lr, cfg.train.backbone_lr_scale,
                            pretrained=bb.pretrained, frozen_stages=cfg.freeze.frozen_stages,
                            trainable_stages=cfg.freeze.trainable_stages)
    freeze.apply_plan(model, bb.stages, plan)
    rt.prepare(model)

    # --- loaders, optimiser, schedule
    draft = pre.resize_size
    train_ds = data.ImageDataset(bundle.train, transforms.train_transform(pre, d.augment), draft)
    val_ds = data.ImageDataset(bundle.val, transforms.eval_transform(pre), draft)
    sampler = data.EpochSampler(len(train_ds), cfg.seed, shuffle=True)
    gen = torch.Generator()
    pin = rt.pin_memory
    train_loader = data.make_loader(train_ds, d.batch_size, d.num_workers, sampler=sampler, generator=gen, pin_memory=pin)
    val_loader = data.make_loader(val_ds, d.batch_size, d.num_workers, pin_memory=pin)
    groups = freeze.param_groups(model, bb.stages, plan, cfg.train.weight_decay)
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
    steps_per_epoch = len(train_loader)
    scheduler = None
    if cfg.train.scheduler == "cosine":
        lam = engine.cosine_with_warmup(cfg.train.epochs * steps_per_epoch,
                                        int(round(cfg.train.warmup_epochs * steps_per_epoch)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
    scaler = rt.grad_scaler()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    # --- restore or create the run folder
    start_epoch, start_step, running = 0, 0, None
    history: list[dict] = []
    best_val_acc, best_epoch = -1.0, 0
    if state is not None:
        _check_resumable(state, bb, bundle.classes, plan)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step"]
        running = engine.Running(**state["running"]) if state["running"] else None
        history = state["history"]
        best_val_acc, best_epoch = state["best_val_acc"], state["best_epoch"]
        checkpoint.set_rng_state(state["rng"])
        log(f"resuming {run_dir} after epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))
    if run_dir is None:
        run_dir = make_run_dir(cfg.output_dir, cfg.name)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    if state is not None:  # a killed run may have left a half-written file beside the whole ones
        for leftover in checkpoint.clean_partial_writes(run_dir) + checkpoint.clean_partial_writes(run_dir / "checkpoints"):
            log(f"removed a partial write left by the interrupted run: {leftover.name}")
    cfg_dict = cfg.to_dict()
    checkpoint.atomic_write_text(run_dir / "config.yaml", _yaml(cfg_dict))
    checkpoint.atomic_write_json(run_dir / "freeze_plan.json", {
        **plan.to_dict(), "model": bb.name, "weights": bb.weights, "pretrained": bb.pretrained,
        "num_classes": bb.num_classes, "auto": why})
    log(f"run folder: {run_dir}")
    log(f"{bb.name} ({bb.weights}) -> {len(bundle.classes)} classes, strategy {plan.strategy}: "
        f"{plan.trainable_params:,} of {plan.total_params:,} parameters train; "
        f"{len(bundle.train)} train / {len(bundle.val)} val images; device {device}")

    ck = dict(cfg_dict=cfg_dict, bb=bb, classes=bundle.classes, plan=plan, model=model,
              optimizer=optimizer, scheduler=scheduler, scaler=scaler, skipped=bundle.skipped)
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    t_start = time.perf_counter()
    wall_before = state["history"][-1]["wall_seconds"] if state is not None and state["history"] else 0.0

    # --- fit
    with engine.StopFlag() as stop, _failed_summary(run_dir, history, log):
        for epoch in range(start_epoch, cfg.train.epochs):
            mid = epoch == start_epoch and start_step > 0
            if not mid:
                seed_everything(data.epoch_seed(cfg.seed, epoch))
                running = None
            gen.manual_seed(cfg.seed * 7_919 + epoch * 104_729 + (start_step if mid else 0))
            sampler.set_epoch(epoch, start=(start_step * d.batch_size) if mid else 0)
            model.train()
            loader = _progress(train_loader, epoch, cfg.train.epochs, progress_bar)
            running = engine.train_one_epoch(
                model, loader, optimizer, scheduler, criterion, rt, epoch=epoch + 1,
                running=running, scaler=scaler, grad_clip=cfg.train.grad_clip, stop=stop,
                on_step=getattr(loader, "on_step", None))
            if stop.stopped and running.steps < steps_per_epoch:
                checkpoint.save(_checkpoint(**ck, epoch=epoch, step=running.steps, running=running,
                                            history=history, best_val_acc=best_val_acc, best_epoch=best_epoch), last_path)
                raise _interrupted(stop.signum, run_dir, epoch + 1, running.steps, steps_per_epoch)
            # validation loss is plain cross-entropy: comparable across label_smoothing values and
            # equal to what `cnnft evaluate` reports
            ev = engine.evaluate(model, val_loader, rt, criterion=nn.CrossEntropyLoss())
            row = {
                "epoch": epoch + 1,
                "lr_head": _group_lr(optimizer, "head") or _group_lr(optimizer, "head_no_decay"),
                "lr_backbone": _group_lr(optimizer, "backbone") or _group_lr(optimizer, "backbone_no_decay"),
                "train_loss": running.loss, "train_acc": running.acc,
                "val_loss": ev.loss, "val_acc": ev.acc,
                "epoch_seconds": round(running.seconds + ev.seconds, 3),
                "images_per_second": round(running.seen / max(running.seconds, 1e-9), 1),
                "wall_seconds": round(wall_before + time.perf_counter() - t_start, 3),
            }
            history.append(row)
            improved = ev.acc > best_val_acc
            if improved:
                best_val_acc, best_epoch = ev.acc, epoch + 1
            ckpt = _checkpoint(**ck, epoch=epoch + 1, step=0, running=None, history=history,
                               best_val_acc=best_val_acc, best_epoch=best_epoch)
            metrics.write_csv(run_dir / "metrics.csv", history, metrics.EPOCH_COLUMNS)
            if improved:  # the same bytes: link rather than write them twice. best first: a kill
                checkpoint.save(ckpt, best_path)  # in between leaves last.pt one epoch behind, and the
                checkpoint.atomic_link(best_path, last_path)  # resumed run redoes it (never a stale best)
            else:
                checkpoint.save(ckpt, last_path)
            if writer is not None:
                writer(run_dir, row)
            log(f"epoch {epoch + 1}/{cfg.train.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f"  |  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}{'  *' if improved else ''}"
                f"  |  {row['epoch_seconds']:.1f}s, {row['images_per_second']:.0f} img/s")
            if stop.stopped:
                raise _interrupted(stop.signum, run_dir, epoch + 1, 0, steps_per_epoch)
            start_step = 0

    summary = _summary(run_dir, history, best_val_acc, best_epoch, plan, bb, bundle, device, wall_before, t_start)
    checkpoint.atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _summary(run_dir, history, best_val_acc, best_epoch, plan, bb, bundle, device, wall_before, t_start) -> dict:
    return {
        "status": "completed",
        "run_dir": str(run_dir),
        "best_val_acc": best_val_acc,
        "best_epoch": best_epoch,
        "final_val_acc": history[-1]["val_acc"] if history else None,
        "final_val_loss": history[-1]["val_loss"] if history else None,
        "epochs_completed": len(history),
        "wall_seconds": round(history[-1]["wall_seconds"] if history else wall_before + time.perf_counter() - t_start, 3),
        "checkpoints": {"best": str(run_dir / "checkpoints" / "best.pt"),
                        "last": str(run_dir / "checkpoints" / "last.pt")},
        "model": bb.name,
        "weights": bb.weights,
        "strategy": plan.strategy,
        "trainable_params": plan.trainable_params,
        "total_params": plan.total_params,
        "classes": bundle.classes,
        "train_images": len(bundle.train),
        "val_images": len(bundle.val),
        "skipped_images": len(bundle.skipped),
        "skipped": [{"path": p, "reason": r} for p, r in bundle.skipped],
        "device": str(device),
    }


@contextlib.contextmanager
def _failed_summary(run_dir: Path, history: list[dict], log: Callable[[str], None]) -> Iterator[None]:
    """A run that dies of an error (NaN loss, a bug) says so in summary.json; what it saved
    (metrics.csv, best.pt, last.pt of the last finished epoch) is kept."""
    try:
        yield
    except Interrupted:
        raise
    except Exception as exc:
        best = max(history, key=lambda r: r["val_acc"]) if history else None  # first of equals, as in fit
        ckdir = run_dir / "checkpoints"
        summary = {
            "status": "failed",
            "error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}",
            "hint": getattr(exc, "hint", None),
            "run_dir": str(run_dir),
            "best_val_acc": best["val_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_val_acc": history[-1]["val_acc"] if history else None,
            "epochs_completed": len(history),
            "wall_seconds": history[-1]["wall_seconds"] if history else None,
            "checkpoints": {k: str(ckdir / f"{k}.pt") for k in ("best", "last") if (ckdir / f"{k}.pt").exists()},
        }
        with contextlib.suppress(OSError):  # the original error matters more
            checkpoint.atomic_write_json(run_dir / "summary.json", summary)
            n = len(history)
            kept = f"; metrics.csv and checkpoints of epoch{'s 1-' if n > 1 else ' '}{n} are kept" if n else ""
            log(f"run marked failed in {run_dir / 'summary.json'}{kept}")
        raise


def _check_resumable(state: dict, bb: models.Backbone, classes: list[str], plan: freeze.FreezePlan) -> None:
    if state["model_name"] != bb.name or state["classes"] != list(classes):
        raise CheckpointError(
            f"the run's checkpoint is for {state['model_name']} with classes {state['classes'][:5]}..., "
            f"but the config now gives {bb.name} with {list(classes)[:5]}...",
            hint="resume with the same data and model, or start a new run")
    if state["freeze_plan"]["strategy"] != plan.strategy:
        raise CheckpointError(f"the run used strategy {state['freeze_plan']['strategy']}, the config now gives {plan.strategy}")


def _interrupted(signum: int, run_dir: Path, epoch: int, step: int, steps: int) -> Interrupted:
    import signal as _signal

    name = _signal.Signals(signum).name
    where = f"epoch {epoch}, step {step}/{steps}" if step else f"the end of epoch {epoch}"
    return Interrupted(f"stopped by {name} at {where}; checkpoint saved in {run_dir / 'checkpoints' / 'last.pt'}",
                       signum=signum, hint=f"resume with: cnnft train --resume {run_dir}")


def _progress(loader, epoch: int, epochs: int, enabled: bool):
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
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - missing optional dependency
        raise InputError("train.tensorboard: the tensorboard package is not installed",
                         hint="pip install 'cnnft[tensorboard]', or set train.tensorboard=false") from None
    writers: dict = {}

    def write(run_dir: Path, row: dict) -> None:
        w = writers.get(run_dir)
        if w is None:  # one event file per process, opened on the first epoch
            w = writers[run_dir] = SummaryWriter(str(run_dir / "tensorboard"))
        for key, tag in TENSORBOARD_TAGS.items():
            if row.get(key) is not None:
                w.add_scalar(tag, row[key], row["epoch"])
        w.flush()

    return write


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)

"""The run folder of a training run: creating or resuming it, what it must hold, how it ends.

A new run never reuses a folder (``name-2``, ``name-3``...); ``--resume`` continues one and
may change only the keys in RESUMABLE_KEYS. A run that fails or is stopped says so, and
keeps what it had saved.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .. import config as config_mod
from .. import files, models
from ..config import Config
from ..data.fingerprint import changes, fingerprint
from ..data.folders import DataBundle
from ..errors import CheckpointError, ConfigError, DataError, InputError, Interrupted
from ..files import check_writable
from ..results.rundir import RunDir
from ..training.freeze import FreezePlan
from . import checkpoint, lock

# keys that may change when a run is resumed; everything else defines the run
RESUMABLE_KEYS = ("train.epochs", "train.device", "data.num_workers", "train.tensorboard", "train.log_to",
                  "train.mlflow_uri", "train.log_checkpoint", "train.time_budget")


def resolve(config_path: str | Path | None, overrides: list[str],
            resume: str | Path | None) -> tuple[Config, dict | None]:
    """The run's config and, when resuming, its last checkpoint (None: a new run, whose
    output folder is checked before any work)."""
    if resume is not None:
        return resume_config(Path(resume), overrides)
    cfg = config_mod.load(config_path, overrides)
    check_writable(cfg.output_dir)
    return cfg, None


def resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, dict | None]:
    """The config saved in ``run_dir`` with the allowed overrides, and its last checkpoint."""
    if not run_dir.is_dir():
        raise InputError(f"--resume: run folder not found: {run_dir}",
                         hint="pass the folder `cnnft train` printed as 'run folder: ...' (OUTPUT_DIR/NAME)")
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise InputError(f"--resume: {run_dir} has no config.yaml; is it a cnnft run folder?")
    lock.acquire(run_dir, "train")  # before anything is read: a second writer is refused here
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"{key}: cannot be changed when resuming (only {', '.join(RESUMABLE_KEYS)})")
    cfg = config_mod.load(run.config, overrides)
    if not run.last.exists():
        _check_nothing_trained(run)
        return cfg, None  # killed before its first checkpoint: the run starts over in its folder
    state = checkpoint.load(run.last)
    _check_config_unchanged(run, cfg, state)
    if state["step"] == 0 and state["epoch"] >= cfg.train.epochs and _finished(run):
        done = state["epoch"]
        raise InputError(
            f"train.epochs: the run in {run_dir} has already completed {done} epoch(s)"
            + (f", more than the {cfg.train.epochs} asked for" if done > cfg.train.epochs else ""),
            hint=f"to train longer, resume with a larger total: cnnft train --resume {run_dir} train.epochs={done + 5}")
    return cfg, state


def _finished(run: RunDir) -> bool:
    """Whether the run wrote its closing summary. A run killed after its last epoch's checkpoint
    but before that (while calibrating or testing best.pt) is resumed to finish those steps."""
    try:
        status = json.loads(run.summary.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return False
    return status in ("completed", "stopped")


def _check_nothing_trained(run: RunDir) -> None:
    """A run folder without last.pt may start over only if no epoch of it was ever recorded:
    starting over would replace its best.pt and metrics.csv."""
    found = [p for p in (run.metrics, run.best) if p.exists()]
    if run.checkpoints.is_dir():
        found += [p for p in sorted(run.checkpoints.iterdir())
                  if p.suffix == ".pt" and not p.name.startswith(".") and p != run.best]
    if found:
        raise InputError(
            f"--resume: {run} has no checkpoints/last.pt, so there is nothing to resume from, but it holds "
            f"{', '.join(str(p.relative_to(run.root)) for p in found)} of earlier training; starting over "
            "would overwrite them",
            hint=f"start a new run from its config instead (it gets a new folder): cnnft train {run.config}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_config_unchanged(run: RunDir, cfg: Config, state: dict) -> None:
    """Refuse a run whose config.yaml was edited since its checkpoint was written (only
    RESUMABLE_KEYS may change): the checkpoint was trained under the config it stores."""
    saved = _flat(config_mod.validate(state["config"], source=str(run.last)).to_dict())
    now = _flat(cfg.to_dict())
    changed = [k for k in sorted(saved.keys() | now.keys())
               if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k)]
    if changed:
        err = ConfigError([f"{k}: {now.get(k)!r} in config.yaml but {saved.get(k)!r} in the checkpoint; "
                           f"cannot be changed when resuming (only {', '.join(RESUMABLE_KEYS)})" for k in changed],
                          source=str(run.config))
        err.hint = (f"restore {', '.join(changed)} in {run.config}, or start a new run with the edited config "
                    f"(it gets a new folder): cnnft train {run.config}")
        raise err


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
            RunDir(cand).checkpoints.mkdir()
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


def open_run_dir(cfg: Config, resume: str | Path | None, freeze_plan: dict,
                 log: Callable[[str], None]) -> RunDir:
    """The run folder, new or resumed, holding the resolved config and the freeze plan."""
    if resume is None:
        run = RunDir(make_run_dir(cfg.output_dir, cfg.name))
        lock.acquire(run.root, "train")
        try:  # a disk full from the start leaves no folder that --resume would call "not a run folder"
            _write_start(run, cfg, freeze_plan)
        except BaseException:
            lock.release(run.root)
            shutil.rmtree(run.root, ignore_errors=True)
            raise
    else:
        run = RunDir(resume)
        run.checkpoints.mkdir(exist_ok=True)
        # a killed run may have left a half-written file beside the whole ones
        for leftover in files.clean_partial_writes(run.root) + files.clean_partial_writes(run.checkpoints):
            log(f"removed a partial write left by the interrupted run: {leftover.name}")
        _write_start(run, cfg, freeze_plan)
    log(f"run folder: {run}")
    return run


def _write_start(run: RunDir, cfg: Config, freeze_plan: dict) -> None:
    files.atomic_write_text(run.config, _yaml(cfg.to_dict()))
    files.atomic_write_json(run.freeze_plan, freeze_plan)


def check_resumable(state: dict, bb: models.Backbone, bundle: DataBundle, plan: FreezePlan) -> None:
    """Refuse to continue a checkpoint with another model, other classes, other images or
    another strategy."""
    classes = bundle.classes
    if state["model_name"] != bb.name or state["classes"] != list(classes):
        raise CheckpointError(
            f"the run's checkpoint is for {state['model_name']} with classes {state['classes'][:5]}..., "
            f"but the config now gives {bb.name} with {list(classes)[:5]}...",
            hint="resume with the same data and model, or start a new run")
    if state["freeze_plan"]["strategy"] != plan.strategy:
        raise CheckpointError(f"the run used strategy {state['freeze_plan']['strategy']}, the config now gives {plan.strategy}")
    if isinstance(state.get("data"), dict):  # absent in checkpoints written before it was recorded
        changed = changes(state["data"], fingerprint(classes, bundle.train, bundle.val), classes)
        if changed:
            raise DataError(
                f"--resume: the images are not the ones this run was trained on: {changed}; going on would "
                "re-split train and val and continue as if nothing had changed",
                hint="put the run's images back as they were, or start a new run on the data as it is now "
                     "(it gets a new folder): cnnft train RUN/config.yaml")


@contextlib.contextmanager
def failed_summary(run: RunDir, history: list[dict], log: Callable[[str], None], *,
                   write: bool = True) -> Iterator[None]:
    """A run that dies of an error (NaN loss, a bug) says so in summary.json; what it saved
    (metrics.csv, best.pt, last.pt of the last finished epoch) is kept. ``write=False``: a
    process that does not own the run folder (rank > 0) leaves it alone."""
    try:
        yield
    except Interrupted:
        raise
    except Exception as exc:
        if not write:
            raise
        best = max(history, key=lambda r: r["val_acc"]) if history else None  # first of equals, as in fit
        kept = {"best": run.best, "last": run.last}
        summary = {
            "status": "failed",
            "error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}",
            "hint": getattr(exc, "hint", None),
            "run_dir": str(run),
            "best_val_acc": best["val_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_val_acc": history[-1]["val_acc"] if history else None,
            "epochs_completed": history[-1]["epoch"] if history else 0,  # the head phase is epoch 0
            "wall_seconds": history[-1]["wall_seconds"] if history else None,
            "checkpoints": {k: str(p) for k, p in kept.items() if p.exists()},
        }
        with contextlib.suppress(OSError):  # the original error matters more
            files.atomic_write_json(run.summary, summary)
            n = history[-1]["epoch"] if history else 0
            saved = f"; metrics.csv and checkpoints of epoch{'s 1-' if n > 1 else ' '}{n} are kept" if n else ""
            log(f"run marked failed in {run.summary}{saved}")
        raise


def interrupted(signum: int, run: RunDir, epoch: int, step: int, steps: int) -> Interrupted:
    """The error that ends a run stopped by a signal: where it stopped and how to resume."""
    name = signal.Signals(signum).name
    where = f"epoch {epoch}, step {step}/{steps}" if step else f"the end of epoch {epoch}"
    return Interrupted(f"stopped by {name} at {where}; checkpoint saved in {run.last}",
                       signum=signum, hint=f"resume with: cnnft train --resume {run}")


@dataclass
class OnDisk:
    """What a run has saved so far: its folder (None until there is one) and the (epoch, step)
    of the checkpoint in its last.pt (None: none yet); what a Ctrl-C that cannot wait reports."""

    run: RunDir | None = None
    last: tuple[int, int] | None = None


@contextlib.contextmanager
def on_ctrl_c(rerun: str) -> Iterator[OnDisk]:
    """Turn a KeyboardInterrupt (a Ctrl-C before training starts, or a second one during it, which
    does not wait for a checkpoint) into an :class:`Interrupted` that says what was saved and how
    to go on. ``rerun``: the command that starts the run again while nothing is saved."""
    disk = OnDisk()
    try:
        with lock.scope(), _sigterm_as_interrupt():  # the run folder's lock lives as long as the run
            yield disk
    except _Terminated:
        raise ctrl_c(disk, rerun, signal.SIGTERM) from None
    except KeyboardInterrupt:
        raise ctrl_c(disk, rerun) from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (whose stop flag saves first): stops like a Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum, _frame) -> None:
        raise _Terminated

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def ctrl_c(disk: OnDisk, rerun: str, signum: int = signal.SIGINT) -> Interrupted:
    """The error of a run cut short by Ctrl-C (or SIGTERM), given what it has on disk."""
    how = "interrupted by Ctrl-C" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if disk.run is None:
        return Interrupted(f"{how} before training started: nothing was saved",
                           signum=signum, hint=f"start it again: {rerun}")
    if disk.last is None:
        return Interrupted(f"{how} before the run's first checkpoint: {disk.run} holds nothing "
                           "to resume from", signum=signum,
                           hint=f"start it over in the same folder: cnnft train --resume {disk.run}")
    epoch, step = disk.last
    at = (f"epoch {epoch + 1}, step {step}" if step else
          "the end of the head phase" if epoch == 0 else f"the end of epoch {epoch}")
    return Interrupted(f"{how}; the last checkpoint saved is {disk.run.last}, from {at}",
                       signum=signum, hint=f"resume with: cnnft train --resume {disk.run}")


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)

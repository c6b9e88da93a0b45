"""Training in several processes (``torchrun``): DistributedDataParallel over torch.distributed.

One process per device: NCCL between CUDA devices (each process takes ``cuda:LOCAL_RANK``),
gloo between CPU processes. ``data.batch_size`` is per process, so the global batch is
``batch_size x WORLD_SIZE``.

What the training recipe needs, in one object (:class:`Dist`), so that a single process
runs exactly the code it always ran (``Dist`` of one process changes nothing):

- data: each epoch's seeded permutation (:class:`~cnnft.data.folders.EpochSampler`) split into
  per-process shards (:class:`ShardedSampler`): the processes together see every sample
  once per epoch, with no padding; validation is sharded the same way without dropping.
- metrics: training sums (loss x n, correct, n) and validation probabilities are reduced
  across processes, so they equal what one process would compute over the whole set.
- files: only rank 0 writes the run folder and logs; checkpoints hold the unwrapped model.
- stopping: a signal seen by any process stops all of them at the same step.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import folders as data
from ..errors import InputError

SAMPLE_LOG_ENV = "CNNFT_SAMPLE_LOG"  # a folder: each process appends the indices it trains on per epoch


def launched() -> bool:
    """True in a process started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """The process that writes files and prints results: rank 0, or the only one."""
    return rank() == 0


def world_size() -> int:
    """How many processes train together (1 outside a distributed launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


# ------------------------------------------------------------------------------ launching

def torchrun_command(nproc: int, cnnft_args: Sequence[str]) -> list[str]:
    """The command that runs ``cnnft <cnnft_args>`` in ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "cnnft.training.launcher", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cnnft", *cnnft_args]


def launch(nproc: int, cnnft_args: Sequence[str]) -> int:
    """Run ``cnnft <cnnft_args>`` under torchrun with ``nproc`` processes; its exit code.

    Ctrl-C and SIGTERM reach torchrun once, from here (it runs in its own session, out of
    the terminal's reach), and torchrun hands them to every process, which stop together
    and save; the exit code is then 130 / 143, as for a single process."""
    proc = subprocess.Popen(torchrun_command(nproc, cnnft_args), start_new_session=True)
    got: list[int] = []

    def forward(signum, _frame) -> None:
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + got[0] if got and code != 0 else code


# --------------------------------------------------------------------------------- samplers

def trained_count(n: int, world: int, batch_size: int) -> int:
    """How many of an epoch's ``n`` samples are trained on: all of them, except a last global
    batch too small to give every process ``min(batch_size, 2)`` samples (BatchNorm cannot
    train on one sample, DDP cannot step with a process that has none). With one process
    this is the single-process rule: a lone last sample waits for the next epoch."""
    per_step = batch_size * world
    tail = n % per_step
    return n - tail if 0 < tail < world * min(batch_size, 2) else n


class ShardedSampler(data.EpochSampler):
    """Rank ``rank``'s share of an :class:`~cnnft.data.folders.EpochSampler` permutation: every
    ``world``-th index of it, so that step k of all processes together covers the global
    batch ``perm[k*B*world:(k+1)*B*world]``. Every process gets the same number of batches.
    ``start`` (set_epoch) counts samples of this shard, i.e. ``step * batch_size`` as in one
    process. ``drop_tail=False`` (validation) keeps every sample; shards may then differ by one."""

    def __init__(self, n: int, seed: int, shuffle: bool, *, rank: int, world: int, batch_size: int,
                 drop_tail: bool = True, weights: torch.Tensor | None = None) -> None:
        super().__init__(n, seed, shuffle, weights)
        self.rank, self.world, self.batch_size, self.drop_tail = rank, world, batch_size, drop_tail

    def _shard(self) -> list[int]:
        order = self._order()
        if self.drop_tail:
            order = order[:trained_count(self.n, self.world, self.batch_size)]
        return order[self.rank::self.world]

    def __iter__(self):
        shard = self._shard()[self.start:]
        folder = os.environ.get(SAMPLE_LOG_ENV)
        if folder and self.drop_tail:
            with open(Path(folder) / f"rank{self.rank}.txt", "a") as f:
                f.write(f"{self.epoch} {' '.join(map(str, shard))}\n")
        return iter(shard)

    def __len__(self) -> int:
        kept = trained_count(self.n, self.world, self.batch_size) if self.drop_tail else self.n
        return len(range(self.rank, kept, self.world)) - self.start


# ----------------------------------------------------------------------------- the runtime

@dataclass(frozen=True)
class Dist:
    """This process's place in a run: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- setup ------------------------------------------------------------------------

    def device(self, spec: str) -> str:
        """The device this process trains on: ``cuda:LOCAL_RANK`` when ``train.device`` is
        auto/cuda and CUDA is present, else the spec itself."""
        if not self.active:
            return spec
        if spec.startswith("cuda:"):
            raise InputError(f"train.device: {spec} names one GPU, but torchrun started {self.world} processes",
                             hint="use train.device=cuda (or auto): each process takes cuda:LOCAL_RANK")
        if spec in ("auto", "cuda") and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise InputError(f"LOCAL_RANK {self.local_rank} but this machine has {torch.cuda.device_count()} GPU(s)",
                                 hint="start at most one process per GPU (torchrun --nproc_per_node)")
            return f"cuda:{self.local_rank}"
        return spec

    def quiet(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0; a function that drops the message elsewhere."""
        return log if self.is_main else (lambda _m: None)

    def sampler(self, n: int, seed: int, batch_size: int, weights: torch.Tensor | None = None) -> data.EpochSampler:
        """The training sampler: the epoch's permutation (or balanced draw), this process's shard of it."""
        if not self.active:
            return data.EpochSampler(n, seed, shuffle=True, weights=weights)
        return ShardedSampler(n, seed, True, rank=self.rank, world=self.world, batch_size=batch_size, weights=weights)

    def eval_indices(self, n: int) -> range:
        """This process's validation samples (every sample exactly once over all processes)."""
        return range(self.rank, n, self.world)

    def wrap(self, module: nn.Module, device: torch.device, sync_bn: bool, log: Callable[[str], None]) -> nn.Module:
        """``module`` as DistributedDataParallel (trainable BatchNorm synchronised when
        ``sync_bn``); unchanged in a single process. The parameters stay those of ``module``,
        so checkpoints of the unwrapped model and the optimizer are unaffected."""
        if not self.active:
            return module
        if sync_bn:
            if device.type == "cuda":
                n = convert_trainable_batchnorm(module)
                log(f"train.sync_bn: {n} trainable BatchNorm layer(s) normalise over the global batch")
            else:
                log("train.sync_bn: SyncBatchNorm needs CUDA; on the CPU BatchNorm statistics stay per process")
        if not any(p.requires_grad for p in module.parameters()):
            return module  # nothing to synchronise
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=device.index if ids else None)

    def main_first(self, fn: Callable, *args, **kwargs):
        """``fn(...)`` run by rank 0 while the others wait, then by the others: rank 0 fills a
        shared cache (stored activations) that the others then read instead of recomputing."""
        if not self.active:
            return fn(*args, **kwargs)
        if self.is_main:
            out = fn(*args, **kwargs)
        torch.distributed.barrier()
        if not self.is_main:
            out = fn(*args, **kwargs)
        return out

    def run_dir(self, fn: Callable, *args, **kwargs):
        """The run folder, created (or reopened) by rank 0 alone; the others get its path."""
        from ..results.rundir import RunDir

        if not self.active:
            return fn(*args, **kwargs)
        path = [str(fn(*args, **kwargs)) if self.is_main else None]
        torch.distributed.broadcast_object_list(path, src=0)
        return RunDir(path[0])

    def from_main(self, value):
        """Rank 0's ``value`` in every process (a picklable object); ``value`` in a single one."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def header(self) -> dict:
        """What a checkpoint records of the launch: the process count (only when several; a
        single-process checkpoint stays as it was)."""
        return {"world_size": self.world} if self.active else {}

    def check_resumable(self, resumed: dict | None) -> None:
        """Refuse to continue a checkpoint with another number of processes: the steps per
        epoch, the position in a stopped epoch and the learning-rate schedule depend on it."""
        if resumed is None:
            return
        before = resumed.get("world_size", 1)  # absent: written by a single process
        if before != self.world:
            how = f"--nproc {before}" if before > 1 else "without torchrun (or --nproc)"
            raise InputError(f"--resume: the run trained in {before} process(es), this launch has {self.world}",
                             hint=f"resume it the way it started: cnnft train --resume RUN_DIR {how}")

    # -- the loop ---------------------------------------------------------------------

    def stop_flag(self, flag):
        """A stop flag all processes agree on (see :class:`_AgreedStop`)."""
        return _AgreedStop(flag, self._device) if self.active else flag

    def own_share(self, state):
        """A resumed state whose running sums (saved summed over processes) count once:
        rank 0 keeps them, the others start from zero and add their own."""
        if self.active and not self.is_main and state.running is not None:
            state.running = replace(state.running, loss_sum=0.0, correct=0, seen=0)
        return state

    def sum_running(self, running):
        """Training sums over all processes (loss x n, correct and seen added; the slowest
        process's seconds; steps are the same everywhere)."""
        if not self.active:
            return running
        t = torch.tensor([running.loss_sum, running.correct, running.seen], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(t)
        s = torch.tensor([running.seconds], dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.MAX)
        return replace(running, loss_sum=float(t[0]), correct=int(round(float(t[1]))), seen=int(round(float(t[2]))),
                       seconds=float(s[0]))

    def evaluate(self, model: nn.Module, loader, rt, *, criterion: nn.Module | None = None):
        """:func:`cnnft.training.engine.evaluate` over the whole validation set: each process scores its
        shard (with the plain module: DDP's forward would sync buffers and needs equal shards)
        and the results are gathered in sample order."""
        from . import engine

        if not self.active:
            return engine.evaluate(model, loader, rt, criterion=criterion)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        ev = engine.evaluate(inner, loader, rt, criterion=criterion)
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, (ev.loss * len(ev.labels), ev.probs, ev.labels, ev.seconds))
        n = sum(len(p[2]) for p in parts)
        classes = max((p[1].shape[1] for p in parts if len(p[2])), default=0)
        probs = torch.zeros(n, classes)
        labels = torch.zeros(n, dtype=torch.long)
        for r, (_, p, y, _) in enumerate(parts):  # shard r holds samples r, r + world, ...
            if len(y):
                probs[r::self.world] = p
                labels[r::self.world] = y
        loss = sum(p[0] for p in parts) / max(n, 1)
        acc = float((probs.argmax(1) == labels).sum()) / n if n else 0.0
        return engine.EvalResult(loss, acc, max(p[3] for p in parts), probs, labels)

    @property
    def _device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class _AgreedStop:
    """A :class:`~cnnft.training.engine.StopFlag` whose ``stopped`` is true in every process as soon as
    it is in one (a collective: all processes ask it at the same points, which the loop does).
    torchrun passes a signal to all processes, but each gets it at its own step; one that
    stopped alone would leave the others waiting for it forever."""

    def __init__(self, flag, device: torch.device) -> None:
        self.flag, self.device = flag, device

    def __enter__(self):
        self.flag.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.flag.__exit__(*exc)

    @property
    def signum(self) -> int | None:
        return self.flag.signum

    @property
    def expired(self) -> bool:
        return False  # train.time_budget is refused under torchrun: no deadline here

    @property
    def stopped(self) -> bool:
        t = torch.tensor([self.flag.signum or 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if t.item() and self.flag.signum is None:
            self.flag.signum = int(t.item())
        return bool(t.item())


def convert_trainable_batchnorm(module: nn.Module) -> int:
    """Replace each BatchNorm that trains (not pinned to eval mode by the freeze plan) with a
    SyncBatchNorm sharing its parameters and statistics; returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not getattr(child, "_cnnft_pinned", False):
            sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
            count += 1
        else:
            count += convert_trainable_batchnorm(child)
    return count


def setup(device_spec: str) -> Dist:
    """Join the process group torchrun describes (NCCL for CUDA, gloo otherwise); a
    single-process ``Dist`` when not launched. The group is left at exit."""
    if not launched():
        return Dist()
    r, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    d = Dist(r, world, local)
    spec = d.device(device_spec)
    cuda = spec.startswith("cuda:")
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(spec))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_leave)
    return d


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["Dist", "ShardedSampler", "setup", "launch", "torchrun_command", "launched", "rank", "world_size",
           "is_main_process", "trained_count", "convert_trainable_batchnorm", "SAMPLE_LOG_ENV"]

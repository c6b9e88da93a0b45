"""The learning-rate range test (L. Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017, section 3.3; fastai's ``Learner.lr_find``).

From the current weights, train for ``steps`` batches while the learning rate grows
geometrically from ``start_lr`` to ``end_lr`` (the loader is cycled when it is shorter),
recording the training loss smoothed by a bias-corrected exponential moving average; stop
once the smoothed loss exceeds ``DIVERGE`` times the best so far (or is no longer finite).
Every parameter group follows the sweep in proportion: the largest rate (the head's) is the
one swept and recorded, pretrained stages keep their ``backbone_lr_scale`` below it.
Afterwards the model's weights and buffers, the optimizer's state, the grad scaler's and
torch's random generators are as they were: the test leaves no trace.

The suggestion is fastai's default rule, ``valley`` (fastai/callback/schedule.py, fastai
>= 2.5): the rate halfway along the longest valley of the curve, where the valley is the
longest decreasing subsequence of the smoothed losses. It sits where the loss still falls
steadily, well before the minimum (whose rate is already too high to train at), and
a longest *subsequence* is not cut short by the small bumps a noisy curve has. As fastai
does, the first tenth of the steps and the last five (where it diverged) are left out;
a curve with no real valley (one that falls by less than ``FLAT_DROP`` of the loss, or by
no more than its own noise) gets the caller's fallback, and every suggestion is clipped to ``SANE_RANGE`` and to the swept range.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import TrainingFailed
from .engine import train_one_epoch
from .runtime import Runtime

START_LR, END_LR, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.98  # weight of the past in the moving average (fastai's beta)
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times the best one
SANE_RANGE = (1e-6, 1.0)  # no suggestion outside it, whatever the curve
FLAT_DROP = 0.02  # a valley must lower the loss by at least this fraction to count
TAIL = 5  # last points left out of the suggestion (the divergence)


@dataclass(frozen=True)
class RangeTest:
    """The swept rates (the head's), the smoothed loss after each step, and the suggestion."""

    lrs: list[float]
    losses: list[float]
    suggested_lr: float
    reason: str  # how the suggestion was chosen
    diverged: bool = False  # stopped early: the loss exploded


def sweep_rates(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` rates from ``start_lr`` to ``end_lr``, each the same factor above the last."""
    if steps < 2 or not 0 < start_lr < end_lr:
        raise ValueError(f"a sweep needs steps >= 2 and 0 < start_lr < end_lr (got {steps}, {start_lr}, {end_lr})")
    q = (end_lr / start_lr) ** (1 / (steps - 1))
    return [start_lr * q**i for i in range(steps)]


def range_test(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               rt: Runtime, *, fallback: float, steps: int = STEPS, start_lr: float = START_LR,
               end_lr: float = END_LR, scaler: torch.amp.GradScaler | None = None,
               grad_clip: float | None = None, new_pass: Callable[[int], None] | None = None) -> RangeTest:
    """Sweep the learning rate of ``optimizer`` over batches of ``loader`` (cycled;
    ``new_pass(k)`` is called before pass ``k`` so the caller can reshuffle it) and suggest a
    rate; ``fallback`` is suggested when the curve has no valley. The model, optimizer and
    scaler are restored afterwards."""
    rates = sweep_rates(start_lr, end_lr, steps)
    if not optimizer.param_groups or not any(g["params"] for g in optimizer.param_groups):
        raise ValueError("the optimizer has no parameters to train: nothing to sweep")
    saved = _Saved.of(model, optimizer, scaler)
    devices = [rt.device.index or 0] if rt.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            rec, schedule = _Recorder(rates), _Schedule(optimizer, rates)
            model.train()
            try:
                train_one_epoch(model, _cycled(loader, new_pass), optimizer, schedule, criterion, rt, epoch=1,
                                scaler=scaler, grad_clip=grad_clip, stop=rec, on_step=rec)
            except TrainingFailed:  # the loss was no longer finite: the end of the sweep
                rec.diverged = True
    finally:
        saved.restore(model, optimizer, scaler)
    lrs = rates[:len(rec.losses)]
    lr, reason = suggest_lr(lrs, rec.losses, fallback=fallback)
    return RangeTest(lrs, rec.losses, lr, reason, rec.diverged)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], *, fallback: float) -> tuple[float, str]:
    """fastai's ``valley`` suggestion for a range test's (rate, smoothed loss) curve, and how
    it was found; ``fallback`` (clipped likewise) when the curve has no valley."""
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} rates but {len(losses)} losses")
    lo, hi = (max(SANE_RANGE[0], min(lrs)), min(SANE_RANGE[1], max(lrs))) if lrs else SANE_RANGE
    if lo > hi:  # the sweep ended outside the sane range: keep to what was swept
        lo, hi = min(lrs), max(lrs)
    first = len(lrs) // 10
    if len(lrs) - first - TAIL >= 5:  # drop the start and the divergence, as fastai does, when enough is left
        lrs, losses = lrs[first:len(lrs) - TAIL], losses[first:len(losses) - TAIL]
    finite = [(lr, x) for lr, x in zip(lrs, losses) if math.isfinite(x)]
    start, end = _longest_valley([x for _, x in finite])
    if end - start < 1 or not _falls([x for _, x in finite], start, end):
        return _clip(fallback, lo, hi), (f"no valley in the loss curve (it fell by less than {FLAT_DROP:.0%} "
                                         "or within its noise): the fallback rate")
    mid = start + (end - start) // 2
    lr = _clip(finite[mid][0], lo, hi)
    return lr, (f"valley: halfway along the longest stretch of falling loss, "
                f"{finite[start][0]:.2g} to {finite[end][0]:.2g}")


def _longest_valley(losses: Sequence[float]) -> tuple[int, int]:
    """First and last index of the longest strictly decreasing subsequence (the first found
    of equal length); (0, 0) for an empty or never-falling curve."""
    n = len(losses)
    if n == 0:
        return 0, 0
    length, begin = [1] * n, list(range(n))  # per end point: the longest run ending there, its first index
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], begin[i] = length[j] + 1, begin[j]
    end = max(range(n), key=lambda i: (length[i], -i))
    return begin[end], end


def _falls(curve: Sequence[float], start: int, end: int) -> bool:
    """Whether the stretch ``start..end`` of the curve really falls: its last third lies below
    its first third, on average, by ``FLAT_DROP`` of the loss and by three standard errors of
    the curve's noise (von Neumann's estimate from the steps between neighbours over the whole
    curve, which a trend only inflates). A longest decreasing subsequence threads the noise of
    a flat curve from a high point to a low one; leaving those two end points out, the rest of
    the noise averages out, and a real fall does not."""
    stretch = curve[start + 1:end]
    k = max(1, len(stretch) // 3)
    if len(stretch) < 2:
        return False
    head, tail = statistics.fmean(stretch[:k]), statistics.fmean(stretch[-k:])
    steps = [b - a for a, b in zip(curve, curve[1:])]
    noise = math.sqrt(statistics.fmean([d * d for d in steps]) / 2)
    return head - tail > max(FLAT_DROP * abs(head), 3 * noise * math.sqrt(2 / k))


def _clip(lr: float, lo: float, hi: float) -> float:
    return min(max(lr, lo), hi)


def _cycled(loader: Iterable, new_pass: Callable[[int], None] | None) -> Iterator:
    """The loader's batches, pass after pass (an empty loader ends it)."""
    k = 0
    while True:
        if new_pass is not None:
            new_pass(k)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
        k += 1


class _Schedule:
    """Sets every group's rate for the next step: ``rates[step]`` times the group's share of
    the largest rate (a scheduler as :func:`train_one_epoch` steps it; the first rate is set
    when it is made)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rates: list[float]) -> None:
        top = max(g["lr"] for g in optimizer.param_groups)
        self.optimizer, self.rates, self.step_count = optimizer, rates, 0
        self.shares = [g["lr"] / top for g in optimizer.param_groups]
        self._set(0)

    def step(self) -> None:
        self.step_count += 1
        self._set(min(self.step_count, len(self.rates) - 1))

    def _set(self, i: int) -> None:
        for g, share in zip(self.optimizer.param_groups, self.shares):
            g["lr"] = self.rates[i] * share


@dataclass
class _Recorder:
    """Per step (``on_step`` of :func:`train_one_epoch`): the batch's loss into the smoothed
    curve; ``stopped`` (read as the loop's stop flag) once the sweep is over."""

    rates: list[float]
    losses: list[float] = field(default_factory=list)
    diverged: bool = False
    stopped: bool = False
    _avg: float = 0.0
    _best: float = math.inf
    _sum: float = 0.0
    _seen: int = 0

    def __call__(self, running) -> None:
        n = running.seen - self._seen
        loss = (running.loss_sum - self._sum) / max(n, 1)
        self._sum, self._seen = running.loss_sum, running.seen
        self._avg = SMOOTHING * self._avg + (1 - SMOOTHING) * loss
        smoothed = self._avg / (1 - SMOOTHING ** (len(self.losses) + 1))
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if not math.isfinite(smoothed) or smoothed > DIVERGE * self._best:
            self.diverged = self.stopped = True
        elif len(self.losses) >= len(self.rates):
            self.stopped = True


@dataclass
class _Saved:
    """Copies of what the sweep changes, to put back afterwards."""

    weights: dict
    optimizer: dict
    scaler: dict | None
    training: bool

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> "_Saved":
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(weights, copy.deepcopy(optimizer.state_dict()),
                   None if scaler is None else copy.deepcopy(scaler.state_dict()), model.training)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
        model.load_state_dict(self.weights)
        optimizer.load_state_dict(self.optimizer)
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)
        model.train(self.training)

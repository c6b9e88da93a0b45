"""One training epoch, evaluation and the epoch loop, with explicit arguments.

Functions take the values they need (model, loader, optimizer, device...), never the
config. Stopping early (Ctrl-C, SIGTERM) is cooperative: a flag checked between steps,
so the state saved afterwards is consistent.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import TrainingFailed
from .models import AUX_LOSS_WEIGHT, aux_logits_of, logits_of
from .runtime import Runtime


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop stops at the next step. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    @property
    def stopped(self) -> bool:
        return self.signum is not None


@dataclass
class Running:
    """Sums over an epoch so far (kept in checkpoints for a mid-epoch resume)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    rt: Runtime,
    *,
    epoch: int,
    running: Running | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    stop: StopFlag | None = None,
    on_step: Callable[[Running], None] | None = None,
) -> Running:
    """Train for one pass over ``loader`` (the caller puts the model in train mode).
    Returns the running sums; stops early, consistently, when ``stop`` is set."""
    r = running or Running()
    t0 = time.perf_counter()
    for images, labels in loader:
        images = rt.images(images)
        labels = labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            out = model(images)
            logits = logits_of(out)
            loss = criterion(logits, labels)
            for aux in aux_logits_of(out):
                loss = loss + AUX_LOSS_WEIGHT * criterion(aux, labels)
        if not torch.isfinite(loss):
            raise TrainingFailed(
                f"loss became {loss.item()} at epoch {epoch}, step {r.steps + 1}",
                hint="lower train.lr, enable train.grad_clip, or check the data for broken images/labels",
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = labels.size(0)
        r.loss_sum += loss.item() * n
        r.correct += int((logits.argmax(1) == labels).sum())
        r.seen += n
        r.steps += 1
        if on_step:
            on_step(r)
        if stop is not None and stop.stopped:
            break
    r.seconds += time.perf_counter() - t0
    return r


@dataclass
class EvalResult:
    loss: float
    acc: float
    seconds: float
    probs: torch.Tensor = field(repr=False)  # [N, C] softmax probabilities
    labels: torch.Tensor = field(repr=False)  # [N]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    rt: Runtime,
    *,
    criterion: nn.Module | None = None,
) -> EvalResult:
    """Loss, accuracy and per-sample probabilities over ``loader`` in eval mode."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    loss_sum, probs, labels_all = 0.0, [], []
    for images, labels in loader:
        images = rt.images(images)
        labels = labels.to(rt.device)
        with rt.autocast():
            logits = logits_of(model(images)).float()
        loss_sum += criterion(logits, labels).item() * labels.size(0)
        probs.append(logits.softmax(1).cpu())
        labels_all.append(labels.cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, 0)
    y = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long)
    n = max(len(y), 1)
    acc = float((p.argmax(1) == y).sum()) / n if len(y) else 0.0
    return EvalResult(loss_sum / n, acc, time.perf_counter() - t0, p, y)


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then cosine decay to 0."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f

"""The head phase: the new head trained alone before the strategy's epochs.

A freshly initialised head on a pretrained backbone starts far from a good classifier; were
it trained together with unfrozen stages at the same time, their first updates would follow
the gradients of a random head. So the head first learns alone, on the frozen backbone's
features, until the validation loss stops improving (fastai's ``fine_tune`` does the same
with a fixed epoch count). The backbone's features do not change in this phase, so they are
computed once (see :mod:`cnnft.cache`) and each head epoch takes milliseconds: this is the
linear probe of the frozen features, trained in the model itself, and it is the first
candidate for ``best.pt``.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from .. import data, engine, models, runtime
from ..config import Config
from . import _cached

MAX_HEAD_EPOCHS = 100
HEAD_PATIENCE = 5  # head epochs without a lower validation loss before the phase ends

Log = Callable[[str], None]


def head_phase(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, rt: runtime.Runtime,
               log: Log, show: bool, criterion: nn.Module,
               sample_weights: torch.Tensor | None = None) -> tuple[engine.Running, engine.EvalResult, int] | None:
    """Train the head alone on cached features; None (logged) when the features cannot be cached.
    Returns the training sums of its last epoch, the validation result and the head epochs run."""
    model = bb.model
    head = set(models.head_paths(model))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # only the head learns in this phase
        p.requires_grad_(any(n.startswith(h + ".") for h in head))
    try:
        sampler = data.EpochSampler(len(bundle.train), cfg.seed, shuffle=True, weights=sample_weights)
        cached = _cached.setup(cfg, bb, ["backbone"], bundle, sampler, rt, log, show, part="head")
        if cached is None:
            log("head phase: skipped (the backbone's features cannot be cached for this model)")
            return None
        return _fit_head(cfg, cached, sampler, model, rt, log, criterion)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])


def _fit_head(cfg: Config, cached: _cached.Cached, sampler: data.EpochSampler, model: nn.Module,
              rt: runtime.Runtime, log: Log, criterion: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    best_loss, best_state, best, bad, t0 = float("inf"), None, None, 0, time.perf_counter()
    epoch = 0
    for epoch in range(1, MAX_HEAD_EPOCHS + 1):
        sampler.set_epoch(epoch)
        cached.views.set_epoch(epoch)
        cached.rest.train()
        running = engine.train_one_epoch(cached.rest, cached.train, optimizer, None, criterion, rt, epoch=epoch)
        ev = engine.evaluate(cached.rest, cached.val, rt, criterion=nn.CrossEntropyLoss())
        if ev.loss < best_loss:
            best_loss, bad = ev.loss, 0
            best_state = copy.deepcopy({id(p): p.detach().clone() for p in params})
            best = (running, ev)
        else:
            bad += 1
            if bad >= HEAD_PATIENCE:
                break
    with torch.no_grad():
        for p in params:
            p.copy_(best_state[id(p)])
    running, ev = best
    log(f"head phase: {epoch} epoch(s) on cached features in {time.perf_counter() - t0:.1f}s; best val loss "
        f"{ev.loss:.4f}, acc {ev.acc:.4f}")
    return running, ev, epoch


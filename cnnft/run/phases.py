"""The head phase: the new head trained alone before the strategy's epochs.

A freshly initialised head on a pretrained backbone starts far from a good classifier; were
it trained together with unfrozen stages at the same time, their first updates would follow
the gradients of a random head. So the head first learns alone, on the frozen backbone's
features, until the validation loss stops improving (fastai's ``fine_tune`` does the same
with a fixed epoch count). The backbone's features do not change in this phase, so they are
computed once (see :mod:`cnnft.training.cache`) and each head epoch takes milliseconds: this is the
linear probe of the frozen features, trained in the model itself, and it is the first
candidate for ``best.pt``.

Because the features are fixed, training the head is a convex problem (softmax regression)
and is solved as one: full-batch L-BFGS on the un-augmented training features, for each L2
strength of a small grid, keeping the one with the lowest validation loss. This is what
scikit-learn's ``LogisticRegression`` does for a linear probe, so a run starts from at least
the probe's quality instead of from a few hundred noisy minibatch steps.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from .. import models, progress
from ..config import Config
from ..data import folders as data
from ..training import engine, runtime
from . import cached as _cached

# L2 strengths (mean-loss scale) tried for the head, strongest first: each solve starts from the
# previous one's weights, and the validation loss picks one (logistic regression's usual grid)
L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
LBFGS_ITERATIONS = 100
CHUNK = 8192  # rows of features per forward in a full-batch loss

Log = Callable[[str], None]


def head_phase(cfg: Config, bb: models.Backbone, bundle: data.DataBundle, rt: runtime.Runtime,
               log: Log, show: bool, criterion: nn.Module,
               sample_weights: torch.Tensor | None = None,
               strategy_cache: "_cached.Cached | None" = None) -> tuple[engine.Running, engine.EvalResult, int] | None:
    """Train the head alone on cached features; None (logged) when the features cannot be cached.
    With ``strategy_cache`` cut at the same place, its validation activations and un-augmented
    view 0 are the features (no pass of its own). Returns the training sums of its last epoch,
    the validation result and the head epochs run."""
    model = bb.model
    head = set(models.head_paths(model))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # only the head learns in this phase
        p.requires_grad_(any(n.startswith(h + ".") for h in head))
    try:
        sampler = data.EpochSampler(len(bundle.train), cfg.seed, shuffle=False)
        probe_cfg = cfg.model_copy(deep=True)
        probe_cfg.data.augment = "none"  # the probe sees each training image as evaluation does
        cached = _cached.setup(probe_cfg, bb, ["backbone"], bundle, sampler, rt, log, show, part="head",
                               reuse=strategy_cache)
        if cached is None:
            log("head phase: skipped (the backbone's features cannot be cached for this model)")
            return None
        return _fit_head(cached, model, rt, log, criterion, sample_weights)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])


def _fit_head(cached: _cached.Cached, model: nn.Module, rt: runtime.Runtime, log: Log, criterion: nn.Module,
              sample_weights: torch.Tensor | None):
    t0 = time.perf_counter()
    x, y = _all(cached.views, rt)
    if not torch.isfinite(x).all():  # overflowing weights: no probe to fit; training reports the loss
        log("head phase: skipped (the frozen backbone's features are not finite)")
        return None
    w = None if sample_weights is None else (sample_weights / sample_weights.mean()).to(rt.device)
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.ndim > 1]  # weights, not biases (as the optimizer groups do)
    head = cached.rest
    head.eval()  # a deterministic function of the features: dropout off
    best = None
    for l2 in progress.track(L2_GRID, "head phase: L-BFGS over the L2 grid", len(L2_GRID), False, log,
                             unit="strengths"):
        _solve(head, params, decayed, x, y, w, criterion, l2)
        ev = engine.evaluate(head, cached.val, rt, criterion=nn.CrossEntropyLoss())
        if best is None or ev.loss < best[0].loss:
            best = ev, l2, [p.detach().clone() for p in params]
    ev, l2, values = best
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    running = _train_sums(head, x, y, criterion)
    running.seconds = time.perf_counter() - t0
    log(f"head phase: linear probe on cached features (L-BFGS, L2 {l2:g} picked by validation loss from "
        f"{len(L2_GRID)}) in {running.seconds:.1f}s; val loss {ev.loss:.4f}, acc {ev.acc:.4f}")
    return running, ev, len(L2_GRID)


def _all(stored, rt: runtime.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stored training activation (its one un-augmented view) and label, in order: the
    store's own memory when it holds them in fp32 on this device, else one fp32 copy."""
    data = stored.store.data
    if isinstance(data, torch.Tensor) and data.dtype == torch.float32 and data.dim() == 3 and rt.device.type == "cpu":
        return data[0], stored.labels.to(rt.device)
    idx = list(range(len(stored)))
    xs = [rt.images(stored.store.batch(0, idx[i:i + CHUNK])) for i in range(0, len(idx), CHUNK)]
    return torch.cat(xs), stored.labels.to(rt.device)


def _loss(head: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None,
          criterion: nn.Module) -> torch.Tensor:
    """The mean training loss over all samples, computed in chunks (per-sample weights ``w``)."""
    total = x.new_zeros(())
    for i in range(0, len(x), CHUNK):
        logits = models.logits_of(head(x[i:i + CHUNK]))
        if w is None:
            total = total + criterion(logits, y[i:i + CHUNK]) * len(logits)
        else:
            per = nn.functional.cross_entropy(logits, y[i:i + CHUNK], weight=criterion.weight, reduction="none",
                                              label_smoothing=criterion.label_smoothing)
            total = total + (per * w[i:i + CHUNK]).sum()
    return total / len(x)


def _solve(head: nn.Module, params: list[torch.Tensor], decayed: list[torch.Tensor], x: torch.Tensor,
           y: torch.Tensor, w: torch.Tensor | None, criterion: nn.Module, l2: float) -> None:
    """Minimise the training loss + l2/2 * |weights|^2 from the current parameters."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=LBFGS_ITERATIONS, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = _loss(head, x, y, w, criterion) + l2 / 2 * sum((p * p).sum() for p in decayed)
        loss.backward()
        return loss

    opt.step(closure)


@torch.no_grad()
def _train_sums(head: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module) -> engine.Running:
    """Training loss and accuracy of the fitted head, as a training epoch reports them."""
    r = engine.Running()
    for i in range(0, len(x), CHUNK):
        logits = models.logits_of(head(x[i:i + CHUNK]))
        r.loss_sum += float(criterion(logits, y[i:i + CHUNK])) * len(logits)
        r.correct += int((logits.argmax(1) == y[i:i + CHUNK]).sum())
        r.seen += len(logits)
        r.steps += 1
    return r


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> nn.Linear:
    """Softmax regression of ``y`` on fixed features ``x`` by the head phase's exact solver
    (full-batch L-BFGS, mean loss + l2/2 * |weights|^2), from zero weights."""
    head = nn.Linear(x.shape[1], classes).to(x.device, x.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    _solve(head, list(head.parameters()), [head.weight], x, y, None, nn.CrossEntropyLoss(), l2)
    return head


def out_of_fold_probs(x: torch.Tensor, y: torch.Tensor, classes: int, folds, l2: float) -> torch.Tensor:
    """Each image's class probabilities from a linear head fitted (:func:`fit_linear`) on the
    other folds only, features standardised by those folds' statistics: held-out predictions for
    every image, as confident learning needs them."""
    folds = torch.as_tensor(folds)
    probs = torch.zeros(len(y), classes, dtype=torch.float64)
    for f in folds.unique().tolist():
        held = folds == f
        fit = ~held
        if not fit.any():
            probs[held] = 1.0 / classes
            continue
        mu, sd = x[fit].mean(0), x[fit].std(0, unbiased=False) + 1e-6
        head = fit_linear((x[fit] - mu) / sd, y[fit], classes, l2)
        with torch.no_grad():
            probs[held] = head((x[held] - mu) / sd).softmax(1).double()
    return probs

"""Measure how similar a dataset is to ImageNet, instead of asking.

On a bounded, stratified, seeded sample of the training images (at most ``per_class``
per class), one eval-mode forward pass per batch records the output of every stage
boundary (``stem, stage1..K``: the stage's last module to finish, see
:func:`cnnft.models.stage_modules`), globally average-pooled (the mean over tokens for
transformer stages). A linear probe per stage, scikit-learn's multinomial
LogisticRegression on standardised features, is scored by stratified k-fold
cross-validation on the sample (the linear-evaluation protocol of Kornblith, Shlens & Le,
"Do Better ImageNet Models Transfer Better?", CVPR 2019, applied at every depth as in
Yosinski et al., "How transferable are features in deep neural networks?", NeurIPS 2014).
:func:`cnnft.training.strategies.decide` turns the curve into a strategy.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .. import models, progress
from ..data import folders as data
from ..data import transforms
from ..data.samples import Source
from ..errors import DataError
from . import runtime, strategies
from .strategies import Decision, StageProbe

PER_CLASS = 100  # images per class in the sample, at most
MAX_IMAGES = 500  # the sample in all: many classes get fewer per class (2 CPU cores: well under a minute)
FOLDS = 5  # cross-validation folds (fewer when a class has fewer images)
BATCH_SIZE = 32

Log = Callable[[str], None]


@dataclass(frozen=True)
class Measurement:
    """The probe curve and what it was measured on."""

    stages: list[StageProbe]
    images: int  # sampled
    per_class: int  # the sample's bound
    folds: int
    seed: int
    image_size: int
    forward_seconds: float  # the sample's forward passes (all stages at once)
    seconds: float  # in all, with the probes (each stage's own: StageProbe.seconds)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_indices(labels: list[int], per_class: int, seed: int) -> list[int]:
    """At most ``per_class`` indices of each class, drawn at random with ``seed``; sorted."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    picked: list[int] = []
    for _, idx in sorted(by_class.items()):
        picked += [int(i) for i in rng.permutation(idx)[:per_class]]
    return sorted(picked)


class _Images(Dataset):
    """(tensor or None, label): an unreadable image is left out of the sample, not a crash."""

    def __init__(self, source: Source, transform, draft: int | None) -> None:
        self.source, self.transform, self.draft = source, transform, draft

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            return self.transform(self.source.load(i, self.draft)), self.source.labels[i]
        except Exception:  # noqa: BLE001 - any decoder failure makes the image unusable
            return None, self.source.labels[i]


def _as_list(batch):
    return batch


def pool(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(N, C) features of a stage output: the spatial mean of (N, C, H, W) maps (of (N, H, W, C)
    ones when ``channels_last``), the token mean of (N, L, C) sequences."""
    t = t.float()
    if t.dim() == 4:
        return t.mean((1, 2)) if channels_last else t.mean((2, 3))
    if t.dim() == 3:
        return t.mean(1)
    return t.flatten(1)


def _channels_last(module: nn.Module, t: torch.Tensor) -> bool:
    """A 4-d output whose last axis, not its second, has the width of the module's last
    1-d parameter (a norm or bias): NHWC, as in Swin's stages."""
    widths = [p.shape[0] for p in module.parameters() if p.dim() == 1]
    return t.dim() == 4 and bool(widths) and t.shape[-1] == widths[-1] != t.shape[1]


@torch.inference_mode()
def stage_features(model: nn.Module, stages: list[models.Stage], source: Source, pre: models.Preprocess,
                   device: torch.device, batch_size: int = BATCH_SIZE,
                   show: str | None = None, log: Log | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled output of every stage but the head for each image of ``source``, one forward
    pass per batch: ({stage: (n, width) array}, labels of the images read)."""
    body = [s for s in stages if s.name != "head"]
    mods = {s.name: names for s, names in zip(stages, models.stage_modules(model, stages).values())
            if s.name != "head"}
    last = {name: model.get_submodule(names[-1]) for name, names in mods.items() if names}
    missing = [s.name for s in body if s.name not in last]
    if missing:
        raise DataError(f"model.backbone: no module found for stage(s) {', '.join(missing)}")
    loader = data.make_loader(_Images(source, transforms.eval_transform(pre), pre.resize_size), batch_size, 0,
                              collate_fn=_as_list)
    feats: dict[str, list[torch.Tensor]] = {s.name: [] for s in body}
    labels: list[int] = []
    model.eval().to(device)
    if device.type == "cpu":
        runtime.tune_cpu_allocator()
    with models.last_stage_outputs(model, mods) as latest, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in progress.track(loader, show or "similarity probe", len(source), show is not None, log, size=len):
            good = [(x, y) for x, y in batch if x is not None]
            if not good:
                continue
            latest.clear()
            model(torch.stack([x for x, _ in good]).to(device))
            for name in feats:
                if name not in latest:
                    raise DataError(f"model.backbone: stage {name} produced no output in a forward pass")
                t = latest[name]
                feats[name].append(pool(t, _channels_last(last[name], t)).cpu())
            labels += [y for _, y in good]
    if not labels:
        raise DataError("data: none of the sampled images could be read")
    return {n: torch.cat(f).numpy() for n, f in feats.items()}, np.asarray(labels)


def probe(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    """Mean and standard deviation over stratified folds of a logistic-regression probe's
    accuracy on standardised ``features``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not np.isfinite(features).all():  # overflowing weights: the stage's features separate nothing
        return 0.0, 0.0
    # a bounded probe: 100 L-BFGS steps rank the stages as well as full convergence does
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=100, tol=1e-3))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(clf, features, labels, cv=cv, scoring="accuracy")
    return float(scores.mean()), float(scores.std())


def measure(model: nn.Module, stages: list[models.Stage], source: Source, pre: models.Preprocess, *,
            per_class: int = PER_CLASS, seed: int = 0, device: torch.device | str = "cpu",
            batch_size: int = BATCH_SIZE, show_progress: bool = False, log: Log | None = None) -> Measurement:
    """The probe curve of ``model``'s stages on a stratified sample of ``source``: at most
    ``per_class`` images per class, and fewer when the classes would make it more than
    MAX_IMAGES (but never under 10 per class); the bound used is in the result."""
    t0 = time.perf_counter()
    per_class = min(per_class, max(2 * FOLDS, MAX_IMAGES // max(1, len(set(source.labels)))))
    idx = sample_indices(source.labels, per_class, seed)
    feats, labels = stage_features(model, stages, source.subset(idx), pre, torch.device(device),
                                            batch_size, "similarity" if show_progress else None, log)
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    if smallest < 2 or len(np.unique(labels)) < 2:
        raise DataError("data: measuring similarity needs at least 2 classes with 2 readable images each",
                        hint="add images, or set freeze.similar to true or false")
    folds = min(FOLDS, smallest)
    forward = time.perf_counter() - t0
    rows = []
    for name, x in feats.items():
        t = time.perf_counter()
        mean, std = probe(x, labels, folds, seed)
        rows.append(StageProbe(name, int(x.shape[1]), round(mean, 4), round(std, 4),
                               round(time.perf_counter() - t, 2)))
        if log is not None:
            log(f"similarity: {name} width {x.shape[1]}: probe {mean:.3f} +- {std:.3f}")
    return Measurement(rows, len(labels), per_class, folds, seed, pre.crop_size, round(forward, 2),
                       round(time.perf_counter() - t0, 2))


def assess(bb: models.Backbone, source: Source, size: str, *, per_class: int = PER_CLASS, seed: int = 0,
           device: torch.device | str = "cpu", show_progress: bool = False,
           log: Log | None = None) -> tuple[Decision, Measurement]:
    """Measure ``bb``'s probe curve on ``source`` and decide the strategy for a ``size`` dataset."""
    m = measure(bb.model, bb.stages, source, bb.preprocess, per_class=per_class, seed=seed, device=device,
                show_progress=show_progress, log=log)
    return strategies.decide(m.stages, size), m

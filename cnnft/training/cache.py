"""Cached outputs of a frozen prefix of the network.

When the first part of a network is frozen with its BatchNorm pinned, its output for an
image never changes between epochs. Compute it once, then train the rest of the network
from the stored activations: the frozen part costs one pass instead of one per epoch.

The cut is found from the model itself: the modules that finish before the first trainable
one starts are the prefix; the activation of the last of them is stored; the rest runs a
shallow copy of the model in which the prefix modules pass the stored activation through.
Every cut is verified on a sample (the copy must give the model's own logits) before it is
used, so an architecture whose forward pass does not allow the cut is trained uncached,
never wrongly.

Stored activations are keyed by everything they depend on (model, weights, cut, preprocessing,
augmentation view and each file's path, size and modification time), so a changed file or
setting is never served stale.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from . import fold
from .store import HALF_ABOVE_VALUES, Store, load_disk, size_of  # noqa: F401 - the cache's storage

FORMAT_VERSION = 3  # 2: images decoded upright (EXIF orientation applied); 3: fp16 rows in memory too, stores filled in place


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class _Pass(nn.Module):
    """Stands in for a prefix module: returns its first argument unchanged."""

    def forward(self, x, *args, **kwargs):
        return x


class _Inject(nn.Module):
    """Stands in for the first prefix module: returns the stored activation of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        return self.value


def _owns_trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _call_order(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(event, module name) in the order a training-mode forward pass starts and ends
    modules; run on a copy, so that no BatchNorm statistics of the model change."""
    probe = copy.deepcopy(model).train()
    events: list[tuple[str, str]] = []
    handles = []
    for name, m in probe.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(lambda _m, _a, n=name: events.append(("start", n))))
            handles.append(m.register_forward_hook(lambda _m, _a, _o, n=name: events.append(("end", n))))
    try:
        with torch.no_grad():
            probe(sample)
    finally:
        for h in handles:
            h.remove()
    return events


def _prefix_modules(model: nn.Module, events: list[tuple[str, str]]) -> list[str]:
    """Outermost modules that run entirely before the first trainable module starts, in call
    order; empty when a module of the prefix also runs later (a shared activation)."""
    modules = dict(model.named_modules())
    first_trainable = next((i for i, (ev, n) in enumerate(events) if ev == "start" and _owns_trainable(modules[n])),
                           None)
    if first_trainable is None:
        return []
    ended = [n for ev, n in events[:first_trainable] if ev == "end"]
    later = {n for _, n in events[first_trainable:]}
    ordered: list[str] = []
    for n in ended:  # a parent ends after its children: keep the outermost ones
        ordered = [o for o in ordered if not o.startswith(n + ".")]
        ordered.append(n)
    if any(n in later or any(x.startswith(n + ".") for x in later) for n in ordered):
        return []
    starts = [n for ev, n in events if ev == "start"]
    return sorted(ordered, key=starts.index)


@dataclass
class Split:
    """A model cut after its frozen prefix. ``prefix(x)`` computes the stored activation,
    ``rest`` is the trainable remainder (it shares the model's modules and parameters) and
    takes that activation as its input."""

    model: nn.Module
    boundary: str  # the prefix module whose output is stored
    modules: tuple[str, ...]  # every prefix module, in call order
    rest: nn.Module

    runner: nn.Module | None = None  # what ``prefix`` runs (the model with folded BatchNorm), else the model

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The activation at the cut for a batch of images (computed in eval mode)."""
        runner = self.model if self.runner is None else self.runner
        target = runner.get_submodule(self.boundary)

        def stop(_m, _a, out):
            raise _Stop(out)

        handle = target.register_forward_hook(stop)
        was_training = self.model.training
        runner.eval()  # frozen layers: BatchNorm statistics are used, never updated
        try:
            runner(x)
        except _Stop as s:
            return s.value
        finally:
            handle.remove()
            self.model.train(was_training)  # the runner shares the model's modules
        raise RuntimeError(f"the forward pass never reached {self.boundary}")


class _Rest(nn.Module):
    def __init__(self, shell: nn.Module, inject: _Inject) -> None:
        super().__init__()
        self.shell, self.inject = shell, inject

    def forward(self, activation: torch.Tensor):
        self.inject.value = activation
        try:
            return self.shell(activation)
        finally:
            self.inject.value = None


def find_split(model: nn.Module, sample: torch.Tensor, logits_of: Callable = lambda o: o) -> tuple[Split | None, str]:
    """The cut after the frozen prefix of ``model`` (trainable parameters mark the rest),
    checked on ``sample``; ``(None, why)`` when there is none or it does not hold."""
    try:
        events = _call_order(model, sample)
    except Exception as exc:  # noqa: BLE001 - e.g. an input too small for the architecture
        return None, f"the model does not run on the sample ({type(exc).__name__})"
    names = _prefix_modules(model, events)
    if not names:
        return None, "no frozen prefix runs before the trainable layers"
    shell = fold.shallow_path_copy(model, names)
    inject = _Inject()
    fold.replace_module(shell, names[0], inject)
    for n in names[1:]:
        fold.replace_module(shell, n, _Pass())
    split = Split(model, names[-1], tuple(names), _Rest(shell, inject))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = logits_of(model(sample)).float()
            cut = logits_of(split.rest(split.prefix(sample))).float()
    except Exception as exc:  # noqa: BLE001 - the forward pass does not allow this cut
        return None, f"the model's forward pass cannot start after {names[-1]} ({type(exc).__name__})"
    finally:
        model.train(was_training)
    if not fold.reproduces(full, cut):
        return None, f"the forward pass after {names[-1]} does not reproduce the model's output"
    return fold_batchnorm(split, sample), f"cut after {names[-1]}"


def fold_batchnorm(split: Split, sample: torch.Tensor) -> Split:
    """The split with each frozen convolution of the prefix merged with the BatchNorm after it
    (see :mod:`cnnft.training.fold`): one memory pass less per layer, +33% for an EfficientNet-Lite0
    prefix at 224 px on CPU. Only the runner of ``prefix`` changes (a copy that shares all other
    modules); the merged prefix must reproduce the unmerged one's activation, else the split
    is kept as it is."""
    def run(m: nn.Module) -> torch.Tensor:
        return Split(split.model, split.boundary, split.modules, split.rest, m).prefix(sample)

    runner = fold.merged(split.model, run, within=split.modules)
    if runner is split.model:
        return split
    return Split(split.model, split.boundary, split.modules, split.rest, runner)


# ----------------------------------------------------------------------------- storage

def file_identity(ids: Sequence[str]) -> list:
    """Path, size and modification time of each file (other sample ids as they are)."""
    out = []
    for i in ids:
        try:
            st = os.stat(i)
            out.append([i, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([i])
    return out


def cache_key(parts: dict) -> str:
    """A stable digest of everything a stored activation depends on."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def frozen_modes(model: nn.Module) -> Iterator[None]:
    """Run the prefix without autograd and give every module back the mode it had (a live view
    is computed in the middle of a training epoch)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def fill(split: Split, view: int, batches: Iterable, store: Store | None, n: int, views: int,
         to_device: Callable[[torch.Tensor], torch.Tensor], *, in_memory: bool = True,
         disk: tuple[Path, str] | None = None, on_batch: Callable[[int], None] | None = None) -> Store:
    """Run the prefix over ``batches`` (view ``view`` in sample order) and write each batch's
    activations straight into ``store`` (allocated from the first batch when None)."""
    start = 0
    with frozen_modes(split.model):
        for images, _ in batches:
            acts = split.prefix(to_device(images))
            if store is None:
                store = Store.allocate(views, n, acts.shape[1:], in_memory=in_memory, disk=disk)
            store.write(view, range(start, start + len(acts)), acts)
            start += len(acts)
            if on_batch:
                on_batch(len(acts))
    assert start == n, (start, n)
    return store


def compute(split: Split, loaders: Sequence[Iterable], n: int, to_device: Callable[[torch.Tensor], torch.Tensor], *,
            disk: tuple[Path, str] | None = None, in_memory: bool = True,
            on_batch: Callable[[int], None] | None = None) -> Store:
    """Every view at once (one loader per view, in sample order), streamed into one store; on
    disk (``(folder, key)``) it is saved under its key once complete."""
    store = None
    for v, loader in enumerate(loaders):
        store = fill(split, v, loader, store, n, len(loaders), to_device, in_memory=in_memory, disk=disk,
                     on_batch=on_batch)
    return store


@dataclass
class Live:
    """How rows of a view not stored yet are computed, in the epoch that first trains on them:
    ``images(view, batches)`` yields (images, labels) for each list of indices in ``batches``,
    augmented as that view; ``progress(desc, total)`` reports the pass (an object with
    ``update(n)`` and ``close()``)."""

    split: Split
    images: Callable[[int, list[list[int]]], Iterable]
    to_device: Callable[[torch.Tensor], torch.Tensor]
    progress: Callable[[str, int], object] | None = None


class CachedFeatures(Dataset):
    """Stored activations as a dataset whose items are whole batches (lists of indices):
    ``view_of_epoch`` picks which augmented view an epoch trains on. With ``live``, a view's
    rows not stored yet are computed as their batch comes up (see :func:`cached_loader`)."""

    def __init__(self, store: Store, labels: Sequence[int], views: int, live: Live | None = None) -> None:
        self.store, self.labels, self.views = store, torch.as_tensor(list(labels)), views
        self.view, self.live = 0, live

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]):
        return self.store.batch(self.view, idx), self.labels[torch.as_tensor(idx)]

    def missing(self, batches: list[list[int]]) -> list[bool]:
        """Which of ``batches`` hold rows of the current view that are not stored yet."""
        filled = self.store.filled[self.view]
        return [not filled[b].all() for b in batches]


class _Batches(Sampler[list[int]]):
    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self):
        batch: list[int] = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if len(batch) > 1 or (batch and self.batch_size == 1):  # BatchNorm cannot train on one sample
            yield batch

    def __len__(self) -> int:
        n, b = len(self.sampler), self.batch_size
        return n // b + (1 if n % b > 1 or (b == 1 and n % b) else 0)


class _ViewLoader:
    """Batches of a :class:`CachedFeatures` in a sampler's order. A batch whose rows of the
    current view are stored is read (in the main process: indexing memory is faster than handing
    batches between processes); the others are computed from their images, stored and served,
    so an epoch that meets a view first costs one plain pass over the images and fills it."""

    def __init__(self, ds: CachedFeatures, batches: _Batches) -> None:
        self.ds, self.batches = ds, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        ds, view = self.ds, self.ds.view
        order = list(self.batches)
        missing = ds.missing(order) if ds.live is not None else [False] * len(order)
        if not any(missing):
            yield from (ds[b] for b in order)
            return
        live = ds.live
        todo = [b for b, m in zip(order, missing) if m]
        shown = live.progress(f"computing view {view + 1}/{ds.views}", sum(map(len, todo))) if live.progress else None
        images = iter(live.images(view, todo))
        try:
            for b, m in zip(order, missing):
                if not m:
                    yield ds[b]
                    continue
                x, _ = next(images)
                with frozen_modes(live.split.model):
                    acts = live.split.prefix(live.to_device(x))
                yield ds.store.write(view, b, acts), ds.labels[torch.as_tensor(b)]
                if shown is not None:
                    shown.update(len(b))
        finally:
            if shown is not None:
                shown.close()


def cached_loader(ds: CachedFeatures, sampler: Sampler[int], batch_size: int) -> _ViewLoader:
    """Batches of ``ds`` in ``sampler``'s order, computing the current view's missing rows."""
    return _ViewLoader(ds, _Batches(sampler, batch_size))

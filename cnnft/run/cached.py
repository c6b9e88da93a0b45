"""Training from cached activations of the frozen prefix (see :mod:`cnnft.training.cache`).

The cut is found once per run; the validation set is stored as one pass of the eval
pipeline, the training set as ``train.cache_views`` augmented passes (one epoch trains on
one view, in turn) or one pass when there is no augmentation. Stored activations live in
memory within ``train.cache_budget_mb`` and, unless ``train.feature_cache`` is ``memory``,
in a cache folder that later runs with the same model, data and settings reuse.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .. import __version__, files, models, progress
from ..config import Config
from ..data import folders as data
from ..data import transforms
from ..training import cache, distributed, fold, runtime

Log = Callable[[str], None]


@dataclass
class Cached:
    """The trainable rest of the model and its loaders over stored activations."""

    rest: nn.Module
    train: "Iterable | None"
    val: Iterable
    views: cache.CachedFeatures
    boundary: str = ""
    plain_first: bool = False  # view 0 is the un-augmented one: the head phase's features


def cache_folder(setting: str | None) -> Path:
    """``train.cache_dir``, else $XDG_CACHE_HOME/cnnft/features, else ~/.cache/cnnft/features."""
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnft" / "features"


def setup(cfg: Config, bb: models.Backbone, frozen: list[str], bundle: data.DataBundle, sampler: data.EpochSampler,
          rt: runtime.Runtime, log: Log, show: bool, part: str = "", reuse: Cached | None = None) -> Cached | None:
    """Cached training for this run, or None (the log says why) when it does not apply.
    ``part`` names what the activations are for in the log and the cache key ("head": the
    head phase's features, all computed here; otherwise each training view is computed in the
    epoch that first trains on it). The head phase takes ``reuse``'s (the strategy's cache)
    validation activations and un-augmented view 0 when both cut at the same place."""
    t = cfg.train
    if t.feature_cache == "off":
        log("feature cache: off (train.feature_cache)")
        return None
    if not frozen:
        return None
    pre = bb.preprocess
    eval_ds = data.ImageDataset(bundle.val, transforms.eval_transform(pre), pre.resize_size)
    sample = torch.stack([eval_ds[i][0] for i in range(min(2, len(eval_ds)))])
    split, why = cache.find_split(bb.model, rt.images(sample), models.logits_of)
    if split is None:
        log(f"feature cache: off ({why})")
        return None
    if reuse is not None and reuse.plain_first:
        if reuse.boundary == split.boundary:
            return _shared_head(reuse, bundle, cfg, rt, log, show)
        shared = _head_from_earlier_cut(reuse, bb, bundle, cfg, rt, log, show)
        if shared is not None:
            return shared
    views = 1 if cfg.data.augment == "none" else min(_views(t.cache_views, split.rest, bb.model), t.epochs)
    # with a head phase ahead, view 0 is un-augmented: the head phase's features and epoch 1's view
    plain_first = not part and t.head_phase and bb.pretrained and distributed.world_size() == 1
    key_base = _key_base(bb, split.boundary)
    # the validation activations depend on the cut and the eval pipeline only: the head phase
    # and the strategy's epochs share them
    val = _store(split, eval_ds, 1, "val", key_base, cfg, rt, log, show, eager=True)
    train_tf = transforms.train_transform(pre, cfg.data.augment, cfg.data.hflip)
    train_ds = data.ImageDataset(bundle.train, train_tf, pre.resize_size, seed=cfg.seed)
    train = _store(split, train_ds, views, f"{part} train".strip(),
                   {**key_base, "augment": cfg.data.augment, "hflip": cfg.data.hflip, "seed": cfg.seed,
                    "draws": "per-image", "plain_first": plain_first},  # views drawn per (seed, view, image)
                   # under torchrun rank 0 fills the cache folder before the others read it
                   cfg, rt, log, show, eager=part == "head" or distributed.world_size() > 1)
    aug = f"{views} augmented view(s) per image, one per epoch in turn" if views > 1 else "one view per image"
    if plain_first and cfg.data.augment != "none":
        aug = (f"{views} views per image, one per epoch in turn: the un-augmented one (the head phase's), then "
               f"{views - 1} augmented" if views > 1 else "one view per image: the un-augmented one (the head phase's)")
    plain_ds = data.ImageDataset(bundle.train, transforms.eval_transform(pre), pre.resize_size)
    when = "" if train.complete() else "; each view is computed in the epoch that first trains on it"
    log(f"feature cache{' (' + part + ' phase)' if part else ''}: the frozen layers up to {split.boundary} run once; training reads stored "
        f"activations ({aug}; {(val.nbytes + train.nbytes) / 2**20:.0f} MiB{when})")
    live = None if train.complete() else cache.Live(
        split, lambda view, batches: _images(plain_ds if plain_first and view == 0 else train_ds, view, batches, cfg, rt),
        rt.images, lambda desc, total: progress.counter(f"training: {desc}", total, False, None if show else log))
    features = cache.CachedFeatures(train, bundle.train.labels, views, live)
    val_ds = cache.CachedFeatures(val, bundle.val.labels, 1)
    val_loader = cache.cached_loader(val_ds, _val_sampler(sampler, len(val_ds)), cfg.data.batch_size)
    return Cached(split.rest, cache.cached_loader(features, sampler, cfg.data.batch_size), val_loader, features,
                  split.boundary, plain_first)


def _shared_head(reuse: Cached, bundle: data.DataBundle, cfg: Config, rt: runtime.Runtime, log: Log,
                 show: bool) -> Cached:
    """The head phase's features from the strategy's cache: its validation activations and its
    un-augmented view 0, computed here (one pass that epoch 1 then reads) unless stored already."""
    _fill_plain_view(reuse, cfg, rt, log, show)
    log("feature cache (head phase): the strategy's stored activations (validation, un-augmented view 0)")
    return Cached(reuse.rest, None, reuse.val, cache.CachedFeatures(reuse.views.store, bundle.train.labels, 1),
                  reuse.boundary, True)


def _fill_plain_view(reuse: Cached, cfg: Config, rt: runtime.Runtime, log: Log, show: bool) -> None:
    """The strategy cache's un-augmented view 0, computed in one pass unless stored already."""
    views = reuse.views
    if views.store.complete(0):
        return
    shown = progress.counter("caching train activations (un-augmented view)", len(views), show, log)
    b = cfg.data.batch_size
    in_order = [list(range(i, min(i + b, len(views)))) for i in range(0, len(views), b)]
    try:
        cache.fill(views.live.split, 0, views.live.images(0, in_order), views.store, len(views), views.store.views,
                   rt.images, on_batch=shown.update)
    finally:
        shown.close()


class _HeadInput(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _head_inputs_of(rest: nn.Module, head: nn.Module, acts: torch.Tensor) -> torch.Tensor:
    """What ``head`` receives when ``rest`` runs on stored activations (the head itself not run)."""
    def stop(_m, inputs):
        raise _HeadInput(inputs[0])

    handle = head.register_forward_pre_hook(stop)
    try:
        rest(acts)
    except _HeadInput as got:
        return got.value
    finally:
        handle.remove()
    raise RuntimeError("the forward pass never reached the head")


def _head_from_earlier_cut(reuse: Cached, bb: models.Backbone, bundle: data.DataBundle, cfg: Config,
                           rt: runtime.Runtime, log: Log, show: bool) -> Cached | None:
    """The head phase's features from a strategy cache cut earlier (after the stem, say): its
    un-augmented view 0 is computed now (epoch 1 then reads it, so no image is decoded twice) and
    the frozen layers between that cut and the head run over the stored rows. None when that does
    not hold for this model (several heads, features over the budget, a head whose input does not
    give the model's output): the head phase then makes its own pass."""
    model = bb.model
    if len(models.head_paths(model)) != 1 or reuse.views.live is None and not reuse.views.store.complete(0):
        return None
    head = models.head_module(model)
    n, m, b = len(reuse.views), len(reuse.val.ds), cfg.data.batch_size
    with cache.frozen_modes(model):
        model.eval()
        first = reuse.val.ds.store.batch(0, range(min(2, m))) if m else None
        if first is None:
            return None
        probe = _head_inputs_of(reuse.rest, head, rt.images(first))
        if not fold.reproduces(models.logits_of(reuse.rest(rt.images(first))).float(),
                               models.logits_of(head(probe)).float()):
            return None
    shape = probe.shape[1:]
    if cache.size_of(1, n + m, shape) > cfg.train.cache_budget_mb * 2**20:
        return None
    _fill_plain_view(reuse, cfg, rt, log, show)
    stores = []
    for source, count, what in ((reuse.views.store, n, "train"), (reuse.val.ds.store, m, "validation")):
        out = cache.Store.allocate(1, count, shape, in_memory=True)
        shown = progress.counter(f"head phase: {what} features from the stored activations", count, show, log)
        try:
            with cache.frozen_modes(model):
                model.eval()
                for i in range(0, count, b):
                    rows = range(i, min(i + b, count))
                    out.write(0, rows, _head_inputs_of(reuse.rest, head, rt.images(source.batch(0, rows))))
                    shown.update(len(rows))
        finally:
            shown.close()
        stores.append(out)
    train, val = stores
    log(f"feature cache (head phase): the strategy's stored activations after {reuse.boundary} (validation, "
        "un-augmented view 0), run on to the head")
    val_ds = cache.CachedFeatures(val, bundle.val.labels, 1)
    val_loader = cache.cached_loader(val_ds, data.EpochSampler(m, 0, shuffle=False), b)
    return Cached(head, None, val_loader, cache.CachedFeatures(train, bundle.train.labels, 1), "head input", True)


# With the whole backbone frozen an epoch costs next to nothing and the augmented views are the
# only thing the head learns from beyond the head phase's probe (ants/bees, head_only: 2 views
# 0.954, 4 views 0.961); with stages training, each epoch runs them and 2 views suffice.
VIEWS_HEAD_ONLY, VIEWS = 4, 2


def _views(setting: int | str, rest: nn.Module, model: nn.Module) -> int:
    """``train.cache_views`` as a number (auto: by how much of the model the cut leaves)."""
    if setting != "auto":
        return int(setting)
    head = set(models.head_paths(model))
    trains_stages = any(p.requires_grad for n, p in model.named_parameters()
                        if not any(n.startswith(h + ".") for h in head))
    return VIEWS if trains_stages else VIEWS_HEAD_ONLY


def _val_sampler(train_sampler: data.EpochSampler, n: int) -> data.EpochSampler:
    """Every validation sample in order; under torchrun, this process's shard of them (taken
    as the training sampler takes its shard), all samples kept."""
    if isinstance(train_sampler, distributed.ShardedSampler):
        return distributed.ShardedSampler(n, 0, False, rank=train_sampler.rank, world=train_sampler.world,
                                          batch_size=train_sampler.batch_size, drop_tail=False)
    return data.EpochSampler(n, 0, shuffle=False)


def _key_base(bb: models.Backbone, boundary: str) -> dict:
    weights = bb.weights
    identity = cache.file_identity([weights])[0] if Path(weights).is_file() else weights
    # the cut (boundary) fixes the frozen prefix that computes the activations
    return {"cnnft": __version__, "torch": torch.__version__, "model": bb.name, "weights": identity,
            "boundary": boundary, "preprocess": bb.preprocess.to_dict()}


VIEW_EPOCH = 1_000_000  # view v is augmented as "epoch" VIEW_EPOCH + v: no training epoch draws the same


class _Batches(torch.utils.data.Dataset):
    """Item k: the images and labels of ``batches[k]`` (a list of sample indices), stacked."""

    def __init__(self, ds: data.ImageDataset, batches: list[list[int]]) -> None:
        self.ds, self.batches = ds, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        items = [self.ds[i] for i in self.batches[k]]
        return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def _images(ds: data.ImageDataset, view: int, batches: list[list[int]], cfg: Config, rt: runtime.Runtime):
    """The images of ``batches`` augmented as view ``view`` (the same for any data.num_workers
    and any batch order: each image draws from its own (seed, view, image) state)."""
    ds = copy.copy(ds)
    ds.set_epoch(VIEW_EPOCH + view)
    gen = torch.Generator().manual_seed(cfg.seed)  # the workers' base seed, so the global RNG is not used
    return data.make_loader(_Batches(ds, batches), None, cfg.data.num_workers, generator=gen, pin_memory=rt.pin_memory)


def _store(split: cache.Split, ds: data.ImageDataset, views: int, part: str, key_base: dict, cfg: Config,
           rt: runtime.Runtime, log: Log, show: bool, eager: bool) -> cache.Store:
    """The activations of ``part``: read back from the cache folder when complete there, else an
    empty store of the full size (in memory when it fits train.cache_budget_mb, else a file),
    filled here when ``eager``."""
    t = cfg.train
    key = cache.cache_key({**key_base, "part": part, "views": views, "files": cache.file_identity(ds.source.ids)})
    with cache.frozen_modes(split.model):
        shape = split.prefix(rt.images(ds[0][0][None])).shape[1:] if len(ds) else (0,)
    need = cache.size_of(views, len(ds), shape)
    in_memory = t.feature_cache != "disk" and need <= t.cache_budget_mb * 2**20
    # under torchrun the cache folder is how rank 0's activations reach the other processes
    on_disk = t.feature_cache in ("disk", "auto") or not in_memory or distributed.world_size() > 1
    folder = cache_folder(t.cache_dir)
    if on_disk:  # a cache folder that is a file (or read-only) is the user's to fix, said before any work
        files.check_folder_writable(folder, "train.cache_dir" if t.cache_dir else "$XDG_CACHE_HOME (train.cache_dir "
                                    "unset)" if os.environ.get("XDG_CACHE_HOME") else "~/.cache (train.cache_dir unset)",
                                    hint="set train.cache_dir to a writable folder, or train.feature_cache=memory")
        found = cache.load_disk(folder, key, in_memory)
        if found is not None:
            log(f"feature cache: {part} activations read from {folder}")
            return found
    store = cache.Store.allocate(views, len(ds), shape, in_memory=in_memory, disk=(folder, key) if on_disk else None)
    if eager:
        for v in range(views):
            shown = progress.counter(f"caching {part} activations", len(ds), show, log)
            try:
                cache.fill(split, v, _seeded(ds, v, cfg, rt), store, len(ds), views, rt.images, on_batch=shown.update)
            finally:
                shown.close()
    return store


def _seeded(ds: data.ImageDataset, view: int, cfg: Config, rt: runtime.Runtime):
    """One pass over ``ds`` in order, augmented as view ``view`` (the same for any data.num_workers)."""
    ds = copy.copy(ds)
    ds.set_epoch(VIEW_EPOCH + view)
    gen = torch.Generator().manual_seed(cfg.seed)  # the workers' base seed, so the global RNG is not used
    yield from data.make_loader(ds, cfg.data.batch_size, cfg.data.num_workers, generator=gen, pin_memory=rt.pin_memory)


def pooled_features(cfg: Config, bb: models.Backbone, source: data.Source, rt: runtime.Runtime, log: Log,
                    show: bool) -> torch.Tensor:
    """[N, D] features of ``source`` as the head sees them (the eval pipeline, the backbone's
    pooled output), through the feature cache: a second look at the same files reads them back."""
    model = bb.model.eval()
    head = set(models.head_paths(model))
    for n, p in model.named_parameters():  # the cut falls before the head: everything else is the prefix
        p.requires_grad_(any(n.startswith(h + ".") for h in head))
    pre = bb.preprocess
    ds = data.ImageDataset(source, transforms.eval_transform(pre), pre.resize_size)
    if len(ds) == 0:
        return torch.zeros(0, 0)
    sample = torch.stack([ds[i][0] for i in range(min(2, len(ds)))])
    split, why = cache.find_split(model, rt.images(sample), models.logits_of)
    if split is None:  # no verified cut: one uncached pass with the head's input captured
        log(f"feature cache: off ({why})")
        return _head_inputs(model, ds, cfg, rt)
    store = _store(split, ds, 1, "val", _key_base(bb, split.boundary), cfg, rt, log, show, eager=True)
    x = store.batch(0, range(len(ds)))
    return _pooled(x)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """One vector per image: a spatial map is averaged over its positions."""
    if x.ndim == 4 and x.shape[2] * x.shape[3] > 1:
        x = x.mean(dim=(2, 3))
    return x.flatten(1).float()


@torch.inference_mode()
def _head_inputs(model: nn.Module, ds: data.ImageDataset, cfg: Config, rt: runtime.Runtime) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    hook = models.head_module(model).register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0].detach().float().cpu()))
    try:
        for images, _ in data.make_loader(ds, cfg.data.batch_size, cfg.data.num_workers, pin_memory=rt.pin_memory):
            with rt.autocast():
                model(rt.images(images))
    finally:
        hook.remove()
    return _pooled(torch.cat(captured))

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
from typing import Callable

import torch
from torch import nn

from .. import __version__, files, models, progress
from ..config import Config
from ..data import folders as data
from ..data import transforms
from ..training import cache, distributed, runtime

Log = Callable[[str], None]


@dataclass
class Cached:
    """The trainable rest of the model and its loaders over stored activations."""

    rest: nn.Module
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    views: cache.CachedFeatures


def cache_folder(setting: str | None) -> Path:
    """``train.cache_dir``, else $XDG_CACHE_HOME/cnnft/features, else ~/.cache/cnnft/features."""
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnft" / "features"


def setup(cfg: Config, bb: models.Backbone, frozen: list[str], bundle: data.DataBundle, sampler: data.EpochSampler,
          rt: runtime.Runtime, log: Log, show: bool, part: str = "") -> Cached | None:
    """Cached training for this run, or None (the log says why) when it does not apply.
    ``part`` names what the activations are for in the log and the cache key ("head": the
    head phase's features)."""
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
    views = 1 if cfg.data.augment == "none" else _views(t.cache_views, split.rest, bb.model)
    key_base = _key_base(bb, split.boundary)
    # the validation activations depend on the cut and the eval pipeline only: the head phase
    # and the strategy's epochs share them
    val = _store(split, eval_ds, 1, "val", key_base, cfg, rt, log, show)
    train_tf = transforms.train_transform(pre, cfg.data.augment, cfg.data.hflip)
    train_ds = data.ImageDataset(bundle.train, train_tf, pre.resize_size, seed=cfg.seed)
    train = _store(split, train_ds, views, f"{part} train".strip(),
                   {**key_base, "augment": cfg.data.augment, "hflip": cfg.data.hflip, "seed": cfg.seed,
                    "draws": "per-image"},  # views drawn per (seed, view, image); earlier caches drew otherwise
                   cfg, rt, log, show)
    aug = f"{views} augmented view(s) per image, one per epoch in turn" if views > 1 else "one view per image"
    log(f"feature cache{' (' + part + ' phase)' if part else ''}: the frozen layers up to {split.boundary} run once; training reads stored "
        f"activations ({aug}; {(val.nbytes + train.nbytes) / 2**20:.0f} MiB)")
    train_ds = cache.CachedFeatures(train, bundle.train.labels, views)
    val_ds = cache.CachedFeatures(val, bundle.val.labels, 1)
    val_loader = cache.cached_loader(val_ds, _val_sampler(sampler, len(val_ds)), cfg.data.batch_size)
    return Cached(split.rest, cache.cached_loader(train_ds, sampler, cfg.data.batch_size), val_loader, train_ds)


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


def _seeded(ds: data.ImageDataset, view: int, cfg: Config, rt: runtime.Runtime):
    """One pass over ``ds`` in order, augmented as view ``view`` (the same for any data.num_workers)."""
    ds = copy.copy(ds)
    ds.set_epoch(VIEW_EPOCH + view)
    gen = torch.Generator().manual_seed(cfg.seed)  # the workers' base seed, so the global RNG is not used
    yield from data.make_loader(ds, cfg.data.batch_size, cfg.data.num_workers, generator=gen, pin_memory=rt.pin_memory)


def _store(split: cache.Split, ds: data.ImageDataset, views: int, part: str, key_base: dict, cfg: Config,
           rt: runtime.Runtime, log: Log, show: bool) -> cache.Store:
    t = cfg.train
    key = cache.cache_key({**key_base, "part": part, "views": views, "files": cache.file_identity(ds.source.ids)})
    sample = split.prefix(rt.images(ds[0][0][None])) if len(ds) else None
    need = 0 if sample is None else views * len(ds) * sample[0].numel() * 4
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
    loaders = [_seeded(ds, v, cfg, rt) for v in range(views)]
    bar = progress.bar(range(views * len(ds)), f"caching {part} activations", show) if show else None
    counter = iter(bar) if bar is not None else None

    def tick(n: int) -> None:
        if counter is not None:
            for _ in range(n):
                next(counter, None)

    return cache.compute(split, loaders, len(ds), rt.images, disk=(folder, key) if on_disk else None,
                         in_memory=in_memory, on_batch=tick)


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
    store = _store(split, ds, 1, "val", _key_base(bb, split.boundary), cfg, rt, log, show)
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

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

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
VERIFY_TOLERANCE = 1e-4  # max abs logit difference (relative to the logits' scale) of a valid cut
HALF_ABOVE_VALUES = 4096  # activations wider than this per image are stored in fp16 on disk


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


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new


def _shallow_path_copy(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` in which the containers on the way to ``names`` are new objects,
    so their entries can be replaced; every other module (and every parameter) is shared."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    copied = {"": root}
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            path = ".".join(parts[:depth])
            if path not in copied:
                parent = copied[".".join(parts[:depth - 1])]
                clone = copy.copy(parent._modules[parts[depth - 1]])
                clone._modules = dict(clone._modules)
                parent._modules[parts[depth - 1]] = clone
                copied[path] = clone
    return root


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
    shell = _shallow_path_copy(model, names)
    inject = _Inject()
    _replace(shell, names[0], inject)
    for n in names[1:]:
        _replace(shell, n, _Pass())
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
    scale = max(float(full.abs().max()), 1.0)
    if full.shape != cut.shape or float((full - cut).abs().max()) > VERIFY_TOLERANCE * scale:
        return None, f"the forward pass after {names[-1]} does not reproduce the model's output"
    return fold_batchnorm(split, sample), f"cut after {names[-1]}"


def _conv_bn_pairs(split: Split, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names in the prefix where the BatchNorm takes exactly the
    convolution's output, as the forward pass on ``sample`` shows; each of the two runs once."""
    inside = tuple(split.modules)
    outputs: dict[int, str] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def ran(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    def after_conv(name: str, out) -> None:
        ran(name)
        outputs[id(out)] = name

    def before_bn(name: str, args) -> None:
        ran(name)
        if args and id(args[0]) in outputs:
            pairs.append((outputs[id(args[0])], name))

    handles = []
    for name, m in split.model.named_modules():
        if not any(name == n or name.startswith(n + ".") for n in inside) \
                or any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda _m, _a, out, n=name: after_conv(n, out)))
        elif isinstance(m, nn.BatchNorm2d) and _bn_replacement(m) is not None:
            handles.append(m.register_forward_pre_hook(lambda _m, args, n=name: before_bn(n, args)))
    try:
        split.prefix(sample)
    finally:
        for h in handles:
            h.remove()
    convs = [c for c, _ in pairs]
    return [(c, b) for c, b in pairs if calls[c] == calls[b] == 1 and convs.count(c) == 1]


def _bn_replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a BatchNorm once folded into the convolution before it: nothing, or the
    activation of timm's BatchNormAct2d; None for another subclass (not folded)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None


def fold_batchnorm(split: Split, sample: torch.Tensor) -> Split:
    """The split with each frozen convolution of the prefix merged with the BatchNorm after it
    (y = BN(conv(x)) is one convolution with scaled weights and a bias when the statistics are
    fixed): one pass over each activation less, 10-20% of an EfficientNet forward on CPU.
    Only the runner of ``prefix`` changes (a copy that shares all other modules); the merged
    prefix must reproduce the activation of the unmerged one, else the split is kept as it is."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    try:
        with torch.no_grad():
            pairs = _conv_bn_pairs(split, sample)
            if not pairs:
                return split
            runner = _shallow_path_copy(split.model, [n for pair in pairs for n in pair])
            for conv_name, bn_name in pairs:
                conv, bn = split.model.get_submodule(conv_name), split.model.get_submodule(bn_name)
                fused = copy.copy(conv)
                fused._parameters = dict(conv._parameters)
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
                fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) \
                    and not conv.weight.is_contiguous() else torch.contiguous_format
                fused.weight = nn.Parameter(weight.detach().contiguous(memory_format=fmt), requires_grad=False)
                fused.bias = nn.Parameter(bias.detach(), requires_grad=False)
                _replace(runner, conv_name, fused)
                _replace(runner, bn_name, _bn_replacement(bn))
            merged = Split(split.model, split.boundary, split.modules, split.rest, runner)
            want, got = split.prefix(sample).float(), merged.prefix(sample).float()
    except Exception:  # noqa: BLE001 - an architecture the merge does not understand: run it unmerged
        return split
    scale = max(float(want.abs().max()), 1.0)
    if want.shape != got.shape or not bool(torch.isfinite(got).all()) \
            or float((want - got).abs().max()) > VERIFY_TOLERANCE * scale:
        return split
    return merged


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


class Store:
    """Activations of ``views`` passes over ``n`` samples: a tensor in memory, or a memory
    map of a .npy file on disk."""

    def __init__(self, data: torch.Tensor | np.ndarray) -> None:
        self.data = data

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if isinstance(self.data, np.ndarray) else self.data.numel() * self.data.element_size()

    def batch(self, view: int, idx: Sequence[int]) -> torch.Tensor:
        if isinstance(self.data, np.ndarray):
            rows = np.sort(np.asarray(idx))
            order = np.argsort(np.argsort(np.asarray(idx)))
            return torch.from_numpy(np.ascontiguousarray(self.data[view, rows][order])).float()
        return self.data[view, torch.as_tensor(list(idx))].float()


def _disk_paths(folder: Path, key: str) -> tuple[Path, Path]:
    return folder / f"{key}.npy", folder / f"{key}.json"


def load_disk(folder: Path, key: str, in_memory: bool) -> Store | None:
    """The stored activations for ``key`` if complete (its .json is written last)."""
    arr_path, meta_path = _disk_paths(folder, key)
    if not (arr_path.is_file() and meta_path.is_file()):
        return None
    try:
        arr = np.load(arr_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return Store(torch.from_numpy(np.array(arr)) if in_memory else arr)


def compute(
    split: Split,
    loaders: Sequence[Iterator],
    n: int,
    to_device: Callable[[torch.Tensor], torch.Tensor],
    *,
    disk: tuple[Path, str] | None = None,
    in_memory: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Store:
    """Run the prefix over every batch of every view (one loader per view, in sample order)
    and store the activations; on disk (``(folder, key)``) they are written atomically."""
    chunks: list[list[torch.Tensor]] = []
    was_training = split.model.training
    split.model.eval()
    try:
        with torch.inference_mode():
            for loader in loaders:
                view = []
                for images, _ in loader:
                    view.append(split.prefix(to_device(images)).float().cpu())
                    if on_batch:
                        on_batch(len(images))
                chunks.append(view)
    finally:
        split.model.train(was_training)
    data = torch.stack([torch.cat(v) for v in chunks])
    assert data.shape[1] == n, (data.shape, n)
    if disk is None:
        return Store(data.contiguous())
    folder, key = disk
    folder.mkdir(parents=True, exist_ok=True)
    arr = data.numpy()
    if arr[0, 0].size > HALF_ABOVE_VALUES:
        arr = arr.astype(np.float16)
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    arr_path, meta_path = _disk_paths(folder, key)
    atomic_write_bytes(arr_path, buf.getvalue())
    atomic_write_json(meta_path, {"shape": list(arr.shape), "dtype": str(arr.dtype)})
    return load_disk(folder, key, in_memory) or Store(data)


class CachedFeatures(Dataset):
    """Stored activations as a dataset whose items are whole batches (lists of indices):
    ``view_of_epoch`` picks which augmented view an epoch trains on."""

    def __init__(self, store: Store, labels: Sequence[int], views: int) -> None:
        self.store, self.labels, self.views = store, torch.as_tensor(list(labels)), views
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]):
        return self.store.batch(self.view, idx), self.labels[torch.as_tensor(idx)]


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


def cached_loader(ds: CachedFeatures, sampler: Sampler[int], batch_size: int) -> DataLoader:
    """Batches of stored activations in ``sampler``'s order (no worker processes: indexing
    memory is faster than handing batches between processes)."""
    return DataLoader(ds, sampler=_Batches(sampler, batch_size), batch_size=None, num_workers=0)

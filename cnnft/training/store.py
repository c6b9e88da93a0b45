"""Where stored activations live: one preallocated array per part, filled as it is computed.

The array (``views x n x activation``) is made at its final size before the first batch runs:
a tensor in memory when the whole of it fits ``train.cache_budget_mb``, else a memory map of a
.npy file on disk. Each batch of activations is written into its rows as soon as the prefix
computes it, so a view is never held twice (no list of batches stacked at the end), and rows are
filled in any order: a view can be computed in the epoch that first trains on it. Activations
wider than :data:`HALF_ABOVE_VALUES` per image are kept in fp16.

A memory-mapped store hands its pages back to the system after every :data:`RELEASE_EVERY`
bytes read or written, so that a store larger than memory costs the process a bounded amount of
it. A store is saved under its key (its .json written last) once every view is complete; a
partial one is never read back.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import NoSpaceError
from ..files import atomic_write_json, human_size

HALF_ABOVE_VALUES = 4096  # activations wider than this per image are stored in fp16
RELEASE_EVERY = 8 * 2**20  # bytes passed through a memory map before its pages are handed back
SPARE_BYTES = 64 * 2**20  # room left on the disk beyond a new store


def row_dtype(shape: Sequence[int]) -> np.dtype:
    """The dtype that activations of this per-image shape are stored in."""
    return np.dtype(np.float16 if math.prod(shape) > HALF_ABOVE_VALUES else np.float32)


def size_of(views: int, n: int, shape: Sequence[int]) -> int:
    """Bytes a store of ``views`` passes over ``n`` images of this activation shape takes."""
    return views * n * math.prod(shape) * row_dtype(shape).itemsize


def disk_paths(folder: Path, key: str) -> tuple[Path, Path]:
    """The array and its completion record (written last)."""
    return folder / f"{key}.npy", folder / f"{key}.json"


def _partial_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.partial.npy"


def check_space(folder: Path, need: int) -> None:
    """Refuse, before anything is computed, a store that the disk holding ``folder`` cannot take."""
    free = shutil.disk_usage(folder).free
    if free < need + SPARE_BYTES:
        raise NoSpaceError(
            f"the feature cache in {folder} needs {human_size(need)} ({need:,} bytes) and the disk has "
            f"{human_size(free)} free", needed=need,
            hint=f"free at least {human_size(need + SPARE_BYTES - free)} there, set train.cache_dir to "
                 "another disk, or set train.feature_cache=off to train without stored activations")


class Store:
    """Activations of ``views`` passes over ``n`` samples: a tensor in memory, or a memory map of
    a .npy file on disk; ``filled`` marks the rows written so far (a loaded store is full)."""

    def __init__(self, data: torch.Tensor | np.ndarray, filled: np.ndarray | None = None,
                 target: tuple[Path, str] | None = None) -> None:
        self.data = data
        self.filled = np.ones(tuple(data.shape[:2]), bool) if filled is None else filled
        self.target = target  # (folder, key) it is saved under once complete
        self._passed = 0

    @classmethod
    def allocate(cls, views: int, n: int, shape: Sequence[int], *, in_memory: bool,
                 disk: tuple[Path, str] | None = None) -> "Store":
        """An empty store; on disk (``in_memory`` False) its file is made at full size (sparse) after
        the disk is checked to hold it. With ``disk`` it is saved there once complete."""
        dtype = row_dtype(shape)
        full = (views, n, *shape)
        if in_memory:
            data: torch.Tensor | np.ndarray = torch.empty(full, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
        else:
            folder, key = disk
            folder.mkdir(parents=True, exist_ok=True)
            check_space(folder, size_of(views, n, shape))
            data = np.lib.format.open_memmap(_partial_path(folder, key), mode="w+", dtype=dtype, shape=full)
        return cls(data, np.zeros((views, n), bool), disk)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) if isinstance(self.data, np.ndarray) else self.data.numel() * self.data.element_size()

    @property
    def views(self) -> int:
        return int(self.data.shape[0])

    def complete(self, view: int | None = None) -> bool:
        """Every row of ``view`` (of every view when None) is stored."""
        return bool(self.filled.all() if view is None else self.filled[view].all())

    def write(self, view: int, idx: Sequence[int], acts: torch.Tensor) -> torch.Tensor:
        """Store the activations of samples ``idx`` for ``view``; return them as a later read does
        (in the store's precision), so computed and stored batches train alike."""
        rows = np.asarray(idx, dtype=np.int64)
        if isinstance(self.data, np.ndarray):
            values = acts.detach().float().cpu().numpy().astype(self.data.dtype)
            self.data[view, rows] = values
            out = torch.from_numpy(values).float()
            self._passed_through(values.nbytes)
        else:
            values = acts.detach().cpu().to(self.data.dtype)
            self.data[view, torch.from_numpy(rows)] = values
            out = values.float()
        self.filled[view, rows] = True
        if self.target is not None and self.complete():
            self._save()
        return out

    def batch(self, view: int, idx: Sequence[int]) -> torch.Tensor:
        """The stored activations of samples ``idx`` for ``view``, in that order, as fp32."""
        if isinstance(self.data, np.ndarray):
            order = np.asarray(idx)
            rows = np.sort(order)
            back = np.argsort(np.argsort(order))
            values = np.ascontiguousarray(self.data[view, rows][back])
            self._passed_through(values.nbytes)
            return torch.from_numpy(values).float()
        return self.data[view, torch.as_tensor(list(idx))].float()

    def _passed_through(self, n: int) -> None:
        self._passed += n
        if self._passed >= RELEASE_EVERY:
            self.release()

    def release(self) -> None:
        """Hand the pages of a memory-mapped store back to the system (written ones are flushed
        first); the next access reads them from the file again."""
        self._passed = 0
        mapped = getattr(self.data, "_mmap", None)
        if mapped is None or not hasattr(mapped, "madvise"):
            return
        if self.data.flags.writeable:
            self.data.flush()
        mapped.madvise(mmap.MADV_DONTNEED)

    def _save(self) -> None:
        """The complete store under its key: the memory map renamed into place, or the tensor
        written out; the .json last, so that a reader never takes a partial array."""
        folder, key = self.target
        arr_path, meta_path = disk_paths(folder, key)
        if isinstance(self.data, np.ndarray):
            self.data.flush()
            os.replace(_partial_path(folder, key), arr_path)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            check_space(folder, self.nbytes)
            tmp = folder / f".{arr_path.name}.tmp"
            try:
                with open(tmp, "wb") as f:
                    np.save(f, self.data.numpy())  # the tensor's own memory, written without a copy
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, arr_path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        atomic_write_json(meta_path, {"shape": list(self.data.shape), "dtype": str(self.data.dtype).replace("torch.", "")})
        self.target = None


def load_disk(folder: Path, key: str, in_memory: bool) -> Store | None:
    """The stored activations for ``key`` if complete (its .json is written last): read into
    memory, or mapped read-only."""
    arr_path, meta_path = disk_paths(folder, key)
    if not (arr_path.is_file() and meta_path.is_file()):
        return None
    try:
        arr = np.load(arr_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if not in_memory:
        return Store(arr)
    data = torch.from_numpy(np.fromfile(arr_path, dtype=arr.dtype, offset=arr.offset).reshape(arr.shape))
    del arr
    return Store(data)

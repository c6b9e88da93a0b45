"""Where and how models run: one policy shared by training and inference.

Device choice (auto -> CUDA, else Apple MPS, else CPU), mixed precision (CUDA only: bf16 on
a CPU without native support is two orders of magnitude slower than fp32), memory format
(channels_last: faster convolutions on CPU and GPU) and loader settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

DEVICE_TYPES = ("cpu", "cuda", "mps")  # what cnnft runs on; torch knows more names (meta, xpu...)


def resolve_device(spec: str, option: str = "train.device") -> torch.device:
    """auto -> CUDA when present, else Apple MPS, else CPU; a missing device is an input error
    that names ``option``, where the value came from."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    use = f"{option}=" if "." in option else f"{option} "
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise InputError(f"{option}: {spec!r} is not a device cnnft can run on",
                         hint=f"use {use}auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{option}: {spec} requested but CUDA is not available", hint=f"use {use}auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise InputError(f"{option}: {spec} requested but this machine has {n} CUDA device(s)",
                         hint=f"use cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}, or {use}auto")
    if dev.type == "mps" and not mps_ok:
        raise InputError(f"{option}: {spec} requested but Apple MPS is not available", hint=f"use {use}auto or cpu")
    return dev


def amp_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, needs a grad scaler). Mixed precision only on CUDA: on CPU bf16 is
    far slower than fp32 here, so it is never used."""
    if not enabled or device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


@dataclass(frozen=True)
class Runtime:
    """The device a model runs on, its autocast dtype (None: fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    needs_scaler: bool = False

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device in the memory format this runtime uses."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the runtime's memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        return torch.amp.GradScaler(self.device.type) if self.needs_scaler else None


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_tuned: bool | None = None
ALLOCATOR_ENV = "CNNFT_CPU_ALLOCATOR"  # "system": leave the C allocator as it is


def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep the memory of freed tensors for the next ones (True when done).

    By default glibc serves every allocation above 128 KiB to 32 MiB with its own ``mmap`` and
    returns it to the system on free, so each activation of every forward and backward pass
    is fresh memory that the kernel must fault in page by page: measured on 2 cores by
    benchmarks/cpu_settings.py, an EfficientNet-Lite0 forward pass at batch 32 and 224 px runs
    at 49 images/s as glibc comes and 134 with this (ResNet-18 training at 112 px 1.1x). With
    ``mmap`` off and trimming off, the heap grows to the peak a training step needs and stays
    there, as PyTorch's CUDA caching allocator does on a GPU; jemalloc or tcmalloc preloaded
    (the usual advice) have the same effect. Process-wide and once; Linux with glibc only;
    ``CNNFT_CPU_ALLOCATOR=system`` opts out."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if not sys.platform.startswith("linux") or os.environ.get(ALLOCATOR_ENV, "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc's own: the parameters below are glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_tuned


def make_runtime(device: str, amp: bool, channels_last: bool, option: str = "train.device") -> Runtime:
    """The runtime for a device spec (from ``option``) and the ``train.amp`` / ``train.channels_last`` settings."""
    dev = resolve_device(device, option)
    if dev.type == "cpu":
        tune_cpu_allocator()
    if dev.type == "cuda":  # fixed input sizes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    amp_dtype, scaler = amp_settings(dev, amp)
    return Runtime(dev, amp_dtype, channels_last and dev.type != "mps", scaler)

"""Speed settings: decoding workers, reduced-size JPEG decoding, torch.compile, cuDNN autotuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnft import models
from cnnft.data import folders as data
from cnnft.data import transforms
from cnnft.recipes import train as train_recipe
from cnnft.training import runtime


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (4, 3), (16, 8)])
def test_auto_workers_follow_the_cores(monkeypatch, cores, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert data.loader_workers("auto") == expected
    assert data.loader_workers(5) == 5


def test_reduced_size_jpeg_decoding_gives_the_same_input(tmp_path):
    """A 2400x1800 photo decoded at a reduced scale (JPEG draft) feeds the model the same tensor
    shape and nearly the same pixels as a full decode."""
    yy, xx = np.mgrid[0:1800, 0:2400]
    img = np.stack([(xx / 2400 * 255), (yy / 1800 * 255), ((xx + yy) % 512 / 2)], -1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(img).save(path, quality=92)
    pre = models.Preprocess(crop_size=224, resize_size=256)
    tf = transforms.eval_transform(pre)
    drafted = data.open_image(path, draft=pre.resize_size)
    assert max(drafted.size) < 2400  # really decoded at a reduced scale
    full, reduced = tf(data.open_image(path)), tf(drafted)
    assert full.shape == reduced.shape == (3, 224, 224)
    assert float((full - reduced).abs().mean()) < 0.05  # in normalised units (std ~ 0.25 per 0.06 of range)


def test_compile_wraps_the_trained_part(tmp_path, tiny_data, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    train_recipe.train(None, [f"data.train={tiny_data}", "data.val_split=0.34", "model.backbone=resnet18",
                              "model.weights=none", "data.image_size=32", "train.epochs=1", "train.compile=true",
                              f"output_dir={tmp_path}"], log=lambda m: None)
    assert len(compiled) == 1


def test_cuda_runtime_turns_on_cudnn_autotuning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    rt = runtime.make_runtime("cuda", True, True)
    assert torch.backends.cudnn.benchmark and rt.amp_dtype == torch.bfloat16


_ALLOCATION_PROBE = r"""
import ctypes, json, sys
import torch
from cnnft.training import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
runtime.make_runtime("cpu", False, True)
before = libc.mallinfo2()
x = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: glibc would map it on its own
x.fill_(1)
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"mapped": during.hblkhd - before.hblkhd, "heap": during.arena - before.arena,
                  "kept": after.arena - before.arena}))
"""


def _allocation(env: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ALLOCATION_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator is Linux's")
def test_cpu_runtime_keeps_freed_tensor_memory_in_the_heap():
    tuned = _allocation({"CNNFT_CPU_ALLOCATOR": ""})
    # a large tensor comes from the heap, not from a mapping of its own, and stays there when freed
    assert tuned["mapped"] == 0 and tuned["heap"] >= 64 * 2**20 and tuned["kept"] >= 64 * 2**20
    system = _allocation({"CNNFT_CPU_ALLOCATOR": "system"})
    assert system["mapped"] >= 64 * 2**20  # the opt-out leaves glibc's default: one mapping per large block

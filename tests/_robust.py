"""Helpers for the robustness tests: tiny image folders, odd and broken image files, and
running the real CLI in-process (fast) or as ``python -m cnnft`` (the true entry point)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import run_cli
from PIL import Image

TRACEBACK = "Traceback (most recent call last)"


def class_image(c: int, size: int = 24, seed: int = 0) -> Image.Image:
    """A noisy RGB image whose mean colour depends on the class (so a model can learn it)."""
    rng = np.random.default_rng(seed)
    base = np.full((size, size, 3), 60 + 120 * (c % 2), dtype=np.float64)
    base[..., c % 3] += 40
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def make_dataset(root: Path, classes=("a", "b"), n: int = 4, size: int = 24, seed: int = 0) -> Path:
    """ROOT/<class>/<i>.png: ``n`` small PNGs per class."""
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            class_image(c, size, seed * 100_003 + c * 1_009 + i).save(d / f"{i:03d}.png")
    return root


def odd_mode_images(folder: Path, c: int) -> list[Path]:
    """The same picture in the modes and formats people's folders really hold; all must train."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = class_image(c, 24, 7 + c)
    arr = np.asarray(rgb)
    files = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "rgba.png": Image.fromarray(np.dstack([arr, np.linspace(0, 255, arr.shape[0] * arr.shape[1],
                                                                dtype=np.uint8).reshape(arr.shape[:2])]), "RGBA"),
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "palette.gif": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "gray.png": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "bilevel.bmp": rgb.convert("1"),
        "gray16.png": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257),
        "float.tif": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0),
        "rgb.webp": rgb,
    }
    out = []
    for name, img in files.items():
        p = folder / name
        if name == "palette.png":
            img.save(p, transparency=0)  # a palette with a transparent entry (tRNS)
        else:
            img.save(p)
        out.append(p)
    return out


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    class_image(0, size, seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def truncated_jpeg(path: Path) -> Path:
    data = jpeg_bytes(64)
    path.write_bytes(data[: len(data) // 2])
    return path


def text_as_jpeg(path: Path) -> Path:
    path.write_text("this is not a picture, just text with a .jpg name\n")
    return path


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A real, decodable 1-bit PNG of width x height pixels that compresses to a few KB-MB:
    a decompression bomb. Nothing is faked: only its size trips PIL's limit."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows_per_block = 512
    block = row * rows_per_block
    parts = [comp.compress(block) for _ in range(height // rows_per_block)]
    parts.append(comp.compress(row * (height % rows_per_block)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def deny_access(monkeypatch, *paths: Path) -> None:
    """Make ``paths`` behave as they do with mode 000 for a normal user, in this process:
    a folder cannot be listed and nothing inside it can be examined or opened; a file cannot
    be opened (its size and type can still be read). The tests run as root, for whom chmod
    000 blocks nothing, so the operating system's EACCES is simulated at the os/open layer
    that pathlib, os.walk, PIL and torch all go through."""
    denied = [os.path.abspath(p) for p in paths]

    def hit(path, inside_only: bool) -> bool:
        if isinstance(path, int):
            return False  # a file descriptor: already open
        a = os.path.abspath(os.fsdecode(os.fspath(path)))
        return any(a.startswith(d + os.sep) or (a == d and not inside_only) for d in denied)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(os.fspath(path)))

    def guard(fn, inside_only: bool):
        def wrapped(path=".", *args, **kwargs):
            if hit(path, inside_only):
                refuse(path)
            return fn(path, *args, **kwargs)
        return wrapped

    for mod, name, inside_only in [(os, "scandir", False), (os, "listdir", False), (os, "open", False),
                                   (os, "stat", True), (os, "lstat", True),
                                   (builtins, "open", False), (io, "open", False)]:
        monkeypatch.setattr(mod, name, guard(getattr(mod, name), inside_only))


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def flat_err(self) -> str:
        """stderr with runs of whitespace (including any line wrapping) collapsed."""
        return flat(self.err)


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def run_inprocess(argv: list[str], monkeypatch, capfd, cwd: Path) -> Result:
    """``cnnft ARGV`` through ``cnnft.cli.app.main`` (its error -> exit code mapping) in this process."""
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("CNNFT_DEBUG", raising=False)
    capfd.readouterr()
    return Result(*run_cli(monkeypatch, capfd, *argv))


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    # one thread: the tests run beside other work on 2 cores, where OpenMP's spinning
    # threads make tiny models ~30x slower; also keeps results bit-identical between runs
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200", NO_COLOR="1")
    env.pop("CNNFT_DEBUG", None)
    env.update(extra)
    return env


def run_subprocess(argv: list[str], cwd: Path, timeout: float = 180) -> Result:
    """The real entry point: ``python -m cnnft ARGV``."""
    proc = subprocess.run([sys.executable, "-m", "cnnft", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=subprocess_env(), timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_folders(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.iterdir() if p.is_dir()) if output_dir.is_dir() else []


def summary_of(run_dir: Path) -> dict | None:
    p = run_dir / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for a module of many tiny runs (import it into the module: autouse):
    on 2 shared cores, OpenMP threads spinning against other work make tiny models ~30x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

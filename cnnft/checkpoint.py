"""Atomic writes and safe, self-describing checkpoints.

Every file cnnft writes goes to a temporary name in the same folder, is flushed to disk and
then renamed over the target, so a crash or SIGKILL leaves either the old file or the new
one, never half of one. Checkpoints are read with ``torch.load(weights_only=True)``: a
file that needs arbitrary code to unpickle is refused, not executed.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import config as config_mod
from . import runtime
from .errors import CheckpointError, NoSpaceError

if TYPE_CHECKING:  # models imports this module (safe loading of weights files)
    from .models import Preprocess

FORMAT = "cnnft-checkpoint"
VERSION = 1


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def clean_partial_writes(folder: str | Path) -> list[Path]:
    """Remove temporary files that a killed process left behind (never the files they replace)."""
    found = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_if_full(exc, path, len(data))
        raise
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; results are shared like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _raise_if_full(exc, path, len(data))
        raise


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _raise_if_full(exc: OSError, path: Path, size: int) -> None:
    """A full disk or quota is the user's to fix, not a bug: say how much room the write needs."""
    if exc.errno in _FULL:
        why = "disk quota exceeded" if exc.errno != errno.ENOSPC else "no space left on the device"
        raise NoSpaceError(f"cannot write {path}: {why}; it needs {human_size(size)} ({size:,} bytes)",
                           needed=size, hint=f"free at least {human_size(size)} on the disk holding {path.parent}, "
                           "or write to another disk") from None


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} bytes"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save(obj: dict, path: str | Path) -> None:
    """Serialise a checkpoint dict with torch.save, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except NoSpaceError as exc:
        run = RunDir.of_checkpoint(path)
        if run is None:
            raise
        raise NoSpaceError(exc.message, needed=exc.needed,
                           hint=f"{exc.hint}; then resume the run: cnnft train --resume {run}") from None


def atomic_link(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, renamed into place atomically);
    falls back to a copy where links are not supported."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_full(exc, dst, src.stat().st_size)
        raise


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, with clear errors."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"file not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"expected a file, got a folder: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): the file was not written completely")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are noise here
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long advice on loading unsafely; keep only what was refused
        text = str(exc)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if found:
            why = f"unpickling it would call Python code ({found.group(1)}), which cnnft never runs"
        elif _looks_like_text(p):
            raise CheckpointError(f"{p} is not a readable PyTorch file: it is a text file",
                                  hint="pass a file written by torch.save(model.state_dict(), path) or by `cnnft train`") from None
        else:
            op = re.search(r"WeightsUnpickler error: \s*(.+)", text)
            why = f"it is not a plain PyTorch state dict or checkpoint ({op.group(1).strip()[:120] if op else 'unreadable pickle'})"
        raise CheckpointError(
            f"refused to load {p}: {why}",
            hint="pass a file written by torch.save(model.state_dict(), path) or by `cnnft train`, "
            "and only load files from sources you trust",
        ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file breaks the reader in many ways (KeyError for text)
        first = str(exc).splitlines()[0].split(" This is an internal miniz error")[0] if str(exc) else ""
        detail = f"{type(exc).__name__}: {first[:160]}"
        why = "it is a text file" if _looks_like_text(p) else f"truncated or corrupt? ({detail})"
        raise CheckpointError(
            f"{p} is not a readable PyTorch file: {why}",
            hint="re-copy or re-create the file; checkpoints written by `cnnft train` are in RUN_DIR/checkpoints/",
        ) from None


def _looks_like_text(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(512)
        head.decode("utf-8")
        return b"\0" not in head
    except (OSError, UnicodeDecodeError):
        return False


def load(path: str | Path) -> dict:
    """Load a cnnft checkpoint (a file, or a run folder whose best checkpoint is used)."""
    p = Path(path)
    if p.is_dir():
        run = RunDir(p)
        for cand in (run.best, run.last):
            if cand.is_file():
                p = cand
                break
        else:
            raise CheckpointError(f"{p} holds no checkpoints/best.pt or checkpoints/last.pt")
    obj = safe_torch_load(p)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{p} is not a cnnft checkpoint",
            hint="pass a checkpoint written by `cnnft train` (run_dir/checkpoints/best.pt); "
            "plain weights files go in model.weights",
        )
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{p} was written by a newer cnnft (format {obj['version']}); upgrade cnnft")
    obj["path"] = str(p)
    return obj


class RunDir:
    """Every path in a run folder, named once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:
        return str(self.root)

    config = property(lambda self: self.root / "config.yaml")
    freeze_plan = property(lambda self: self.root / "freeze_plan.json")
    metrics = property(lambda self: self.root / "metrics.csv")
    summary = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    best = property(lambda self: self.root / "checkpoints" / "best.pt")
    last = property(lambda self: self.root / "checkpoints" / "last.pt")
    tensorboard = property(lambda self: self.root / "tensorboard")
    report = property(lambda self: self.root / "report")

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "RunDir | None":
        """The run folder holding checkpoint ``path`` (RUN/checkpoints/x.pt), if it is in one."""
        p = Path(path)
        return cls(p.parent.parent) if p.parent.name == "checkpoints" else None


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on the CPU, with the run's config."""

    model: nn.Module
    name: str
    classes: list[str]
    preprocess: "Preprocess"
    checkpoint: dict
    config: config_mod.Config

    @property
    def path(self) -> Path:
        return Path(self.checkpoint["path"])

    def to_device(self, device: str) -> runtime.Runtime:
        """Move the model to ``device`` and return the runtime training used there
        (the run's precision and memory format)."""
        rt = runtime.make_runtime(device, self.config.train.amp, self.config.train.channels_last, "--device")
        rt.prepare(self.model)
        return rt

    def inference(self, device: str) -> tuple[nn.Module, runtime.Runtime]:
        """The model on ``device`` in the form that evaluates and predicts fastest: its
        BatchNorm merged into the convolutions before it (see :mod:`cnnft.fold`) where that
        gives the same logits; ``model`` itself keeps its layers."""
        from . import fold, models

        rt = self.to_device(device)
        size = self.preprocess.crop_size
        sample = rt.images(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
        return fold.for_inference(self.model, sample, models.logits_of), rt


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model a checkpoint (or run folder) describes and load its weights strictly.

    The run's config is validated again through the schema, so it is read by attribute,
    and the eval preprocessing is the weights' pipeline at the run's image size.
    """
    from . import models

    ckpt = load(path)
    cfg = config_mod.validate(ckpt["config"], source=ckpt["path"])
    bb = models.build(ckpt["model_name"], "none", ckpt["num_classes"])
    try:
        bb.model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise CheckpointError(
            f"{ckpt['path']}: the saved weights do not fit {ckpt['model_name']}: {first}",
            hint="was the checkpoint written with a different torchvision/timm version?",
        ) from None
    pre = models.Preprocess.from_dict(ckpt["preprocess"]).with_size(cfg.data.image_size)
    return LoadedModel(bb.model.eval(), ckpt["model_name"], list(ckpt["classes"]), pre, ckpt, cfg)


def rng_state() -> dict:
    """The RNG states needed for a resumed run to continue bit-for-bit."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

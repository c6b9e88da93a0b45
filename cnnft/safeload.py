"""Safe loading of PyTorch files: ``torch.load(weights_only=True)`` with clear errors. A file
that needs arbitrary code to unpickle is refused, not executed. Checkpoints and plain weights
files (model.weights) are both read through here, so it sits below both.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


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


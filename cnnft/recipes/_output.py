"""The output folder checked before any work, without importing torch (``validate`` runs it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import InputError


def check_writable(output_dir: str) -> None:
    """Fail before any work if the run folder could not be created."""
    p = Path(output_dir).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output_dir: {probe} is a file, not a folder", hint="set output_dir to a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"output_dir: {probe} is not writable", hint="set output_dir to a writable folder")
    # os.access says yes to root everywhere; /proc, /sys and read-only mounts refuse only a real try
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cnnft-probe-", dir=probe))
    except OSError as exc:
        raise InputError(f"output_dir: cannot create folders in {probe}: {exc.strerror or exc}",
                         hint="set output_dir to a writable folder") from None

"""One writer per run folder: a lock file inside it (``RUN/.lock``, holding the writer's PID)
locked with ``flock`` for as long as the writing process works on the folder.

The operating system drops a ``flock`` when its process dies, however it dies (SIGKILL, power
cut aside): a killed run leaves no stale lock behind and can be resumed at once, while a live
one refuses every second writer (``train --resume``, ``report``, ``export``, ``tune``) with the
PID that holds it. A process may take the lock of a folder it already holds (nested calls).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from ..errors import InputError

LOCK_NAME = ".lock"

_held: dict[str, list] = {}  # real path of the folder -> [fd, depth]
_scopes: list[list[str]] = []  # folders locked inside each open scope(), innermost last


def _main_rank() -> bool:
    # torchrun's other processes never write the run folder: only rank 0 takes its lock
    return os.environ.get("RANK", "0") == "0"


def acquire(root: str | Path, command: str) -> None:
    """Lock run folder ``root`` for this process (``command`` names what holds it, e.g. ``train``);
    raise InputError (exit 2) naming the holder's PID when another process holds it, or when
    the folder cannot be written. Released by :func:`release`, by the end of the
    :func:`scope` that took it, or by the process's death."""
    key = _take(root, command)
    if key is not None and _scopes:
        _scopes[-1].append(key)


def _take(root: str | Path, command: str) -> str | None:
    if not _main_rank():
        return None
    key = os.path.realpath(root)
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_lock_fd(Path(root), command), 1]
    return key


def release(root: str | Path) -> None:
    """Undo one :func:`acquire` of ``root``; the last one frees the folder."""
    _release_key(os.path.realpath(root))


def _release_key(key: str) -> None:
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor drops the flock


@contextlib.contextmanager
def hold(root: str | Path, command: str, *, reading: bool = False) -> Iterator[None]:
    """``root`` locked for the block (see :func:`acquire`): what report, export and tune use.
    ``reading``: the command only reads the folder, so one it cannot write (where no run can
    be training) is read without a lock."""
    try:
        key = _take(root, command)
    except _Unwritable:
        if not reading:
            raise
        key = None
    try:
        yield
    finally:
        if key is not None:
            _release_key(key)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Every lock taken inside the block (by whatever function) is released when it ends: a
    command's locks live as long as the command, in-process callers (tests, tune's trials)
    included."""
    _scopes.append([])
    try:
        yield
    finally:
        for key in reversed(_scopes.pop()):
            _release_key(key)


def check_free(root: str | Path, command: str) -> None:
    """Raise as :func:`acquire` would, without keeping the lock (a launcher's early check)."""
    with hold(root, command):
        pass


def _lock_fd(root: Path, command: str) -> int:
    path = root / LOCK_NAME
    try:
        # O_NOFOLLOW: a symbolic link planted as the lock file is refused, never followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _unwritable(root, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _unwritable(root, exc) from None
        raise InputError(
            f"{root} is in use: {holder} is writing this run folder; a second writer would destroy its work",
            hint=f"wait until it ends, or stop it first ({_kill_hint(holder)}); a run whose process died "
                 "is free again and resumes where it stopped") from None
    with contextlib.suppress(OSError):  # the lock holds even if the PID cannot be written (a full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} cnnft {command}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """'process 1234 (cnnft train)' from the lock file, as far as it says."""
    try:
        pid, _, what = os.pread(fd, 200, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        pid, what = "", ""
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" ({what})" if what else "")


def _kill_hint(holder: str) -> str:
    pid = holder.split()[1] if holder.startswith("process ") else None
    return f"kill {pid}" if pid else "Ctrl-C in its terminal"


class _Unwritable(InputError):
    """The lock file cannot be made: the folder is read-only (or the lock file is a link)."""


def _unwritable(root: Path, exc: OSError) -> InputError:
    if exc.errno == errno.ELOOP:
        return _Unwritable(f"{root / LOCK_NAME} is a symbolic link; cnnft does not follow links it did not make",
                          hint=f"remove it: rm {root / LOCK_NAME}")
    why = exc.strerror or str(exc)
    return _Unwritable(f"{root}: cannot write in this run folder ({why}); nothing was done",
                      hint="make the folder writable (or copy the run to a writable place) and run the command again")

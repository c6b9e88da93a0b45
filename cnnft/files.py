"""Every file cnnft writes, written one way: to a temporary name in the same folder, flushed
to disk and renamed over the target, so a crash or SIGKILL leaves either the old file or the
new one, never half of one; a full disk is reported with the room the write needs. No torch:
``validate`` checks the output folder with this module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, NoSpaceError


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


def atomic_write_bytes(path: str | Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.
    A symbolic link at ``path`` is replaced, never followed. ``replace=False``: refuse (InputError)
    a file that appeared at ``path`` meanwhile instead of replacing it."""
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
        _put(tmp, path, replace)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            _raise_if_full(exc, path, len(data))
        raise


def _put(tmp: str, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no check-then-write race
    except FileExistsError:
        raise InputError(f"{path} appeared while it was being written; nothing was replaced",
                         hint="choose another file name, or pass --force to replace it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(tmp, path)  # no hard links on this file system
        return
    os.unlink(tmp)


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


def atomic_folder(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Make folder ``path`` whole or not at all: ``fill`` writes into a temporary folder beside
    it, which then takes its place (an existing folder is replaced: the caller asked --force)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, _FILE_MODE | 0o111)  # mkdtemp makes 0700 folders
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).is_dir() and not path.exists():
            os.replace(old / path.name, path)  # the previous folder comes back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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


def check_output(path: str | Path, option: str, *, force: bool = False, inputs: tuple = (),
                 forbidden: tuple = ()) -> Path:
    """The one guard of every file a command writes where the user says (``--out FILE``),
    checked before any work: not a folder, not a symbolic link (cnnft replaces only files it
    could have made), not one of the ``inputs`` the command reads, not inside one of the
    ``forbidden`` folders, not an existing file unless ``force``, and in a place that can be
    written (its nearest existing folder is tried for real). Returns the path to write with
    :func:`write_output`."""
    out = Path(path).expanduser()
    hint = f"choose another {option} file"
    if os.path.islink(out):
        raise InputError(f"{option}: {out} is a symbolic link; cnnft does not write through or over links it did "
                         "not make", hint=f"{hint}, or remove the link")
    if out.is_dir():
        raise InputError(f"{option}: {out} is a folder", hint=f"give a file name, e.g. {option} {out / 'out'}")
    read = _same_as(out, inputs)
    if read is not None:
        same = "" if os.path.normpath(read) == os.path.normpath(out) else f" ({read})"
        raise InputError(f"{option}: {out} is a file this command reads{same}; cnnft never writes over "
                         "its own input", hint=hint)
    _refuse_inside(out, option, forbidden, hint)
    if os.path.lexists(out) and not force:
        raise InputError(f"{option}: {out} already exists; nothing was written",
                         hint=f"{hint}, or pass --force to replace it")
    check_folder_writable(out.parent, option)
    return out


def check_output_folder(path: str | Path, option: str, *, forbidden: tuple = ()) -> Path:
    """The guard of a folder a command writes its results in where the user says (``--out DIR``),
    checked before any work: not a file, not a symbolic link, not inside one of the ``forbidden``
    folders (the data it reads, a run's checkpoints), and writable. Returns the path."""
    out = Path(path).expanduser()
    hint = f"choose another {option} folder"
    if os.path.islink(out):
        raise InputError(f"{option}: {out} is a symbolic link; cnnft does not write through links it did not make",
                         hint=f"{hint}, or remove the link")
    if os.path.lexists(out) and not out.is_dir():
        raise InputError(f"{option}: {out} is a file, not a folder", hint=hint)
    _refuse_inside(out, option, forbidden, hint)
    check_folder_writable(out, option)
    return out


def _refuse_inside(out: Path, option: str, forbidden: tuple, hint: str) -> None:
    """An InputError when ``out`` is one of the ``forbidden`` folders or lies inside one."""
    target = _real(out)
    for folder in forbidden:
        if folder is not None and _real(Path(folder).expanduser()) in (target, *target.parents):
            raise InputError(f"{option}: {out} is inside {folder}, which this command must not write in; "
                             "nothing was written", hint=hint)


def write_output(path: Path, data: bytes, *, force: bool) -> None:
    """Write a file :func:`check_output` passed: atomically, its folder made if needed, and
    never over a file that appeared since unless ``force``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    atomic_write_bytes(path, data, replace=force)


def check_folder_writable(folder: str | Path, what: str, hint: str | None = None) -> None:
    """Fail before any work when files cannot be made in ``folder`` (or, if it does not exist
    yet, in its nearest existing parent, where it would be made)."""
    probe = Path(folder).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{what}: {probe} is a file, not a folder", hint=hint or f"give {what} a place inside a folder")
    try:  # os.access says yes to root everywhere: only a real try tells a read-only mount
        fd, tmp = tempfile.mkstemp(prefix=".cnnft-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"{what}: cannot write in {probe}: {exc.strerror or exc}; nothing was done",
                         hint=hint or f"make {probe} writable, or write somewhere else") from None


def _same_as(out: Path, inputs: tuple) -> str | None:
    """The input that ``out`` is (the same file, by any name), if any: only an existing ``out`` can be."""
    try:
        st = os.stat(out)
    except OSError:
        return None
    for inp in inputs:
        try:
            other = os.stat(inp)
        except (OSError, TypeError):
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return str(inp)
    return None


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))

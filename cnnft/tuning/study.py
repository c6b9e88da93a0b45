"""The Optuna study of a search: its storage, its pruner, its shared clock and its records.

Storages are Optuna's, not a scheduler of our own: a journal file in the tune folder by default
(several processes on one machine share it through file locks); ``postgresql://`` (or
``mysql://``) for many machines, with heartbeats so that a trial whose worker died is failed
and run again. SQLite is refused for parallel workers (Optuna's FAQ: "database is locked").
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError

INSTALL = "pip install 'cnnft[tune]'  (or: pip install 'optuna>=4')"
JOURNAL = "study.journal"
RETRIES = 3  # times a trial whose worker died is run again
FINISHED = ("COMPLETE", "PRUNED")


def optuna():
    """Optuna, or an exit-2 message naming the install command."""
    try:
        import optuna as _optuna
    except ImportError:
        raise InputError("cnnft tune needs Optuna, which is not installed", hint=INSTALL) from None
    _optuna.logging.set_verbosity(_optuna.logging.WARNING)
    return _optuna


def check_storage(url: str | None, workers: int) -> None:
    """Refuse what cannot work before any work: SQLite under parallel workers, unknown schemes."""
    if url is None:
        return
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite" and workers > 1:
        raise InputError(f"--storage {masked(url)}: SQLite cannot serve parallel workers (its writers lock the "
                          "whole file: 'database is locked')",
                          hint="leave --storage out for the journal file in the tune folder (one machine), or use "
                               "--storage postgresql://USER:PASSWORD@HOST/DB for many machines")
    if scheme not in ("sqlite", "postgresql", "mysql"):
        raise InputError(f"--storage {masked(url)}: unknown storage; use postgresql://USER:PASSWORD@HOST:PORT/DB "
                          "(or mysql://...), or leave it out for the journal file in the tune folder")


def masked(url: str) -> str:
    """A storage URL with its password hidden (for logs and the tune folder)."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    cred, _, host = tail.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{head}://{user}{':***' if ':' in cred else ''}@{host}"


def storage(folder: Path, url: str | None, heartbeat: int):
    """The study's storage: the journal file in ``folder``, or the database at ``url`` with
    heartbeats every ``heartbeat`` s (a trial silent for 3x that is failed and retried)."""
    opt = optuna()
    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    retry_cls = getattr(opt.storages, "RetryHeartbeatStaleTrialCallback", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks heartbeats and retries experimental
            retry = (retry_cls or opt.storages.RetryFailedTrialCallback)(max_retry=RETRIES)
            callback = {"heartbeat_stale_trial_callback": retry} if retry_cls else {"failed_trial_callback": retry}
            return opt.storages.RDBStorage(_with_driver(url), heartbeat_interval=heartbeat,
                                           grace_period=3 * heartbeat, engine_kwargs={"pool_pre_ping": True},
                                           **callback)
    except ImportError:
        raise InputError(f"--storage {masked(url)}: no database driver for it is installed",
                         hint="pip install 'cnnft[postgres]' (psycopg2) for postgresql://, or pymysql for "
                              "mysql+pymysql://") from None
    except Exception as exc:  # sqlalchemy's errors: a wrong host, user, password or database
        raise InputError(f"--storage {masked(url)}: cannot open the database: {str(exc).splitlines()[0]}",
                         hint="check that the server runs and the URL's user, password, host, port and database "
                              "are right (the database must exist)") from None


def _with_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 takes psycopg 3 for a
    bare ``postgresql://``; psycopg2 (the ``postgres`` extra) serves as well."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def pruner(kind: str, grace: int, epochs: int, factor: int):
    """Optuna's pruner for ``tune.pruner``; no trial is judged before ``grace`` epochs."""
    opt = optuna()
    if kind == "none" or grace >= epochs:
        return opt.pruners.NopPruner()
    if kind == "halving":
        return opt.pruners.SuccessiveHalvingPruner(min_resource=grace, reduction_factor=factor)
    return opt.pruners.HyperbandPruner(min_resource=grace, max_resource=epochs, reduction_factor=factor)


def open_study(name: str, store, direction: str, prune, seed: int, joined: bool = False):
    """Create the study or join it (another worker, machine or a resumed search made it); a
    joining worker samples from a seed of its own, or it would propose its peers' plans."""
    opt = optuna()
    own = seed + (1 + os.getpid() % 10_007 if joined else 0)
    sampler = opt.samplers.TPESampler(seed=own, multivariate=True)
    return opt.create_study(study_name=name, storage=store, direction=direction, pruner=prune, sampler=sampler,
                            load_if_exists=True)


def fail_stale(study) -> bool:
    """Fail the trials whose worker stopped beating (their retry is queued by the storage's
    callback); True when the storage has heartbeats and trials are still running elsewhere, whose
    fate a worker should wait to see before it leaves (one that died is retried by the survivors)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if not is_heartbeat_enabled(study._storage):
        return False
    optuna().storages.fail_stale_trials(study)
    return any(t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False))


def counted(study) -> int:
    """Trials that finished or are under way (what ``--trials`` counts); failed ones do not."""
    states = ("COMPLETE", "PRUNED", "RUNNING")
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in states)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line appended with one write() on an O_APPEND file: lines from many processes
    never interleave, and a kill leaves whole lines only."""
    data = (json.dumps(record, sort_keys=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict]:
    """The records of a trials.jsonl (a torn last line, from a full disk, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def requeue_unfinished(study, log) -> int:
    """On resume: trials left RUNNING by a stopped search, and trials failed by an interruption,
    are failed (if still running) and their plan queued again, once."""
    opt = optuna()
    done = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    n = 0
    for t in study.get_trials(deepcopy=False):
        stale = t.state.name == "RUNNING"
        if not (stale or (t.state.name == "FAIL" and t.user_attrs.get("interrupted"))) or t.number in done:
            continue
        if stale:
            study._storage.set_trial_state_values(t._trial_id, state=opt.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "retry_of": t.number, "interrupted": False},
                            skip_if_exists=False)
        n += 1
    if n:
        log(f"resume: {n} trial(s) cut short by the interruption will run again")
    return n


def deadline(study, default: float | None = None) -> float | None:
    """The search's deadline (Unix time) as the study records it for every worker."""
    return study.user_attrs.get("deadline", default)


def set_deadline(study, when: float) -> None:
    study.set_user_attr("deadline", when)


def now() -> float:
    return time.time()

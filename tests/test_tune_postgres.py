"""``cnnft tune --storage postgresql://...`` against a real PostgreSQL server: two workers (as two
machines would run them), one killed with SIGKILL in the middle of a trial; the survivor fails
the silent trial by its heartbeat, runs it again, and the study completes.

The server is Debian's ``postgresql`` package (``.ci/run`` installs it): a cluster made by
``initdb`` in a temporary folder, on a free loopback port, removed afterwards. PostgreSQL
refuses to run as root, so under root the server runs as the unprivileged user ``nobody``.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _robust import make_dataset, subprocess_env

pytestmark = pytest.mark.slow

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "nobody", "--", *cmd]


@pytest.fixture
def postgres_url():
    if not BIN:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and no unprivileged user 'nobody' to run the PostgreSQL server as")
    bindir = Path(BIN[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="cnnft-pg-", dir="/tmp"))
    os.chmod(root, 0o777)
    data, port = root / "data", _free_port()
    subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "cnnft"]),
                   check=True, capture_output=True, timeout=300)
    subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "120",
                                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True, timeout=300)
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="cnnft", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE tune")
        conn.close()
        yield f"postgresql://cnnft@127.0.0.1:{port}/tune"
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _worker(cfg: Path, url: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnft", "tune", str(cfg), "--budget", "15m", "--trials", "3",
                             "--storage", url, "--study", "pg", "--json"], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_worker_loses_no_trial(tmp_path, postgres_url):
    import optuna

    data = make_dataset(tmp_path / "data", classes=("a", "b", "c"), n=8)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: pg\noutput_dir: {tmp_path / 'runs'}\ndata: {{train: {data}, num_workers: 0, batch_size: 4}}\n"
                   "model: {backbone: lenet5, weights: none}\ntrain: {epochs: 12}\n"
                   "tune: {heartbeat: 3, pruner: none}\n")
    a = _worker(cfg, postgres_url, tmp_path)
    b = _worker(cfg, postgres_url, tmp_path)
    from cnnft.tuning.study import _with_driver

    storage = optuna.storages.RDBStorage(_with_driver(postgres_url))
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and time.monotonic() < deadline and a.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="pg", storage=storage)
        except KeyError:
            continue
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "RUNNING" and str(t.user_attrs.get("worker", "")).endswith(f":{b.pid}") \
                    and t.intermediate_values:  # b's trial has finished an epoch: it is mid-trial
                os.kill(b.pid, signal.SIGKILL)
                killed = t.number
                break
    b.wait()
    assert killed is not None, "worker b never ran a trial"
    out, err = a.communicate(timeout=900)
    assert a.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="pg", storage=storage).get_trials()
    states = {t.number: t.state.name for t in trials}
    assert states[killed] == "FAIL"  # failed by its heartbeat going silent...
    retried = [t for t in trials if killed in (t.system_attrs.get("retry_history") or [])]
    assert retried and retried[0].state.name in ("COMPLETE", "PRUNED")  # ...and run again to the end
    assert sum(s in ("COMPLETE", "PRUNED") for s in states.values()) >= 3
    summary = json.loads(out)
    assert summary["best"] is not None and summary["storage"].startswith("postgresql://cnnft@")

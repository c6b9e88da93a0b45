"""What `cnnft train` prints: a progress bar at a terminal, one plain line per epoch in logs and
with --quiet, and nothing but the JSON summary on stdout with --json."""

from __future__ import annotations

import fcntl
import json
import re
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import yaml

from conftest import make_image_folder

EPOCHS = 2


def _experiment(tmp_path: Path) -> Path:
    make_image_folder(tmp_path / "data", per_class=12)
    cfg = {
        "name": "out", "output_dir": "runs", "seed": 0,
        "data": {"train": "data", "val_split": 0.25, "image_size": 32, "batch_size": 4,
                 "num_workers": 0, "augment": "none"},
        "model": {"backbone": "resnet18", "weights": "none"},
        "train": {"epochs": EPOCHS, "lr": 0.01},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(TERM="xterm")
    env.pop("COLUMNS", None)
    return env


def _run_in_terminal(argv: list[str], cwd: Path, columns: int) -> tuple[int, str]:
    """Run ``cnnft ARGV`` with a pseudo-terminal as stdout and stderr; return its exit code and screen."""
    leader, follower = pty.openpty()
    # a terminal window reports its size; a bare pseudo-terminal (some containers, CI) reports 0 x 0
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40 if columns else 0, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cnnft", *argv], cwd=cwd, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("columns", [120, 0], ids=["sized-window", "unsized-pty"])
def test_terminal_gets_a_progress_bar(tmp_path, columns):
    exp = _experiment(tmp_path)
    code, screen = _run_in_terminal(["train", "cfg.yaml"], exp, columns)
    assert code == 0, screen
    # tqdm redraws its bar in place: "\repoch 1/2:  50%|#####     | 5/10 [00:01<00:01, 4.2it/s, loss=...]"
    bars = [part for part in screen.split("\r") if part.startswith("epoch 1/2: ") and "it/s" in part]
    assert bars and "%|" in bars[-1] and "loss=" in "".join(bars), screen
    assert "best val acc" in screen


def test_logs_get_one_plain_line_per_epoch(tmp_path):
    exp = _experiment(tmp_path)
    for extra in ([], ["--quiet"]):
        proc = subprocess.run([sys.executable, "-m", "cnnft", "train", "cfg.yaml", *extra],
                              cwd=exp, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "\r" not in proc.stderr and "it/s" not in proc.stderr, "no progress bar in a log"
        epoch_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epoch ")]
        assert [ln.split()[1] for ln in epoch_lines] == [f"{e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
        assert all("train loss" in ln and "val loss" in ln for ln in epoch_lines)
        run = proc.stdout.rsplit("-> ", 1)[1].strip()  # the summary line names the run folder
        assert f"next: cnnft evaluate {run} | cnnft report {run}" in proc.stderr


def test_json_prints_only_the_summary_on_stdout(tmp_path):
    exp = _experiment(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cnnft", "train", "cfg.yaml", "--json"],
                          cwd=exp, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert summary["status"] == "completed" and summary["epochs_completed"] == EPOCHS
    assert Path(exp / summary["run_dir"]).resolve() == (exp / "runs" / "out").resolve()


def test_predict_evaluate_extract_show_a_bar_at_a_terminal_only(tmp_path):
    exp = _experiment(tmp_path)
    trained = subprocess.run([sys.executable, "-m", "cnnft", "train", "cfg.yaml", "train.epochs=1", "-q"],
                             cwd=exp, env=_env(), capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    for argv, desc in ((["predict", "runs/out", "data", "--batch-size", "4"], "predict"),
                       (["evaluate", "runs/out", "--batch-size", "4"], "evaluate"),
                       (["extract", "runs/out", "--data", "data", "--out", "f.npz", "--batch-size", "4", "--force"], "extract")):
        code, screen = _run_in_terminal(argv, exp, 120)
        assert code == 0, screen
        assert any(part.startswith(f"{desc}: ") and re.search(r"(it|image)/s", part) for part in screen.split("\r")), screen
        code, screen = _run_in_terminal([*argv, "--json"], exp, 120)
        assert code == 0, screen
        assert not re.search(r"(it|image)/s", screen), "scripted output stays quiet"
        json.loads(screen[screen.index("{"):])  # the JSON document is all that is printed

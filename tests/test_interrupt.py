"""Interrupted runs lose nothing.

* Ctrl-C (SIGINT) or SIGTERM while training saves a resumable ``last.pt``, says how to resume
  and exits 130 / 143; ``--resume`` then finishes the run with the same numbers as a run
  that was never interrupted.
* SIGKILL at any moment (no chance to clean up) never leaves a corrupt checkpoint, because
  every file is written to a temporary name and renamed; resuming from whatever is left
  reproduces the uninterrupted run's metrics exactly.

Each run is the real ``python -m cnnft train`` on a small generated dataset with a LeNet-5
(a few seconds), single-threaded so that results are bit-for-bit repeatable.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from _robust import (
    TRACEBACK,
    make_dataset,
    run_folders,
    run_subprocess,
    subprocess_env,
    summary_of,
)

pytestmark = pytest.mark.slow

EPOCHS = 3
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


class Proc:
    """``python -m cnnft ARGV`` in the background, its output collected line by line;
    ``group``: in a process group of its own, as `setsid`, `timeout` and Slurm start it."""

    def __init__(self, argv: list[str], cwd: Path, group: bool = False) -> None:
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "cnnft", *argv], cwd=cwd, env=subprocess_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=group)
        self.err: list[str] = []
        self.out: list[str] = []
        self.seen = {}
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stderr, self.err), (self.p.stdout, self.out))]
        for t in self._threads:
            t.start()


    def _pump(self, stream, buf: list[str]) -> None:
        for line in stream:
            for marker in ("parameters train", "epoch 1/", "epoch 2/", "epoch 3/"):
                if marker in line:
                    self.seen.setdefault(marker, time.monotonic() - self.t0)
            buf.append(line)

    def since(self, marker: str) -> float:
        """Seconds from ``marker``'s first appearance until now."""
        return time.monotonic() - self.t0 - self.seen[marker]

    def wait_for(self, text: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not any(text in line for line in self.err):
            if self.p.poll() is not None:
                time.sleep(0.2)  # let the reader catch up
                if any(text in line for line in self.err):
                    return
                raise AssertionError(f"exited {self.p.returncode} before printing {text!r}:\n{self.stderr}")
            if time.monotonic() > end:
                self.p.kill()
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.stderr}")
            time.sleep(0.02)

    def finish(self, timeout: float = 180) -> int:
        code = self.p.wait(timeout)
        for t in self._threads:
            t.join(10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.err)


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    """The experiment: 2 classes x 200 images, LeNet-5 from scratch, 3 epochs of 80 steps, with
    augmentation (so the RNG state must be restored too)."""
    root = tmp_path_factory.mktemp("interrupt")
    make_dataset(root / "data", n=200, size=24)
    cfg = {
        "name": "t", "output_dir": "runs", "seed": 3,
        "data": {"train": "data", "image_size": 32, "batch_size": 4, "num_workers": 0, "augment": "light"},
        "model": {"backbone": "lenet5", "weights": "none"},
        "freeze": {"strategy": "full"},
        "train": {"epochs": EPOCHS, "device": "cpu", "lr": 0.003},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def metrics_of(run_dir: Path) -> list[tuple[str, ...]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [tuple(row[k] for k in METRICS) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def baseline(exp: Path) -> dict:
    """The uninterrupted run, and when its training starts and ends (to spread the kills over)."""
    proc = Proc(["train", "cfg.yaml", "output_dir=base", "-q"], exp)
    assert proc.finish() == 0, proc.stderr
    seconds = time.monotonic() - proc.t0
    run = exp / "base" / "t"
    assert summary_of(run)["epochs_completed"] == EPOCHS
    return {"metrics": metrics_of(run), "seconds": seconds, "train_start": proc.seen["parameters train"],
            "epochs_at": [proc.seen[f"epoch {e}/"] for e in range(1, EPOCHS + 1)]}


def assert_checkpoints_sound(out: Path) -> list[str]:
    """Every last.pt/best.pt present loads as a cnnft checkpoint; returns leftover temp files."""
    from cnnft.run import checkpoint

    leftovers = []
    for run in run_folders(out):
        for name in ("last.pt", "best.pt"):
            p = run / "checkpoints" / name
            if p.exists():
                ck = checkpoint.load(p)  # raises on a torn file
                assert 0 <= ck["epoch"] <= EPOCHS
        leftovers += [str(p.relative_to(out)) for p in run.rglob("*.tmp")]
    return leftovers


def resume_until_done(exp: Path, out: str, attempts: int = 3) -> Path:
    """Resume the run in ``out`` (or start it, if the kill came before a run folder had a
    config) until it completes; return the completed run folder."""
    for _ in range(attempts):
        runs = [r for r in run_folders(exp / out) if (r / "config.yaml").is_file()]
        done = [r for r in runs if (summary_of(r) or {}).get("status") == "completed"]
        if done:
            return done[0]
        argv = ["train", "--resume", str(runs[0].relative_to(exp))] if runs else ["train", "cfg.yaml", f"output_dir={out}"]
        res = run_subprocess([*argv, "-q"], exp)
        assert res.code == 0, f"{argv}: exit {res.code}\n{res.err}"
        assert TRACEBACK not in res.err
    raise AssertionError(f"{out}: not completed after {attempts} attempts")


@pytest.mark.parametrize("sig, code, workers", [(signal.SIGINT, 130, 0), (signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 2)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-2-workers"])
def test_signal_saves_a_resumable_checkpoint(exp: Path, baseline: dict, sig: int, code: int, workers: int) -> None:
    """With loader workers too: each image's augmentation is fixed by (seed, epoch, image), so
    the resumed epoch draws what the stopped one would have, and the run matches the baseline
    (which has no workers)."""
    from cnnft.run import checkpoint

    out = f"sig{int(sig)}-w{workers}"
    proc = Proc(["train", "cfg.yaml", f"output_dir={out}", f"data.num_workers={workers}", "-q"], exp)
    proc.wait_for("parameters train")  # logged just before the stop flag is armed and the first step
    # a third into the first epoch (80 steps of a few ms each): the stop must come mid-epoch,
    # where resuming needs the saved RNG state to draw the same augmentations
    time.sleep(max(0.15, (baseline["epochs_at"][0] - baseline["train_start"]) / 3))
    proc.p.send_signal(sig)
    assert proc.finish() == code, proc.stderr
    err = proc.stderr
    run = exp / out / "t"
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert f"resume with: cnnft train --resume {Path(out) / 't'}" in err, err
    assert TRACEBACK not in err
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["epoch"] < EPOCHS and state["step"] > 0, f"not a mid-epoch stop: {state['epoch']}, {state['step']}"
    assert state["running"]["steps"] == state["step"]
    assert {"python", "numpy", "torch"} <= set(state["rng"]), "the RNG state must be saved for the resume"

    partial = run / "checkpoints" / ".last.pt.k1ll3d.tmp"  # as a kill during a save leaves it
    partial.write_bytes(b"half a checkpoint")
    res = run_subprocess(["train", "--resume", str(run.relative_to(exp)), "-q"], exp)
    assert res.code == 0, res.err
    assert "resuming" in res.err
    assert not partial.exists() and "removed a partial write" in res.err
    s = summary_of(run)
    assert s["status"] == "completed" and s["epochs_completed"] == EPOCHS
    assert [p.name for p in run_folders(exp / out)] == ["t"], "resuming must not start a new folder"
    # a mid-epoch stop resumes the very batch it stopped before: the numbers are unchanged
    print(f"{signal.Signals(sig).name}: stopped after epoch {state['epoch']}, step {state['step']}")
    assert metrics_of(run) == baseline["metrics"], f"stopped at epoch {state['epoch']} step {state['step']}"


def test_sigkill_at_random_moments_never_corrupts_and_resume_matches(exp: Path, baseline: dict) -> None:
    rng = random.Random(20_241_122)
    start, end = baseline["train_start"], baseline["epochs_at"][-1]
    # one kill while Python/torch are still starting (no run folder, no checkpoint yet), then
    # one in each quarter of the training (before, between and around the epoch-end saves)
    # (the later kills are timed from the run's own start of training, and the last quarter
    # stops short of the end, so that a slower or faster start cannot move a kill past the run)
    quarter = (end - start) / 4
    delays = [rng.uniform(0.05, 0.6)] + [rng.uniform(i * quarter, (i + 1) * quarter) * 0.95 for i in range(4)]
    report = []
    for i, delay in enumerate(delays):
        out = f"kill{i}"
        proc = Proc(["train", "cfg.yaml", f"output_dir={out}", "-q"], exp)
        if i == 0:
            time.sleep(max(0.0, delay - (time.monotonic() - proc.t0)))
        else:
            proc.wait_for("parameters train")
            time.sleep(max(0.0, delay - proc.since("parameters train")))
        proc.p.kill()
        # the kill must land while the run is alive: a run that had already finished would
        # pass everything below without testing anything
        assert proc.finish() == -signal.SIGKILL, f"kill {i} at {delay:.2f}s came after the run ended:\n{proc.stderr}"
        runs = run_folders(exp / out)
        last = [r / "checkpoints" / "last.pt" for r in runs if (r / "checkpoints" / "last.pt").exists()]
        leftovers = assert_checkpoints_sound(exp / out)
        from cnnft.run import checkpoint

        at = [checkpoint.load(p)["epoch"] for p in last]
        report.append(f"kill {i} at {delay:.2f}s{' into training' if i else ''}: run folders {[r.name for r in runs]}, "
                      f"last.pt epoch {at or 'absent'}, tmp leftovers {leftovers or 'none'}")
        run = resume_until_done(exp, out)
        assert summary_of(run)["epochs_completed"] == EPOCHS
        assert metrics_of(run) == baseline["metrics"], report[-1]
    print(f"baseline: training {start:.2f}-{end:.2f}s, epochs end at {baseline['epochs_at']}")
    print("\n".join(report))
    assert any("absent" in line for line in report[:1]), "the first kill should come before any checkpoint"


GROUP_TRIALS = 5


def test_sigterm_to_the_process_group_with_loader_workers_saves(exp: Path, baseline: dict) -> None:
    """`timeout`, `kill -- -PGID` and Slurm's scancel signal every process of the job, the
    DataLoader workers too. The workers must leave SIGTERM to the main process, which saves
    a resumable checkpoint and exits 143; a worker that died of it used to crash the run
    ("DataLoader worker (pid N) is killed by signal: Terminated", exit 1) in 3 trials of 4."""
    from cnnft.run import checkpoint

    rng = random.Random(143)
    epoch = baseline["epochs_at"][0] - baseline["train_start"]
    report = []
    for i in range(GROUP_TRIALS):
        out = f"group{i}"
        proc = Proc(["train", "cfg.yaml", f"output_dir={out}", "data.num_workers=2", "-q"], exp, group=True)
        proc.wait_for("parameters train")
        delay = rng.uniform(0.1, 1.5) * epoch  # anywhere in the first two epochs, validation included
        time.sleep(max(0.0, delay - proc.since("parameters train")))
        os.killpg(proc.p.pid, signal.SIGTERM)  # the whole group, sent from outside it
        code = proc.finish()
        report.append(f"trial {i}: SIGTERM at {delay:.2f}s into training -> exit {code}")
        assert code == 143, "\n".join(report) + "\n" + proc.stderr
        err = proc.stderr
        assert "stopped by SIGTERM" in err and "internal error" not in err and TRACEBACK not in err, err
        run = exp / out / "t"
        state = checkpoint.load(run / "checkpoints" / "last.pt")
        assert (state["epoch"], state["step"]) < (EPOCHS, 0) and {"optimizer", "rng"} <= set(state)
        res = run_subprocess(["train", "--resume", str(run.relative_to(exp)), "-q"], exp)
        assert res.code == 0 and TRACEBACK not in res.err, res.err
        s = summary_of(run)
        assert s["status"] == "completed" and s["epochs_completed"] == EPOCHS
        assert metrics_of(run) == baseline["metrics"], f"{report[-1]}: resumed with workers, not bit-exact"
    print("\n".join(report))


def test_double_sigint_names_the_last_checkpoint_and_resume_matches(exp: Path, baseline: dict) -> None:
    """Ctrl-C twice in quick succession, as an impatient user does: the second one may come
    before the first's checkpoint is written (then the run stops at once and says which
    checkpoint is the last one) or after (then it must not cut the report short). Either way:
    one message, exit 130, no traceback, and the resume command gives the uninterrupted run."""
    out = "double"
    proc = Proc(["train", "cfg.yaml", f"output_dir={out}", "-q"], exp)
    proc.wait_for("epoch 1/")  # a checkpoint exists: the second Ctrl-C has one to name
    time.sleep((baseline["epochs_at"][1] - baseline["epochs_at"][0]) / 3)
    proc.p.send_signal(signal.SIGINT)
    time.sleep(0.003)
    proc.p.send_signal(signal.SIGINT)
    assert proc.finish() == 130, proc.stderr
    err, run = proc.stderr, Path(out) / "t"
    assert TRACEBACK not in err and "internal error" not in err, err
    assert f"resume with: cnnft train --resume {run}" in err, err
    second = "interrupted by Ctrl-C; the last checkpoint saved is" in err
    assert second or "stopped by SIGINT" in err, err
    print("the second Ctrl-C came", "before the checkpoint was written" if second else "after it", "\n" + err)
    res = run_subprocess(["train", "--resume", str(run), "-q"], exp)
    assert res.code == 0, res.err
    assert metrics_of(exp / run) == baseline["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("nth", [1, 3], ids=["first-save", "epoch-2-save"])
def test_death_inside_the_atomic_checkpoint_write_then_resume(exp: Path, baseline: dict, nth: int) -> None:
    """A deterministic fault: the process dies (os._exit) after the nth checkpoint's temporary
    file is written and before it is renamed into place. Nothing torn is left, the resume
    removes the temporary file, and the finished run equals the uninterrupted one."""
    out = f"fault{nth}"
    script = (
        "import os, sys\n"
        "from cnnft import cli, files\n"
        "real, calls = os.replace, []\n"
        "def dying_replace(src, dst):\n"
        "    if str(dst).endswith('.pt'):\n"
        "        calls.append(dst)\n"
        f"        if len(calls) == {nth}:\n"
        "            os._exit(9)\n"
        "    return real(src, dst)\n"
        "files.os.replace = dying_replace\n"
        f"cli.main(['train', 'cfg.yaml', 'output_dir={out}', '-q'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=exp, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = assert_checkpoints_sound(exp / out)
    assert leftovers, "the fault left the temporary file of the interrupted write"
    run = resume_until_done(exp, out)
    assert not list(run.rglob("*.tmp"))
    assert metrics_of(run) == baseline["metrics"]

"""Bad input, table-driven, for the files cnnft reads and writes: runs that would destroy other
runs' work (the run-folder lock, the one guard of every user-named output file, run folders
inside the data), and files that change, vanish or cannot be written while a command works.

The rows use the machinery of ``tests/test_bad_inputs.py`` (a tiny experiment per row, one
thing spoilt, the real CLI in-process; exit code, message fragments, no traceback, no
half-made run folder). A run "in use" is held by another live process that took the real
lock (``cnnft.run.lock``); a read-only place is simulated at the os layer (EROFS), since the
tests run as root, whom permission bits do not stop.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml
from _robust import make_dataset, run_folders, run_inprocess, subprocess_env, summary_of
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module
from test_bad_inputs import BASE, LENET, Case, _check, _setup, checkpoint_intact, merged, write

REPO = Path(__file__).resolve().parent.parent
_holders: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_holders():
    yield
    while _holders:
        p = _holders.pop()
        p.kill()
        p.wait()


# ------------------------------------------------------------------------------ set-ups

def held(rel: str = "runs/t") -> Callable[[Path], None]:
    """Another live process holds the run folder's lock (through cnnft's own lock module)."""
    def prep(tmp: Path) -> None:
        code = ("import sys, time; from cnnft.run import lock; lock.acquire(sys.argv[1], 'train'); "
                "print('held', flush=True); time.sleep(600)")
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp / rel)], stdout=subprocess.PIPE, text=True,
                             env=subprocess_env(PYTHONPATH=str(REPO)))
        _holders.append(p)
        assert p.stdout.readline().strip() == "held"
        (tmp / "holder.pid").write_text(str(p.pid))
    return prep


def _names_holder(tmp: Path, res) -> None:
    pid = (tmp / "holder.pid").read_text()
    assert f"process {pid} (cnnft train)" in res.flat_err, res.err
    assert summary_of(tmp / "runs" / "t")["epochs_completed"] == 1
    assert not (tmp / "runs" / "t" / "report").exists()


def symlink(rel: str, target: str) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        (tmp / rel).unlink(missing_ok=True)
        (tmp / rel).symlink_to(tmp / target)
    return prep


def _untouched(rel: str, content: bytes) -> Callable[[Path, object], None]:
    def check(tmp: Path, res) -> None:
        assert (tmp / rel).read_bytes() == content
    return check


def _absent(rel: str) -> Callable[[Path, object], None]:
    def check(tmp: Path, res) -> None:
        assert not (tmp / rel).exists(), rel
    return check


def _is_png(path: Path) -> None:
    assert path.read_bytes()[:4] == b"\x89PNG", path


def _is_json(path: Path) -> None:
    import json

    assert isinstance(json.loads(path.read_text()), dict), path


def _data_untouched(tmp: Path, res) -> None:
    assert sorted(p.name for p in (tmp / "data").iterdir()) == ["a", "b"]
    assert len(list((tmp / "data" / "a").iterdir())) == 4


def add_image(tmp: Path) -> None:
    make_dataset(tmp / "x", classes=("b",), n=1, seed=9)
    (tmp / "x" / "b" / "000.png").rename(tmp / "data" / "b" / "new.png")


def _best_intact(tmp: Path, res) -> None:
    checkpoint_intact(tmp / "runs" / "t" / "checkpoints" / "best.pt")


def read_only(*rels: str) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Nothing can be created, replaced or removed inside ``rels`` (a read-only mount: EROFS)."""
    def patch(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        roots = [os.path.realpath(tmp / r) for r in rels]

        def inside(path) -> bool:
            if isinstance(path, int):
                return False
            a = os.path.realpath(os.path.abspath(os.fsdecode(os.fspath(path))))
            return any(a == r or a.startswith(r + os.sep) for r in roots)

        def refuse(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(path)))

        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        real_open = os.open
        monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: refuse(p) if flags & writes and inside(p)
                            else real_open(p, flags, *a, **k))
        for name in ("mkdir", "unlink", "rmdir"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda p, *a, _r=real, **k: refuse(p) if inside(p) else _r(p, *a, **k))
        for name in ("replace", "rename", "link"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda s, d, *a, _r=real, **k: refuse(d) if inside(d) else _r(s, d, *a, **k))
        for mod in (io, __import__("builtins")):
            real = mod.open
            monkeypatch.setattr(mod, "open", lambda f, mode="r", *a, _r=real, **k: refuse(f)
                                if any(c in mode for c in "wax+") and inside(f) else _r(f, mode, *a, **k))
    return patch


def no_sweep(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lr-find sweep must not start: the row's problem is found before it."""
    from cnnft.run import build

    monkeypatch.setattr(build, "sweep", lambda *a, **k: pytest.fail("the sweep ran before the check"))


def delete_during_training(n: int) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """``n`` training images (class a) are deleted after epoch 1, while the run goes on."""
    def patch(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from cnnft.training import engine

        real, calls = engine.train_one_epoch, [0]

        def epoch(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                for p in sorted((tmp / "data" / "a").iterdir())[:n]:
                    p.unlink()
            return real(*args, **kwargs)
        monkeypatch.setattr(engine, "train_one_epoch", epoch)
    return patch


def _lost_counted(n: int) -> Callable[[Path, object], None]:
    def check(tmp: Path, res) -> None:
        s = summary_of(run_folders(tmp / "runs")[0])
        assert s["epochs_completed"] == 2 and s["skipped_images"] >= 1, s
        gone = [x for x in s["skipped"] if "disappeared" in x["reason"]]
        assert 1 <= len(gone) <= n, s["skipped"]
        assert "FileNotFoundError" not in res.err and "DataLoader worker" not in res.err, res.err
    return check


def remove_images(n: int, cls: str = "a") -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        for p in sorted((tmp / "data" / cls).iterdir())[:n]:
            p.unlink()
    return prep


def move_image(tmp: Path) -> None:
    """One image of a goes to b, and one of b to a: the same counts, other files."""
    a, b = tmp / "data" / "a", tmp / "data" / "b"
    (a / "000.png").rename(b / "moved-from-a.png")
    (b / "001.png").rename(a / "moved-from-b.png")


def rename_image(tmp: Path) -> None:
    (tmp / "data" / "a" / "000.png").rename(tmp / "data" / "a" / "zzz.png")


def _resume_refused(tmp: Path, res) -> None:
    assert summary_of(tmp / "runs" / "t")["epochs_completed"] == 1
    assert [p.name for p in run_folders(tmp / "runs")] == ["t"]


def xdg_cache_file(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp / "cachefile").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cachefile"))


def disk_full_at_start(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk is full from the start: the first file of the run (config.yaml) cannot be written."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".config.yaml."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def _no_half_run(tmp: Path, res) -> None:
    assert not run_folders(tmp / "runs"), "a half-made run folder was left behind"


PNG = b"\x89PNG\r\n\x1a\nnot really"
TRAIN2 = ("train", "--resume", "runs/t", "train.epochs=2")
EXPORT = ("export", "runs/t", "--format", "torchscript")
EXTRACT = ("extract", "runs/t", "--data", "data")
EVALUATE = ("evaluate", "runs/t", "--device", "cpu")
LRFIND = ("lr-find", "cfg.yaml", "--steps", "10")
_template: list[Path] = []


def finished_run(tmp: Path) -> None:
    """runs/t: a finished 1-epoch LeNet run on ./data, trained once per module and copied (its
    config names data and runs relative to the row's folder, which holds the same images)."""
    if not _template:
        import tempfile

        from cnnft.recipes import train as train_recipe

        root = Path(tempfile.mkdtemp(prefix="cnnft-files-"))
        make_dataset(root / "data")
        (root / "prior.yaml").write_text(yaml.safe_dump(merged(BASE, LENET)))
        old = os.getcwd()
        os.chdir(root)
        try:
            train_recipe.train("prior.yaml", [], log=lambda m: None)
        finally:
            os.chdir(old)
        _template.append(root / "runs" / "t")
    shutil.copytree(_template[0], tmp / "runs" / "t")


RUN_T = (finished_run,)

# --------------------------------------------------------- class 1: runs that destroy other runs' work
CLASS_1 = [
    # the run-folder lock
    Case("lock-resume-while-running", 2, ("runs/t is in use", "a second writer would destroy its work", "wait until it ends"),
         argv=TRAIN2, prep=(*RUN_T, held()), check=_names_holder),
    Case("lock-report-while-running", 2, ("runs/t is in use",), argv=("report", "runs/t", "--device", "cpu"),
         prep=(*RUN_T, held()), check=_names_holder),
    Case("lock-export-while-running", 2, ("runs/t is in use",), argv=(*EXPORT, "--out", "m.pt"),
         prep=(*RUN_T, held()), check=lambda tmp, res: (_names_holder(tmp, res), _absent("m.pt")(tmp, res))),
    Case("lock-file-is-a-symlink", 2, ("runs/t/.lock is a symbolic link", "rm runs/t/.lock"), argv=TRAIN2,
         prep=(*RUN_T, write("elsewhere.txt", "x"), symlink("runs/t/.lock", "elsewhere.txt")),
         check=_untouched("elsewhere.txt", b"x")),
    # the output guard
    Case("extract-over-its-checkpoint", 2, ("--out: runs/t/checkpoints/best.pt is a file this command reads",
                                            "never writes over its own input"),
         argv=(*EXTRACT, "--out", "runs/t/checkpoints/best.pt"), prep=RUN_T, check=_best_intact),
    Case("extract-over-its-checkpoint-forced", 2, ("is a file this command reads",),
         argv=(*EXTRACT, "--out", "runs/t/checkpoints/best.pt", "--force"), prep=RUN_T, check=_best_intact),
    Case("extract-over-its-checkpoint-by-alias", 2, ("is a file this command reads (runs/t/checkpoints/best.pt)",),
         argv=(*EXTRACT, "--out", "ckpt/best.pt", "--force"), prep=(*RUN_T, symlink("ckpt", "runs/t/checkpoints")),
         check=_best_intact),
    Case("extract-over-an-input-image", 2, ("--out: data/a/000.png is a file this command reads",),
         argv=(*EXTRACT, "--out", "data/a/000.png", "--force"), prep=RUN_T,
         check=lambda tmp, res: _is_png(tmp / "data" / "a" / "000.png")),
    Case("extract-over-existing-file", 2, ("--out: f.npz already exists; nothing was written", "pass --force"),
         argv=(*EXTRACT, "--out", "f.npz"), prep=(*RUN_T, write("f.npz", "mine")), check=_untouched("f.npz", b"mine")),
    Case("extract-into-checkpoints-folder", 2, ("is inside runs/t/checkpoints",),
         argv=(*EXTRACT, "--out", "runs/t/checkpoints/f.npz"), prep=RUN_T),
    Case("extract-through-symlink", 2, ("--out: f.npz is a symbolic link", "does not write through or over links"),
         argv=(*EXTRACT, "--out", "f.npz", "--force"), prep=(*RUN_T, write("mine.txt", "mine"), symlink("f.npz", "mine.txt")),
         check=_untouched("mine.txt", b"mine")),
    Case("export-through-symlink", 2, ("--out: m.pt is a symbolic link",),
         argv=(*EXPORT, "--out", "m.pt", "--force"), prep=(*RUN_T, write("mine.txt", "mine"), symlink("m.pt", "mine.txt")),
         check=_untouched("mine.txt", b"mine")),
    Case("export-sidecar-through-symlink", 2, ("--out: m.pt.json is a symbolic link",),
         argv=(*EXPORT, "--out", "m.pt", "--force"), prep=(*RUN_T, write("mine.txt", "mine"), symlink("m.pt.json", "mine.txt")),
         check=lambda tmp, res: (_untouched("mine.txt", b"mine")(tmp, res), _absent("m.pt")(tmp, res))),
    Case("lr-find-over-existing-file", 2, ("--out: curve.png already exists", "pass --force"),
         argv=(*LRFIND, "--out", "curve.png"), cfg=LENET, prep=(write("curve.png", PNG),), patch=(no_sweep,),
         check=_untouched("curve.png", PNG)),
    Case("lr-find-into-the-data", 2, ("--out: data/a/curve.png is inside data", "must not write in"),
         argv=(*LRFIND, "--out", "data/a/curve.png"), cfg=LENET, patch=(no_sweep,),
         check=_absent("data/a/curve.png")),
    Case("lr-find-over-a-training-image", 2, ("--out: data/a/000.png is inside data",),
         argv=(*LRFIND, "--out", "data/a/000.png", "--force"), cfg=LENET, patch=(no_sweep,)),
    Case("lr-find-through-symlink", 2, ("--out: curve.png is a symbolic link",),
         argv=(*LRFIND, "--out", "curve.png", "--force"), cfg=LENET, patch=(no_sweep,),
         prep=(write("mine.png", PNG), symlink("curve.png", "mine.png")), check=_untouched("mine.png", PNG)),
    Case("evaluate-out-into-the-data", 2, ("--out: data/a is inside data", "must not write in", "nothing was written"),
         argv=(*EVALUATE, "--data", "data", "--out", "data/a"), prep=RUN_T, check=_data_untouched),
    Case("evaluate-out-into-the-runs-data", 2, ("--out: data/res is inside data",),
         argv=(*EVALUATE, "--out", "data/res"), prep=RUN_T, check=_data_untouched),
    Case("evaluate-out-into-checkpoints", 2, ("--out: runs/t/checkpoints/ev is inside runs/t/checkpoints",),
         argv=(*EVALUATE, "--out", "runs/t/checkpoints/ev"), prep=RUN_T, check=_absent("runs/t/checkpoints/ev")),
    Case("evaluate-out-is-a-file", 2, ("--out: res is a file, not a folder",),
         argv=(*EVALUATE, "--out", "res"), prep=(*RUN_T, write("res", "mine")), check=_untouched("res", b"mine")),
    Case("evaluate-out-through-symlink", 2, ("--out: res is a symbolic link",),
         argv=(*EVALUATE, "--out", "res"), prep=(*RUN_T, symlink("res", "data")), check=_data_untouched),
    Case("evaluate-out-elsewhere", 0, (), argv=(*EVALUATE, "--out", "res"), prep=RUN_T,  # the guard lets it through
         check=lambda tmp, res: _is_json(tmp / "res" / "metrics.json")),
    Case("report-folder-is-a-symlink", 2, ("runs/t/report is a symbolic link", "rm runs/t/report"),
         argv=("report", "runs/t", "--device", "cpu"), prep=(*RUN_T, symlink("runs/t/report", "data")),
         check=_data_untouched),
    # run folders inside the data, and empty paths
    Case("output-dir-inside-data-train", 2, ("output_dir: data/runs is inside data.train (data)",
                                             "set output_dir to a folder outside data"), ov=("output_dir=data/runs",)),
    Case("output-dir-is-data-train", 2, ("output_dir: data is inside data.train",), ov=("output_dir=data",)),
    Case("output-dir-inside-a-class", 2, ("output_dir: ./data/a/../b is inside data.train",), ov=("output_dir=./data/a/../b",)),
    Case("output-dir-inside-data-val", 2, ("output_dir: val/runs is inside data.val (val)",),
         ov=("data.val=val", "output_dir=val/runs"), prep=(lambda tmp: make_dataset(tmp / "val", n=2, seed=3),)),
    Case("output-dir-inside-data-test", 2, ("is inside data.test",),
         ov=("data.test=test", "output_dir=test/x"), prep=(lambda tmp: make_dataset(tmp / "test", n=2, seed=4),)),
    Case("validate-output-dir-inside-data", 2, ("output_dir: data/runs is inside data.train",),
         argv=("validate", "cfg.yaml", "output_dir=data/runs")),
    Case("data-train-empty", 2, ("data.train: Value error, must not be empty", "unset shell variable"),
         ov=("data.train=",)),
    Case("data-train-blank", 2, ("data.train: Value error, must not be empty",), ov=("data.train=' '",)),
    Case("data-val-empty", 2, ("data.val: Value error, must not be empty",), ov=("data.val=",)),
    Case("output-dir-empty", 2, ("output_dir: Value error, must not be empty",), ov=("output_dir=",)),
]

# ------------------------------------------------------ class 4: files that change, vanish or cannot be written
CLASS_4 = [
    Case("images-deleted-while-training", 0, ("could not be read any more during training", "the file disappeared"),
         cfg={**LENET, "train": {"epochs": 2}}, run="ok", patch=(delete_during_training(2),), check=_lost_counted(2)),
    Case("images-deleted-while-training-workers", 0, ("could not be read any more during training",),
         cfg={**LENET, "train": {"epochs": 2}, "data": {"num_workers": 2}}, run="ok",
         patch=(delete_during_training(3),), check=_lost_counted(3)),
    Case("resume-after-images-deleted", 2, ("--resume: the images are not the ones this run was trained on",
                                            "put the run's images back"),
         argv=TRAIN2, prep=(*RUN_T, remove_images(2)), check=_resume_refused),
    Case("resume-after-images-added", 2, ("not the ones this run was trained on", "in all"),
         argv=TRAIN2, prep=(*RUN_T, add_image),
         check=_resume_refused),
    Case("resume-after-image-moved-between-classes", 2, ("the same number of images per class, but other files",),
         argv=TRAIN2, prep=(*RUN_T, move_image), check=_resume_refused),
    Case("resume-after-image-renamed", 2, ("other files (renamed, replaced",), argv=TRAIN2, prep=(*RUN_T, rename_image),
         check=_resume_refused),
    Case("resume-folder-read-only", 2, ("runs/t: cannot write in this run folder", "Read-only file system", "make the folder writable"),
         argv=TRAIN2, prep=RUN_T, patch=(read_only("runs/t"),), check=_resume_refused),
    Case("report-run-read-only", 2, ("runs/t: cannot write in this run folder", "Read-only file system"),
         argv=("report", "runs/t", "--device", "cpu"), prep=RUN_T, patch=(read_only("runs/t"),)),
    Case("report-folder-read-only", 2, ("report folder: cannot write in runs/t/report", "Read-only file system"),
         argv=("report", "runs/t", "--device", "cpu"), prep=(*RUN_T, lambda tmp: (tmp / "runs" / "t" / "report").mkdir()),
         patch=(read_only("runs/t/report"),)),
    Case("export-out-read-only", 2, ("--out: cannot write in out", "Read-only file system"),
         argv=(*EXPORT, "--out", "out/m.pt"), prep=(*RUN_T, lambda tmp: (tmp / "out").mkdir()), patch=(read_only("out"),)),
    Case("extract-out-read-only", 2, ("--out: cannot write in out", "Read-only file system"),
         argv=(*EXTRACT, "--out", "out/f.npz"), prep=(*RUN_T, lambda tmp: (tmp / "out").mkdir()), patch=(read_only("out"),)),
    Case("lr-find-out-read-only", 2, ("--out: cannot write in out", "Read-only file system"),
         argv=(*LRFIND, "--out", "out/curve.png"), cfg=LENET, prep=(lambda tmp: (tmp / "out").mkdir(),),
         patch=(read_only("out"), no_sweep)),
    Case("cache-dir-is-a-file", 2, ("train.cache_dir: cachefile is a file, not a folder", "train.feature_cache=memory"),
         cfg={**LENET, "freeze": {"strategy": "head_only"}, "train": {"feature_cache": "disk", "cache_dir": "cachefile"}},
         prep=(write("cachefile", "x"),)),
    Case("cache-dir-under-a-file", 2, ("train.cache_dir: cachefile is a file, not a folder",),
         cfg={**LENET, "freeze": {"strategy": "head_only"}, "train": {"feature_cache": "disk", "cache_dir": "cachefile/sub"}},
         prep=(write("cachefile", "x"),)),
    Case("xdg-cache-home-is-a-file", 2, ("$XDG_CACHE_HOME (train.cache_dir unset):", "cachefile is a file, not a folder"),
         cfg={**LENET, "freeze": {"strategy": "head_only"}, "train": {"feature_cache": "disk"}}, patch=(xdg_cache_file,)),
    Case("cache-dir-empty", 2, ("train.cache_dir: Value error, must not be empty",), ov=("train.cache_dir=",)),
    Case("disk-full-at-start", 2, ("cannot write", "config.yaml: no space left on the device", "free at least"),
         cfg=LENET, patch=(disk_full_at_start,), check=_no_half_run,
         marks=(pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc"),)),
]


def _params(cases):
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


@pytest.mark.parametrize("case", _params(CLASS_1 + CLASS_4))
def test_bad_file(case: Case, tmp_path: Path, monkeypatch, capfd) -> None:
    argv, before = _setup(case, tmp_path)
    for patch in case.patch:
        patch(tmp_path, monkeypatch)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    monkeypatch.undo()  # the checks read files as usual
    _check(case, tmp_path, res, before)


def test_tables_are_large_enough() -> None:
    assert len(CLASS_1) >= 20 and len(CLASS_4) >= 14
    ids = [c.id for c in CLASS_1 + CLASS_4]
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------- concurrency, with real processes

def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnft", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(PYTHONPATH=str(REPO)))


def _wait_for_lock(run: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        lock = run / ".lock"
        if lock.is_file() and lock.read_text().split(" ")[0] == str(proc.pid):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    pytest.fail("the training process never took the run folder's lock")


def test_two_resumes_of_one_run_one_is_refused_and_a_killed_run_resumes(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", n=6)
    cfg = {"name": "t", "output_dir": "runs", "seed": 0,
           "data": {"train": "data", "image_size": 32, "batch_size": 4, "num_workers": 0, "augment": "none"},
           "model": {"backbone": "lenet5", "weights": "none"}, "freeze": {"strategy": "full"},
           "train": {"epochs": 1, "device": "cpu", "feature_cache": "off"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    first = subprocess.run([sys.executable, "-m", "cnnft", "train", "cfg.yaml", "-q"], cwd=tmp_path,
                           capture_output=True, text=True, env=subprocess_env(PYTHONPATH=str(REPO)), timeout=300)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "t"

    # a long resume holds the run; a second one is refused with its PID, and changes nothing
    long = _start(["train", "--resume", "runs/t", "train.epochs=10000", "-q"], tmp_path)
    try:
        _wait_for_lock(run, long)
        second = subprocess.run([sys.executable, "-m", "cnnft", "train", "--resume", "runs/t", "train.epochs=3", "-q"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env=subprocess_env(PYTHONPATH=str(REPO)))
        assert second.returncode == 2, second.stderr
        assert f"process {long.pid} (cnnft train) is writing this run folder" in " ".join(second.stderr.split())
        assert "Traceback" not in second.stderr
        assert long.poll() is None, "the refused resume must not disturb the running one"
    finally:
        long.kill()  # SIGKILL: no chance to clean up; the lock dies with the process
        long.wait()

    from cnnft.run import checkpoint

    done = checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] if (run / "checkpoints" / "last.pt").exists() else 0
    again = subprocess.run([sys.executable, "-m", "cnnft", "train", "--resume", "runs/t", f"train.epochs={done + 1}", "-q"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=subprocess_env(PYTHONPATH=str(REPO)))
    assert again.returncode == 0, again.stderr
    assert summary_of(run)["epochs_completed"] == done + 1

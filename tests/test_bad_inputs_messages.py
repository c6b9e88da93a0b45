"""Messages in the right place, table-driven: the message that explains a stop or a mistake is
the last thing printed, names the real cause, and is not buried under another tool's dump.

* ``--nproc 2``: a process's clear error is the whole story (no torchrun traceback or
  ChildFailedError table after it), with exit 2 for bad input;
* SIGTERM outside the training loop (the ``lr: auto`` sweep, the image check, the test-set
  evaluation) ends as Ctrl-C does at the same point, with exit 143;
* a run name too long for a folder is blamed on ``name``, not on ``output_dir``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from _robust import TRACEBACK, flat, make_dataset, run_folders, run_inprocess, subprocess_env
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module
from test_bad_inputs import BASE, LENET, merged
from test_bad_inputs_files import finished_run

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    id: str
    code: int
    says: tuple[str, ...]
    argv: tuple[str, ...] = ("train", "cfg.yaml")
    cfg: dict | None = None  # patch of BASE (LeNet-5)
    prep: tuple[Callable[[Path], None], ...] = ()
    patch: tuple[Callable[[Path, pytest.MonkeyPatch], None], ...] = ()
    not_says: tuple[str, ...] = ()
    check: Callable[[Path], None] | None = None
    marks: tuple = ()


def signal_in(module: str, name: str, sig: int) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """``sig`` arrives (really raised, to this process) while ``module.name`` runs."""
    def patch(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import importlib

        mod = importlib.import_module(module)

        def hit(*_a, **_k):
            signal.raise_signal(sig)
            raise AssertionError(f"{signal.Signals(sig).name} must stop the run here")
        monkeypatch.setattr(mod, name, hit)
    return patch


def a_test_set(tmp: Path) -> None:
    make_dataset(tmp / "test", n=2, seed=4)


def _no_run(tmp: Path) -> None:
    assert not run_folders(tmp / "runs")


def _one_epoch_kept(tmp: Path) -> None:
    from cnnft.run import checkpoint

    (run,) = run_folders(tmp / "runs")
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1


def _named_run(name: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        assert [p.name for p in run_folders(tmp / "runs")] == [name]
    return check


LONG = "n" * 300
AUTO = {**LENET, "train": {"lr": "auto"}}
BUILD, FOLDERS, TRAIN = "cnnft.run.build", "cnnft.data.folders", "cnnft.recipes.train"
NPROC = ("--quiet", "--nproc", "2")
SLOW = (pytest.mark.slow,)
STOPPED_EARLY = "stopped by SIGTERM before training started: nothing was saved"

ROWS = [
    # --- SIGTERM outside the training loop: Ctrl-C's message at the same point, exit 143
    Row("sigterm-during-lr-auto-sweep", 143, (STOPPED_EARLY, "start it again: cnnft train cfg.yaml"),
        cfg=AUTO, patch=(signal_in(BUILD, "sweep", signal.SIGTERM),), check=_no_run),
    Row("sigint-during-lr-auto-sweep", 130, ("interrupted by Ctrl-C before training started: nothing was saved",),
        cfg=AUTO, patch=(signal_in(BUILD, "sweep", signal.SIGINT),), check=_no_run),
    Row("sigterm-while-images-checked", 143, (STOPPED_EARLY,), cfg=LENET,
        patch=(signal_in(FOLDERS, "build_data", signal.SIGTERM),), check=_no_run),
    Row("sigterm-while-similarity-measured", 143, (STOPPED_EARLY,), cfg=LENET,
        patch=(signal_in(BUILD, "measure_similarity", signal.SIGTERM),), check=_no_run),
    Row("sigterm-while-resume-starts", 143, ("stopped by SIGTERM; the last checkpoint saved is runs/t/checkpoints/last.pt, "
                                             "from the end of epoch 1", "resume with: cnnft train --resume runs/t"),
        argv=("train", "--resume", "runs/t", "train.epochs=2"), prep=(finished_run,),
        patch=(signal_in(FOLDERS, "build_data", signal.SIGTERM),)),
    Row("sigterm-while-test-set-evaluated", 143, ("stopped by SIGTERM; the last checkpoint saved is",
                                                  "from the end of epoch 1", "resume with: cnnft train --resume"),
        cfg={**LENET, "data": {"test": "test"}}, prep=(a_test_set,), patch=(signal_in(TRAIN, "evaluate", signal.SIGTERM),),
        check=_one_epoch_kept),
    # --- a name too long for a folder is the name's fault
    Row("name-300-characters", 2, ("name: String should have at most 250 characters",), cfg={**LENET, "name": LONG},
        not_says=("output_dir",), check=_no_run),
    Row("name-300-characters-override", 2, ("name: String should have at most 250 characters",), cfg=LENET,
        argv=("train", "cfg.yaml", f"name={LONG}"), not_says=("output_dir",), check=_no_run),
    Row("name-251-characters", 2, ("name: String should have at most 250 characters",), cfg={**LENET, "name": "n" * 251},
        not_says=("output_dir",), check=_no_run),
    Row("validate-name-300-characters", 2, ("name: String should have at most 250 characters",),
        cfg={**LENET, "name": LONG}, argv=("validate", "cfg.yaml"), not_says=("config OK",)),
    Row("name-250-characters-trains", 0, (), cfg={**LENET, "name": "n" * 250},
        check=_named_run("n" * 250)),
    # --- --nproc 2: the process's message, not torchrun's dump (real torchrun launches)
    Row("nproc-data-folder-missing", 2, ("data.train: folder not found: nope", "check the path"), cfg=LENET,
        argv=("train", "cfg.yaml", "data.train=nope", *NPROC), marks=SLOW),
    Row("nproc-config-error", 2, ("train.lr: Input should be greater than 0",), cfg=LENET,
        argv=("train", "cfg.yaml", "train.lr=-1", *NPROC), marks=SLOW),
    Row("nproc-unknown-backbone-after-group-start", 2, ("model.backbone:",), cfg=LENET,
        argv=("train", "cfg.yaml", "model.backbone=nosuchnet9", *NPROC), marks=SLOW),
]
DUMPS = ("ChildFailedError", "Root Cause", "torch.distributed.elastic", "exitcode", TRACEBACK)


def _params():
    return [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS]


def _setup(row: Row, tmp: Path) -> None:
    make_dataset(tmp / "data")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(merged(BASE, row.cfg or {}), sort_keys=False))
    for prep in row.prep:
        prep(tmp)


@pytest.mark.parametrize("row", _params())
def test_message(row: Row, tmp_path: Path, monkeypatch, capfd) -> None:
    _setup(row, tmp_path)
    if "--nproc" in row.argv:  # torchrun needs the real entry point
        p = subprocess.run([sys.executable, "-m", "cnnft", *row.argv], cwd=tmp_path, capture_output=True, text=True,
                           env=subprocess_env(PYTHONPATH=str(REPO)), timeout=400)
        code, err = p.returncode, p.stderr + p.stdout
    else:
        for patch in row.patch:
            patch(tmp_path, monkeypatch)
        res = run_inprocess(list(row.argv), monkeypatch, capfd, tmp_path)
        monkeypatch.undo()
        code, err = res.code, res.err
    shown = f"exit {code}\n{err}"
    assert code == row.code, shown
    for fragment in row.says:
        assert flat(fragment) in flat(err), f"missing {fragment!r}\n{shown}"
    for fragment in (*row.not_says, *DUMPS, "internal error"):
        assert fragment not in err, f"{fragment!r} should not be printed\n{shown}"
    if row.says:  # the explanation is said once (not once per process) and nothing follows it but its hint
        assert flat(err).count(flat(row.says[0])) == 1, shown
    if row.check:
        row.check(tmp_path)


def test_table_is_large_enough() -> None:
    assert len(ROWS) >= 12 and len({r.id for r in ROWS}) == len(ROWS)

"""`validate` refuses what `train` refuses: each row is one problem a run meets before its first
step, run through both commands, which must both exit 2 with the same message (one list of
checks: cnnft/run/checks.py) and leave no run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _robust import make_dataset, run_inprocess
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module
from test_bad_inputs import Case, _check, _setup




def split_folder(classes=("a", "b")):
    def prep(tmp: Path) -> None:
        make_dataset(tmp / "test", classes=classes, n=2, seed=8)
    return prep


def empty_test(tmp: Path) -> None:
    (tmp / "test").mkdir()


def file_test(tmp: Path) -> None:
    (tmp / "test").write_text("not a folder")


LENET = ("model.backbone=lenet5",)
PROBLEMS = [
    # (id, overrides, set-ups, message fragments)
    ("class-weights-unknown-class", ("train.class_weights={a: 2, c: 1}",), (),
     ("train.class_weights: unknown class(es) c", "the classes are a, b")),
    ("frozen-stages-beyond-model", (*LENET, "freeze.strategy=freeze_early", "freeze.frozen_stages=7"), (),
     ("freeze.frozen_stages: 7 is out of range for lenet5", "use 0..1")),
    ("data-test-missing", ("data.test=nowhere",), (), ("data.test:", "nowhere")),
    ("data-test-other-classes", ("data.test=test",), (split_folder(("a", "c")),),
     ("data.test: class folders differ from the training classes", "c")),
    ("class-weights-two-unknown", ("train.class_weights={x: 2, y: 1}",), (), ("unknown class(es) x, y",)),
    ("class-weights-wrong-case", ("train.class_weights={A: 2}",), (), ("unknown class(es) A",)),
    ("frozen-stages-at-stage-count", (*LENET, "freeze.strategy=freeze_early", "freeze.frozen_stages=2"), (),
     ("freeze.frozen_stages: 2 is out of range", "stage1, stage2")),
    ("frozen-stages-beyond-resnet", ("freeze.strategy=freeze_early", "freeze.frozen_stages=9"), (),
     ("freeze.frozen_stages: 9 is out of range for resnet18",)),
    ("trainable-stages-beyond-model", (*LENET, "freeze.strategy=freeze_most", "freeze.trainable_stages=5"), (),
     ("freeze.trainable_stages: 5 is out of range for lenet5", "use 0..2")),
    ("data-test-extra-class", ("data.test=test",), (split_folder(("a", "b", "z")),), ("only in test: z",)),
    ("data-test-one-class", ("data.test=test",), (split_folder(("a",)),), ("data.test:", "single class")),
    ("data-test-empty-folder", ("data.test=test",), (empty_test,), ("data.test:",)),
    ("data-test-is-a-file", ("data.test=test",), (file_test,), ("data.test:",)),
    ("all-three-at-once", (*LENET, "freeze.strategy=freeze_early", "freeze.frozen_stages=7",
                           "train.class_weights={q: 1}", "data.test=test"), (split_folder(("a", "c")),),
     ("freeze.frozen_stages: 7", "train.class_weights: unknown class(es) q", "data.test: class folders differ")),
]


# train stops at the first group of problems it meets (the data, then the model); validate lists all
TRAIN_SAYS = {"all-three-at-once": ("data.test: class folders differ",)}


def _rows():
    out = []
    for id, ov, prep, says in PROBLEMS:
        for cmd in ("validate", "train"):
            said = TRAIN_SAYS.get(id, says) if cmd == "train" else says
            out.append(Case(f"{id}-{cmd}", 2, said, argv=(cmd, "cfg.yaml", *ov), prep=prep))
    return out


CASES = _rows()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_validate_refuses_what_train_refuses(case: Case, tmp_path: Path, monkeypatch, capfd) -> None:
    argv, before = _setup(case, tmp_path)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    _check(case, tmp_path, res, before)
    assert "config OK" not in res.err


def test_a_good_test_folder_passes_both(tmp_path: Path, monkeypatch, capfd) -> None:
    case = Case("good", 0, (), argv=("validate", "cfg.yaml", *LENET, "data.test=test",
                                     "train.class_weights={a: 2}", "freeze.strategy=freeze_early",
                                     "freeze.frozen_stages=1"), prep=(split_folder(),))
    argv, _ = _setup(case, tmp_path)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    assert res.code == 0 and "config OK" in res.err, res.err
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    res = run_inprocess(["train", *argv[1:]], monkeypatch, capfd, tmp_path)
    assert res.code == 0, res.err

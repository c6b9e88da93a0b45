"""Every Ctrl-C ends with one message that says what was saved and how to go on, and exit 130.

A first Ctrl-C while training waits for the next step and saves a resumable checkpoint
(tests/test_interrupt.py); these tests cover the Ctrl-Cs that cannot wait: before training
starts, a second one during training or while a checkpoint is written, and in the other
commands. Each runs the real entry point in-process on a LeNet-5 and a tiny folder.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from _fixtures import run_cli
from _robust import TRACEBACK, make_dataset, summary_of


@pytest.fixture
def exp(tmp_path: Path, monkeypatch) -> Path:
    make_dataset(tmp_path / "data", n=6, size=24)
    monkeypatch.chdir(tmp_path)
    return tmp_path


ARGS = ["data.train=data", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "model.backbone=lenet5", "model.weights=none", "train.epochs=2", "train.device=cpu",
        "output_dir=runs", "name=t", "-q"]
RUN = Path("runs") / "t"


def ctrl_c(*_args, **_kwargs):
    raise KeyboardInterrupt


def train_until(monkeypatch, calls: int, interrupt) -> None:
    """Train ``calls - 1`` epochs for real, then call ``interrupt`` in place of the next one."""
    from cnnft.training import engine

    real, n = engine.train_one_epoch, [0]

    def step(*args, **kwargs):
        n[0] += 1
        return interrupt(*args, **kwargs) if n[0] == calls else real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", step)


def double_ctrl_c(*_args, **_kwargs):
    """The user presses Ctrl-C twice: the first asks for a stop at the next step, the second
    (raised by the training loop's handler) cannot wait for it."""
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)
    raise AssertionError("the second Ctrl-C must raise KeyboardInterrupt")


def unpatch(monkeypatch, exp: Path) -> None:
    """Undo the patches (and the change of folder, which is put back)."""
    monkeypatch.undo()
    monkeypatch.chdir(exp)


def assert_interrupted(code: int, err: str, *expected: str) -> None:
    assert code == 130, err
    assert TRACEBACK not in err and "internal error" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def test_ctrl_c_before_training_says_nothing_was_saved(exp: Path, monkeypatch, capsys) -> None:
    from cnnft.data import folders as data

    monkeypatch.setattr(data, "build_data", ctrl_c)  # Ctrl-C while the images are checked
    code, _, err = run_cli(monkeypatch, capsys, "train", *ARGS)
    assert_interrupted(code, err, "before training started: nothing was saved",
                       "start it again: cnnft train data.train=data")
    assert not RUN.exists()


def test_ctrl_c_before_the_first_checkpoint_can_start_over(exp: Path, monkeypatch, capsys) -> None:
    train_until(monkeypatch, 1, double_ctrl_c)
    code, _, err = run_cli(monkeypatch, capsys, "train", *ARGS)
    assert_interrupted(code, err, f"before the run's first checkpoint: {RUN} holds nothing to resume from",
                       f"start it over in the same folder: cnnft train --resume {RUN}")
    assert not (RUN / "checkpoints" / "last.pt").exists()
    unpatch(monkeypatch, exp)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", RUN, "-q")
    assert code == 0, err
    assert summary_of(RUN)["epochs_completed"] == 2


@pytest.mark.parametrize("when", ["step", "save"])
def test_second_ctrl_c_names_the_last_checkpoint_and_the_resume(exp: Path, monkeypatch, capsys, when: str) -> None:
    """In epoch 2: at a step, or while epoch 2's checkpoint is being written (it is not the
    last one saved: epoch 1's is)."""
    from cnnft.run import checkpoint

    if when == "step":
        train_until(monkeypatch, 2, double_ctrl_c)
    else:
        real, saves = checkpoint.save, [0]

        def save(*args, **kwargs):
            saves[0] += 1
            return ctrl_c() if saves[0] == 2 else real(*args, **kwargs)

        monkeypatch.setattr(checkpoint, "save", save)
    code, _, err = run_cli(monkeypatch, capsys, "train", *ARGS)
    last = RUN / "checkpoints" / "last.pt"
    assert_interrupted(code, err, f"the last checkpoint saved is {last}, from the end of epoch 1",
                       f"resume with: cnnft train --resume {RUN}")
    assert checkpoint.load(last)["epoch"] == 1
    unpatch(monkeypatch, exp)

    # a Ctrl-C while the resumed run starts up leaves the same checkpoint, and says so
    from cnnft.data import folders as data

    monkeypatch.setattr(data, "build_data", ctrl_c)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", RUN, "-q")
    assert_interrupted(code, err, "from the end of epoch 1", f"resume with: cnnft train --resume {RUN}")
    unpatch(monkeypatch, exp)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", RUN, "-q")
    assert code == 0, err
    assert summary_of(RUN)["epochs_completed"] == 2


def test_ctrl_c_in_another_command(monkeypatch, capsys) -> None:
    from cnnft.recipes import backbones

    monkeypatch.setattr(backbones, "list_models", ctrl_c)
    code, out, err = run_cli(monkeypatch, capsys, "models")
    assert_interrupted(code, err, "interrupted by Ctrl-C before `cnnft models` finished", "run the same command again")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C must work again after main()"

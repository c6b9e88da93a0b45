"""Bad input, table-driven: every mistake gets an exit code, a message that names the problem
and the fix, no Python traceback, and no half-made run folder.

Each row of ``CASES`` sets up a tiny experiment in a temporary folder (2 classes x 4 PNGs of
24x24, random-init resnet18 at 32 px, one epoch), spoils one thing, runs ``cnnft ...`` and
checks the outcome. Rows run in-process through ``cnnft.cli.app.main`` (the same error -> exit
code mapping as the console script) because starting Python + torch costs seconds per run;
``test_real_entry_point_agrees`` repeats a handful of rows as ``python -m cnnft`` to show the
real entry point behaves the same.
"""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from _robust import (
    TRACEBACK,
    Result,
    deny_access,
    flat,
    make_dataset,
    odd_mode_images,
    png_bomb,
    run_folders,
    run_inprocess,
    run_subprocess,
    summary_of,
    text_as_jpeg,
    truncated_jpeg,
)
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module

BASE: dict = {
    "name": "t",
    "output_dir": "runs",
    "seed": 0,
    "data": {"train": "data", "image_size": 32, "batch_size": 4, "num_workers": 0, "augment": "none"},
    "model": {"backbone": "resnet18", "weights": "none"},
    "train": {"epochs": 1, "device": "cpu"},
}
DROP = object()  # a patch value that removes the key
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0




def merged(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        if v is DROP:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------ set-ups

def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return prep


def add_class(name: str, n: int = 4, root: str = "data") -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        make_dataset(tmp / root / "_new", classes=(name,), n=n, seed=5)
        (tmp / root / "_new" / name).rename(tmp / root / name)
        (tmp / root / "_new").rmdir()
    return prep


def empty_data(tmp: Path) -> None:
    shutil.rmtree(tmp / "data")
    (tmp / "data").mkdir()


def loose_images(tmp: Path) -> None:
    shutil.rmtree(tmp / "data")
    make_dataset(tmp / "flat", classes=("x",), n=3)
    (tmp / "flat" / "x").rename(tmp / "data")  # data/000.png ... with no class folders


def single_class(tmp: Path) -> None:
    shutil.rmtree(tmp / "data" / "b")


def class_without_images(tmp: Path) -> None:
    shutil.rmtree(tmp / "data" / "b")
    (tmp / "data" / "b").mkdir()
    (tmp / "data" / "b" / "notes.txt").write_text("no pictures here")


def val_with_other_classes(tmp: Path) -> None:
    make_dataset(tmp / "val", classes=("a", "c"), n=2, seed=3)


def one_image_per_class(tmp: Path) -> None:
    for c in ("a", "b"):
        for f in sorted((tmp / "data" / c).iterdir())[1:]:
            f.unlink()


def junk_files(tmp: Path) -> None:
    for c in ("a", "b"):
        (tmp / "data" / c / "README.txt").write_text("not an image")
        (tmp / "data" / c / "labels.csv").write_text("file,label\n")
        (tmp / "data" / c / ".DS_Store").write_bytes(b"\0\1\2")
        (tmp / "data" / c / "Thumbs.db").write_bytes(b"\0" * 32)
    (tmp / "data" / ".hidden_class").mkdir()
    (tmp / "data" / "notes.md").write_text("# about this data\n")


def zero_byte(tmp: Path) -> None:
    (tmp / "data" / "a" / "empty.png").write_bytes(b"")


def truncated(tmp: Path) -> None:
    truncated_jpeg(tmp / "data" / "b" / "truncated.jpg")


def fake_jpeg(tmp: Path) -> None:
    text_as_jpeg(tmp / "data" / "a" / "fake.jpg")


def bomb(width: int, height: int) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        png_bomb(tmp / "data" / "a" / "bomb.png", width, height)
    return prep


def odd_modes(tmp: Path) -> None:
    shutil.rmtree(tmp / "data")
    for c, name in enumerate(("a", "b")):
        odd_mode_images(tmp / "data" / name, c)


def class_all_broken(tmp: Path) -> None:
    for f in (tmp / "data" / "b").iterdir():
        f.write_bytes(f.read_bytes()[:40])


def many_bad(tmp: Path) -> None:
    zero_byte(tmp)
    truncated(tmp)
    fake_jpeg(tmp)


def hidden_subfolders(tmp: Path) -> None:
    """What Jupyter, git and macOS leave inside class folders: copies and metadata, never data."""
    for c in ("a", "b"):
        make_dataset(tmp / "hidden" / c, classes=(".ipynb_checkpoints", ".git"), n=2, seed=9)
        for d in (tmp / "hidden" / c).iterdir():
            d.rename(tmp / "data" / c / d.name)
        (tmp / "data" / c / f"._000.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (tmp / "data" / "a" / "sub").mkdir()
    (tmp / "data" / "a" / "sub" / ".cache").mkdir()
    (tmp / "data" / "a" / "sub" / ".cache" / "x.png").write_bytes(b"not even an image")


def nested_subfolder(tmp: Path) -> None:
    make_dataset(tmp / "more", classes=("deeper",), n=2, seed=4)
    (tmp / "more" / "deeper").rename(tmp / "data" / "a" / "deeper")


def symlinks(tmp: Path) -> None:
    (tmp / "data" / "a" / "gone.png").symlink_to(tmp / "nowhere.png")  # dangling: not an image
    make_dataset(tmp / "elsewhere", classes=("c",), n=4, seed=6)
    (tmp / "data" / "c").symlink_to(tmp / "elsewhere" / "c", target_is_directory=True)


def rename_data(to: str) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        (tmp / to).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "data").rename(tmp / to)
    return prep


def two_sections(tmp: Path) -> None:
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False) + "train:\n  epochs: 2\n")


def deny(*rels: str) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """As mode 000 on these paths (simulated: the tests run as root, whom chmod does not stop)."""
    def patch(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        deny_access(monkeypatch, *(tmp / r for r in rels))
    return patch


def lenet_state(num_classes: int = 2, scale: float = 1.0) -> dict:
    from cnnft.models import LeNet5

    torch.manual_seed(0)
    return {k: v * scale if v.is_floating_point() else v for k, v in LeNet5(num_classes).state_dict().items()}


def weights_file(name: str, obj) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        torch.save(obj() if callable(obj) else obj, tmp / name)
    return prep


def reshaped_lenet_state() -> dict:
    """lenet5's keys, but a first convolution of 3x3 kernels where the model has 5x5."""
    state = lenet_state()
    state["conv1.0.weight"] = torch.zeros(6, 3, 3, 3)
    return state


def truncated_weights(tmp: Path) -> None:
    torch.save(lenet_state(), tmp / "w.pt")
    data = (tmp / "w.pt").read_bytes()
    (tmp / "w.pt").write_bytes(data[: len(data) // 2])


class Pwn:
    """Unpickling this creates a file: proof that code ran. Loading must refuse it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def evil_pickle(tmp: Path) -> None:
    (tmp / "evil.pkl").write_bytes(pickle.dumps({"model": Pwn(tmp / "pwned")}))
    torch.save({"model": {"fc3.weight": Pwn(tmp / "pwned")}}, tmp / "evil.pt")


def prior_run(backbone: str = "lenet5", epochs: int = 1) -> Callable[[Path], None]:
    """A finished run in runs/t (trained in-process, quietly) to resume or evaluate."""
    def prep(tmp: Path) -> None:
        from cnnft.recipes import train as train_recipe

        cfg = merged(BASE, {"model": {"backbone": backbone}, "train": {"epochs": epochs},
                            "data": {"train": str(tmp / "data")}, "output_dir": str(tmp / "runs")})
        (tmp / "prior.yaml").write_text(yaml.safe_dump(cfg))
        train_recipe.train(tmp / "prior.yaml", [], log=lambda m: None)
    return prep


def corrupt_last(tmp: Path) -> None:
    last = tmp / "runs" / "t" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])


def delete_last(tmp: Path) -> None:
    (tmp / "runs" / "t" / "checkpoints" / "last.pt").unlink()


def edit_run_config(tmp: Path) -> None:
    cfg = tmp / "runs" / "t" / "config.yaml"
    d = yaml.safe_load(cfg.read_text())
    d["data"]["image_size"], d["train"]["lr"] = 40, 0.05
    cfg.write_text(yaml.safe_dump(d))


def disk_full(at_save: int) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """The disk fills up while the ``at_save``-th checkpoint is written (ENOSPC when it is flushed)."""
    def patch(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        real, saves = os.fsync, []

        def fsync(fd: int) -> None:
            if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith((".best.pt.", ".last.pt.")):
                saves.append(fd)
                if len(saves) == at_save:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    return patch


def mark_failed(tmp: Path) -> None:
    """runs/t as a run that died in epoch 2 leaves it: the failure summary.json."""
    from cnnft.errors import TrainingFailed
    from cnnft.results.rundir import RunDir
    from cnnft.run import folder as _run

    history = [{"epoch": 1, "val_acc": 0.5, "wall_seconds": 1.0}]
    with pytest.raises(TrainingFailed):
        with _run.failed_summary(RunDir(tmp / "runs" / "t"), history, lambda m: None):
            raise TrainingFailed("loss became nan at epoch 2, step 1")


def doctored_evaluation(tmp: Path) -> None:
    """runs/t/eval/val/metrics.json pointing its figures at a file outside the run folder."""
    import json

    from cnnft.recipes import evaluate

    (tmp / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    evaluate.evaluate(tmp / "runs" / "t", device="cpu", log=lambda m: None)
    meta_path = tmp / "runs" / "t" / "eval" / "val" / "metrics.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["confusion_png"] = meta["files"]["confusion_normalized_png"] = str(tmp / "secret.txt")
    meta_path.write_text(json.dumps(meta))


def _report_has_no_secret(tmp: Path, res: Result) -> None:
    for png in (tmp / "runs" / "t" / "report").glob("*.png"):
        assert b"root:x" not in png.read_bytes(), png


def unwritable_dir(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)


# root ignores permission bits, so "not writable" needs a place even root cannot write:
# sysfs refuses mkdir with EPERM; for other users a chmod 555 folder does it
UNWRITABLE = "/sys/cnnft-test-runs" if IS_ROOT else "ro/runs"


# ------------------------------------------------------------------------------- table

@dataclass
class Case:
    id: str
    code: int
    says: tuple[str, ...]  # fragments of stderr (whitespace-normalised): the problem and the fix
    cfg: dict | str | bytes | None = field(default_factory=dict)  # patch of BASE, raw file text, or no file
    ov: tuple[str, ...] = ()  # key=value overrides after `train cfg.yaml`
    argv: tuple[str, ...] | None = None  # the whole command instead of `train cfg.yaml OV...`
    prep: tuple[Callable[[Path], None], ...] = ()
    run: str = "none"  # the run folder afterwards: none (none created), failed (marked), ok (completed)
    check: Callable[[Path, Result], None] | None = None
    marks: tuple = ()
    patch: tuple[Callable[[Path, pytest.MonkeyPatch], None], ...] = ()  # in-process only, after prep


def _skipped(n: int, *names: str) -> Callable[[Path, Result], None]:
    def check(tmp: Path, res: Result) -> None:
        s = summary_of(run_folders(tmp / "runs")[0])
        assert s["skipped_images"] == n, s["skipped"]
        assert {Path(x["path"]).name for x in s["skipped"]} == set(names)
        for name in names:  # listed once, not once per epoch
            assert sum(name in line for line in res.err.splitlines()) == 1, res.err
    return check


def _all_used(n: int) -> Callable[[Path, Result], None]:
    def check(tmp: Path, res: Result) -> None:
        s = summary_of(run_folders(tmp / "runs")[0])
        assert s["skipped_images"] == 0, s["skipped"]
        assert s["train_images"] + s["val_images"] == n
    return check


def _resolved(**expected) -> Callable[[Path, Result], None]:
    """The run folder's config.yaml holds these values (``train__lr=0.1`` for train.lr)."""
    def check(tmp: Path, res: Result) -> None:
        (run,) = run_folders(tmp / "runs")
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        for key, want in expected.items():
            section, _, name = key.partition("__")
            got = cfg[section][name] if name else cfg[section]
            assert got == want and type(got) is type(want), f"{key}: {got!r}"
    return check


def _nan_kept_progress(tmp: Path, res: Result) -> None:
    from cnnft.run import checkpoint

    (run,) = run_folders(tmp / "runs")
    s = summary_of(run)
    epoch = int(res.flat_err.split("at epoch ")[1].split(",")[0])
    assert epoch >= 2, "the trigger should fail after a finished epoch"
    assert s["epochs_completed"] == epoch - 1
    assert "nan" in s["error"] or "inf" in s["error"]
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + epoch - 1  # header + the finished epochs
    assert checkpoint.load(run / "checkpoints" / "best.pt")["epoch"] == s["best_epoch"]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == epoch - 1
    assert "run marked failed" in res.err


def _nan_first_step(tmp: Path, res: Result) -> None:
    (run,) = run_folders(tmp / "runs")
    s = summary_of(run)
    assert s["epochs_completed"] == 0 and s["best_val_acc"] is None
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "metrics.csv").exists()


def _disk_full_later(tmp: Path, res: Result) -> None:
    """Full at epoch 2's checkpoint: everything that says what was trained says epoch 1."""
    from cnnft.run import checkpoint

    (run,) = run_folders(tmp / "runs")
    s = summary_of(run)
    assert s["epochs_completed"] == 1 and s["best_epoch"] == 1, s
    assert checkpoint.load(run / "checkpoints" / "best.pt")["epoch"] == 1
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 2  # header + epoch 1
    needed = int(res.flat_err.split("it needs ")[1].split("(")[1].split(" bytes)")[0].replace(",", ""))
    size = (run / "checkpoints" / "last.pt").stat().st_size  # epoch 2's checkpoint: epoch 1's plus a history row
    assert size < needed < size * 1.01, (needed, size)
    assert not list((run / "checkpoints").glob(".*.tmp"))


def _disk_full_first(tmp: Path, res: Result) -> None:
    (run,) = run_folders(tmp / "runs")
    s = summary_of(run)
    assert s["epochs_completed"] == 0 and s["best_epoch"] is None and s["checkpoints"] == {}, s
    assert not (run / "metrics.csv").exists() and not list((run / "checkpoints").iterdir())
    assert "are kept" not in res.err


def _not_pwned(tmp: Path, res: Result) -> None:
    assert not (tmp / "pwned").exists(), "unpickling ran code"


def _resume_untouched(tmp: Path, res: Result) -> None:
    assert summary_of(tmp / "runs" / "t")["epochs_completed"] == 1
    assert [p.name for p in run_folders(tmp / "runs")] == ["t"]


def _unchanged_status(tmp: Path, status: str) -> None:
    assert summary_of(tmp / "runs" / "t")["status"] == status
    assert f"| status | {status}" in (tmp / "runs" / "t" / "report" / "report.md").read_text()


def _unchanged(path: Path, content: bytes) -> None:
    assert path.read_bytes() == content


def checkpoint_intact(path: Path) -> None:
    from cnnft.run import checkpoint

    assert checkpoint.load(path)["epoch"] >= 1


LENET = {"model": {"backbone": "lenet5"}}
NAN_LATER = {"model": {"backbone": "lenet5"}, "freeze": {"strategy": "full"},
             "train": {"epochs": 3, "optimizer": "sgd", "lr": 1.0, "weight_decay": 10.0, "scheduler": "none"}}

CASES = [
    # --- config files
    Case("config-missing", 2, ("config file not found: nope.yaml", "check the path"), cfg=None, argv=("train", "nope.yaml")),
    Case("config-is-folder", 2, ("config path is a folder", "pass the .yaml file"), argv=("train", "data")),
    Case("config-not-yaml", 2, ("not valid YAML at line", "check indentation"), cfg="data: {train: data\nmodel: [resnet18\n"),
    Case("config-tab-indent", 2, ("not valid YAML",), cfg="data:\n\ttrain: data\n"),
    Case("config-not-utf8", 2, ("cannot read config file", "save it as a UTF-8 YAML file"), cfg=b"name: \xff\xfe\x00bad\n"),
    Case("config-is-list", 2, ("top level must be a mapping", "not a list"), cfg="- data\n- model\n"),
    Case("config-is-scalar", 2, ("top level must be a mapping", "not a str"), cfg="just some words\n"),
    Case("config-empty-no-data", 2, ("set exactly one of data.train", "data.dataset"), cfg=""),
    Case("unknown-section", 2, ("trian: unknown key; did you mean train?",), cfg={"trian": {"epochs": 1}}),
    Case("unknown-key", 2, ("data.trian: unknown key; did you mean data.train?",), cfg={"data": {"trian": "x"}}),
    Case("unknown-key-no-match", 2, ("model.colour: unknown key", "allowed: backbone, weights, num_classes"),
         cfg={"model": {"colour": "red"}}),
    Case("section-not-mapping", 2, ("train: must be a mapping",), cfg={"train": 5}),
    Case("wrong-type-int", 2, ("train.epochs: Input should be a valid integer", "'ten'"), cfg={"train": {"epochs": "ten"}}),
    Case("wrong-type-bool", 2, ("data.download: Input should be a valid boolean",), cfg={"data": {"download": "maybe"}}),
    Case("wrong-choice", 2, ("train.optimizer: Input should be 'adamw' or 'sgd'",), cfg={"train": {"optimizer": "adam"}}),
    Case("lr-zero", 2, ("train.lr: Input should be greater than 0",), cfg={"train": {"lr": 0}}),
    Case("lr-negative", 2, ("train.lr: Input should be greater than 0", "-0.1"), ov=("train.lr=-0.1",)),
    Case("lr-nan", 2, ("train.lr: Input should be a finite number",), ov=("train.lr=.nan",)),
    Case("warmup-inf", 2, ("train.warmup_epochs: Input should be a finite number",), ov=("train.warmup_epochs=.inf",)),
    Case("epochs-zero", 2, ("train.epochs: Input should be greater than or equal to 1",), cfg={"train": {"epochs": 0}}),
    Case("val-split-zero", 2, ("data.val_split: Input should be greater than 0",), cfg={"data": {"val_split": 0}}),
    Case("val-split-above-one", 2, ("data.val_split: Input should be less than 1",), cfg={"data": {"val_split": 1.5}}),
    Case("batch-size-zero", 2, ("data.batch_size: Input should be greater than or equal to 1",), ov=("data.batch_size=0",)),
    Case("seed-too-large", 2, ("seed: Input should be less than or equal to 4294967295",), ov=("seed=99999999999999999999",)),
    Case("all-problems-at-once", 2, ("3 problem(s)", "train.lr", "train.epochs", "data.val_split"),
         cfg={"train": {"lr": 0, "epochs": 0}, "data": {"val_split": 2}}),
    Case("bad-run-name", 2, ("name: String should match pattern",), ov=("name=../escape",)),
    Case("unknown-backbone", 2, ("unknown backbone 'resnet19'", "Did you mean resnet18"), ov=("model.backbone=resnet19",)),
    Case("unknown-timm-backbone", 2, ("timm has no model 'resnet19x'", "Did you mean"), ov=("model.backbone=timm/resnet19x",)),
    Case("empty-backbone", 2, ("model.backbone: Value error, must not be empty",), cfg={"model": {"backbone": " "}}),
    Case("unknown-weights-name", 2, ("resnet18 has no weights 'IMAGENET1K_V9'", "available: DEFAULT, none, IMAGENET1K_V1"),
         ov=("model.weights=IMAGENET1K_V9",)),
    Case("override-no-equals", 2, ("override 'train.lr': expected KEY.SUB=VALUE", "e.g. train.lr=0.01"), ov=("train.lr",)),
    Case("override-empty-part", 2, ("expected KEY.SUB=VALUE",), ov=("train..lr=0.1",)),
    Case("override-unknown-key", 2, ("train.lrr: unknown key; did you mean train.lr?",), ov=("train.lrr=0.1",)),
    Case("override-into-value", 2, ("override 'name.x=1': name is not a section",), ov=("name.x=1",)),
    Case("override-wrong-type", 2, ("train.epochs: Input should be a valid integer", "'abc'"), ov=("train.epochs=abc",)),
    Case("num-classes-mismatch", 2, ("model.num_classes: 5 but the data has 2 classes", "set it to 2"),
         ov=("model.num_classes=5",)),
    Case("cuda-unavailable", 2, ("CUDA is not available", "train.device=auto or cpu"), ov=("train.device=cuda",),
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),)),
    Case("train-and-dataset", 2, ("set exactly one of data.train", "data.dataset"), ov=("data.dataset=digits",)),
    Case("unknown-dataset", 2, ("unknown dataset 'imagenet9'", "packaged datasets: digits"),
         ov=("data.train=null", "data.dataset=imagenet9")),
    # --- YAML that would silently mean something else
    Case("config-duplicate-section", 2, ("train: duplicate key at line", "first at line", "merge them into one"),
         prep=(two_sections,)),
    Case("config-duplicate-key", 2, ("data.batch_size: duplicate key at line 3 (first at line 2)",),
         cfg="data:\n  batch_size: 4\n  batch_size: 8\n  train: data\n"),
    Case("config-duplicate-key-in-flow", 2, ("model.weights: duplicate key at line 2",),
         cfg="data: {train: data}\nmodel: {weights: none, weights: DEFAULT}\n"),
    Case("override-duplicate-key", 2, ("override 'train={epochs: 1, epochs: 2}'", "train.epochs: duplicate key"),
         ov=("train={epochs: 1, epochs: 2}",)),
    Case("epochs-true", 2, ("train.epochs: Input should be a valid integer", "true/false is not a number"),
         cfg={"train": {"epochs": True}}),
    Case("lr-true", 2, ("train.lr: Input should be a valid number", "true/false is not a number"),
         cfg={"train": {"lr": True}}),
    Case("seed-false", 2, ("seed: Input should be a valid integer", "(got False)"), cfg={"seed": False}),
    Case("epochs-float", 2, ("train.epochs: Input should be a valid integer", "without a decimal point", "2.0"),
         cfg={"train": {"epochs": 2.0}}),
    Case("batch-size-quoted", 2, ("data.batch_size: Input should be a valid integer", "'4'"),
         cfg={"data": {"batch_size": "4"}}),
    Case("amp-yes-in-file", 2, ("train.amp: Input should be a valid boolean", "write true or false", "'yes'"),
         cfg="data: {train: data}\ntrain:\n  amp: yes\n"),
    Case("download-on-in-file", 2, ("data.download: Input should be a valid boolean", "'on'"),
         cfg="data:\n  train: data\n  download: on\n"),
    Case("amp-yes-override", 2, ("train.amp: Input should be a valid boolean", "write true or false", "'yes'"),
         ov=("train.amp=yes",)),
    Case("amp-quoted-true", 2, ("train.amp: Input should be a valid boolean", "'true'"), cfg={"train": {"amp": "true"}}),
    Case("amp-one", 2, ("train.amp: Input should be a valid boolean", "(got 1)"), ov=("train.amp=1",)),
    Case("amp-false-override-ok", 0, (), ov=("train.amp=false", "model.backbone=lenet5"), run="ok",
         check=_resolved(train__amp=False)),
    Case("lr-exponent-ok", 0, (), ov=("train.lr=1e-3", "model.backbone=lenet5"), run="ok", check=_resolved(train__lr=0.001)),
    Case("section-override-merges", 0, (), ov=("train={epochs: 1, lr: 0.01}", "model={backbone: lenet5}"), run="ok",
         check=_resolved(train__device="cpu", train__lr=0.01, model__weights="none", model__backbone="lenet5")),
    Case("folder-named-like-a-date", 0, (), ov=("data.train=2024-05-01", "model.backbone=lenet5"),
         prep=(rename_data("2024-05-01"),), run="ok", check=_resolved(data__train="2024-05-01")),
    Case("folder-named-no", 0, (), cfg="data: {train: no, image_size: 32, batch_size: 4, num_workers: 0}\n"
         "model: {backbone: lenet5, weights: none}\ntrain: {epochs: 1, device: cpu}\n", prep=(rename_data("no"),),
         run="ok", check=_resolved(data__train="no")),
    # --- command line
    Case("no-config-no-resume", 2, ("give a CONFIG file, or --resume RUN_DIR",), argv=("train",)),
    Case("config-and-resume", 2, ("give either CONFIG or --resume RUN_DIR",), argv=("train", "cfg.yaml", "--resume", "runs/t")),
    Case("unknown-option", 2, ("No such option: --epochs",), argv=("train", "cfg.yaml", "--epochs", "3")),
    # --- data folders
    Case("data-missing", 2, ("data.train: folder not found", "check the path"), ov=("data.train=nope",)),
    Case("data-is-file", 2, ("data.train: not a folder", "one sub-folder per class"), ov=("data.train=cfg.yaml",)),
    Case("data-empty", 2, ("has no class sub-folders", "ROOT/<class>/<image>"), prep=(empty_data,)),
    Case("data-loose-images", 2, ("has no class sub-folders", "images found directly in ROOT"), prep=(loose_images,)),
    Case("data-single-class", 2, ("has a single class (a)", "add a folder for each other class"), prep=(single_class,)),
    Case("data-class-without-images", 2, ("class folder(s) with no images", ": b", "add images or remove the folder"),
         prep=(class_without_images,)),
    Case("val-other-classes", 2, ("class folders differ from data.train", "only in train: b", "only in val: c",
                                   "give both folders the same class sub-folders"),
         ov=("data.val=val",), prep=(val_with_other_classes,)),
    Case("val-missing", 2, ("data.val: folder not found",), ov=("data.val=nope",)),
    Case("last-batch-of-one", 0, (), ov=("data.batch_size=5",), run="ok", check=_all_used(8)),  # 6 train: 5 + 1
    Case("no-validation-images", 2, ("the validation set is empty", "add images or give data.val"),
         prep=(one_image_per_class,)),
    Case("non-image-files-ignored", 0, (), prep=(junk_files,), run="ok", check=_all_used(8)),
    Case("odd-modes-all-train", 0, (), prep=(odd_modes,), run="ok", check=_all_used(20)),
    Case("zero-byte-skipped", 0, ("skipping 1 unreadable image", "empty.png: empty file (0 bytes)"),
         prep=(zero_byte,), run="ok", ov=("train.epochs=2",), check=_skipped(1, "empty.png")),
    Case("zero-byte-error", 2, ("1 unreadable image", "empty file (0 bytes)", "data.on_bad_image=skip"),
         prep=(zero_byte,), ov=("data.on_bad_image=error",)),
    Case("truncated-jpeg-skipped", 0, ("truncated.jpg: cannot decode", "truncated"), prep=(truncated,), run="ok",
         check=_skipped(1, "truncated.jpg")),
    Case("truncated-jpeg-error", 2, ("1 unreadable image", "truncated", "remove or fix them"), prep=(truncated,),
         ov=("data.on_bad_image=error",)),
    Case("text-as-jpeg-skipped", 0, ("fake.jpg: cannot decode",), prep=(fake_jpeg,), run="ok", check=_skipped(1, "fake.jpg")),
    Case("text-as-jpeg-error", 2, ("cannot identify image file", "data.on_bad_image=skip"), prep=(fake_jpeg,),
         ov=("data.on_bad_image=error",)),
    Case("bad-files-listed-once", 0, ("skipping 3 unreadable image",), prep=(many_bad,), run="ok", ov=("train.epochs=3",),
         check=_skipped(3, "empty.png", "truncated.jpg", "fake.jpg")),
    Case("bomb-over-2x-limit-skipped", 0, ("bomb.png: image too large", "decompression-bomb limit"),
         prep=(bomb(20_000, 20_000),), run="ok", check=_skipped(1, "bomb.png")),
    Case("bomb-over-limit-error", 2, ("image too large", "decompression-bomb limit", "data.on_bad_image=skip"),
         prep=(bomb(10_000, 10_000),), ov=("data.on_bad_image=error",)),
    Case("hidden-subfolders-ignored", 0, (), prep=(hidden_subfolders,), run="ok", check=_all_used(8)),
    Case("nested-subfolder-used", 0, (), prep=(nested_subfolder,), run="ok", check=_all_used(10)),
    Case("symlinks-followed-dangling-ignored", 0, (), prep=(symlinks,), run="ok", check=_all_used(12)),
    Case("unreadable-class-folder", 2, ("data.train: cannot read folder", "data/b: Permission denied",
                                        "give your user read access to it"), patch=(deny("data/b"),)),
    Case("unreadable-nested-folder", 2, ("data.train: cannot read folder", "data/a/deeper: Permission denied"),
         prep=(nested_subfolder,), patch=(deny("data/a/deeper"),)),
    Case("unreadable-data-folder", 2, ("data.train: cannot read folder", "Permission denied"), patch=(deny("data"),)),
    Case("data-folder-inside-unreadable", 2, ("data.train: cannot read folder", "Permission denied"),
         ov=("data.train=locked/data",), prep=(rename_data("locked/data"),), patch=(deny("locked"),)),
    Case("unreadable-val-class-folder", 2, ("data.val: cannot read folder", "val/a: Permission denied"),
         ov=("data.val=val",), prep=(lambda tmp: make_dataset(tmp / "val", n=2, seed=3),), patch=(deny("val/a"),)),
    Case("unreadable-image-skipped", 0, ("skipping 1 unreadable image", "001.png: cannot read: permission denied"),
         patch=(deny("data/a/001.png"),), run="ok", check=_skipped(1, "001.png")),
    Case("unreadable-image-error", 2, ("1 unreadable image", "cannot read: permission denied", "data.on_bad_image=skip"),
         ov=("data.on_bad_image=error",), patch=(deny("data/b/002.png"),)),
    Case("class-all-broken", 2, ("class 'b' has no readable images", "replace the broken files"), prep=(class_all_broken,)),
    # --- weights and checkpoints
    Case("weights-missing", 2, ("weights file not found", "missing.pt"), ov=("model.weights=missing.pt",)),
    Case("weights-empty", 2, ("is empty (0 bytes)",), ov=("model.weights=w.pt",), prep=(write("w.pt", b""),)),
    Case("weights-truncated", 2, ("is not a readable PyTorch file: truncated or corrupt", "re-copy or re-create"),
         ov=("model.weights=w.pt", "model.backbone=lenet5"), prep=(truncated_weights,)),
    Case("weights-text", 2, ("is not a readable PyTorch file: it is a text file", "torch.save"),
         ov=("model.weights=w.pt",), prep=(write("w.pt", "model: resnet18\nweights: lots\n"),)),
    Case("weights-not-a-state-dict", 2, ("holds no state dict of tensors",), ov=("model.weights=w.pt",),
         prep=(weights_file("w.pt", [1, 2, 3]),)),
    Case("weights-other-architecture", 2, ("does not fit ResNet", "check model.backbone"), ov=("model.weights=lenet.pt",),
         prep=(weights_file("lenet.pt", lambda: lenet_state(10)),)),
    Case("weights-other-num-classes-ok", 0, (), ov=("model.weights=lenet10.pt", "model.backbone=lenet5"),
         prep=(weights_file("lenet10.pt", lambda: lenet_state(10)),), run="ok"),
    Case("weights-wrong-shapes", 2, ("w.pt does not fit LeNet5", "1 keys of another shape",
                                     "conv1.0.weight (6, 3, 3, 3) vs the model's (6, 3, 5, 5)", "check model.backbone"),
         ov=("model.weights=w.pt", "model.backbone=lenet5"), prep=(weights_file("w.pt", reshaped_lenet_state),)),
    Case("weights-bad-safetensors", 2, ("is not a valid safetensors file",), ov=("model.weights=w.safetensors",),
         prep=(write("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),)),
    Case("weights-pickle-with-code", 2, ("refused to load", "evil.pkl"), ov=("model.weights=./evil.pkl", "model.backbone=lenet5"),
         prep=(evil_pickle,), check=_not_pwned),
    Case("weights-torch-zip-with-code", 2, ("refused to load", "would call Python code", "only load files from sources you trust"),
         ov=("model.weights=evil.pt", "model.backbone=lenet5"), prep=(evil_pickle,), check=_not_pwned),
    # --- resuming
    Case("resume-missing-folder", 2, ("--resume: run folder not found", "OUTPUT_DIR/NAME"), cfg=None, argv=("train", "--resume", "runs/nope")),
    Case("resume-not-a-run", 2, ("has no config.yaml", "is it a cnnft run folder?"), argv=("train", "--resume", "data")),
    Case("resume-changes-lr", 2, ("train.lr: cannot be changed when resuming", "train.epochs"),
         argv=("train", "--resume", "runs/t", "train.lr=0.5"), prep=(prior_run(),), check=_resume_untouched),
    Case("resume-other-classes", 2, ("checkpoint is for lenet5 with classes", "resume with the same data"),
         argv=("train", "--resume", "runs/t", "train.epochs=2"), prep=(prior_run(), add_class("c")), check=_resume_untouched),
    Case("resume-without-last-but-trained", 2, ("runs/t has no checkpoints/last.pt, so there is nothing to resume from",
                                                 "metrics.csv, checkpoints/best.pt", "cnnft train runs/t/config.yaml"),
         argv=("train", "--resume", "runs/t", "train.epochs=2"), prep=(prior_run(), delete_last),
         check=_resume_untouched),
    Case("resume-edited-config", 2, ("data.image_size: 40 in config.yaml but 32 in the checkpoint",
                                     "train.lr: 0.05 in config.yaml but 0.001 in the checkpoint",
                                     "cannot be changed when resuming", "or start a new run with the edited config"),
         argv=("train", "--resume", "runs/t", "train.epochs=2"), prep=(prior_run(), edit_run_config),
         check=_resume_untouched),
    Case("resume-corrupt-last", 2, ("last.pt is not a readable PyTorch file",),
         argv=("train", "--resume", "runs/t", "train.epochs=2"), prep=(prior_run(), corrupt_last)),
    Case("evaluate-other-classes", 2, ("do not match the checkpoint's classes", "not known to the model: c"), argv=("evaluate", "runs/t", "--data", "data", "--device", "cpu"),
         prep=(prior_run(), add_class("c"))),
    Case("evaluate-pickle-with-code", 2, ("refused to load", "would call Python code"), argv=("evaluate", "evil.pt", "--data", "data"),
         prep=(evil_pickle,), check=_not_pwned),
    Case("predict-pickle-with-code", 2, ("refused to load",), argv=("predict", "evil.pkl", "data"),
         prep=(evil_pickle,), check=_not_pwned),
    Case("image-size-below-model-minimum", 2, ("data.image_size: vit_b_16 needs inputs of at least 224 px (got 64)",
                                                "set data.image_size=224"),
         ov=("model.backbone=vit_b_16", "data.image_size=64")),
    Case("evaluate-unknown-device", 2, ("--device: 'gpu' is not a device cnnft can run on", "use --device auto, cpu"),
         argv=("evaluate", "runs/t", "--data", "data", "--device", "gpu"), prep=(prior_run(),)),
    Case("predict-meta-device", 2, ("--device: 'meta' is not a device cnnft can run on",),
         argv=("predict", "runs/t", "data", "--device", "meta"), prep=(prior_run(),)),
    # --- export
    Case("export-over-existing-file", 2, ("--out: m.pt already exists; nothing was written", "pass --force to replace it"),
         argv=("export", "runs/t", "--format", "torchscript", "--out", "m.pt"), prep=(prior_run(), write("m.pt", "mine")),
         check=lambda tmp, res: _unchanged(tmp / "m.pt", b"mine")),
    Case("export-over-its-checkpoint", 2, ("is the checkpoint being exported; cnnft never overwrites it",),
         argv=("export", "runs/t", "--format", "torchscript", "--out", "runs/t/checkpoints/best.pt"), prep=(prior_run(),),
         check=lambda tmp, res: checkpoint_intact(tmp / "runs" / "t" / "checkpoints" / "best.pt")),
    # --- report
    Case("report-of-failed-run", 0, ("the run failed after 1 epoch(s)",), argv=("report", "runs/t", "--device", "cpu"),
         prep=(prior_run(), mark_failed), check=lambda tmp, res: _unchanged_status(tmp, "failed")),
    Case("report-doctored-evaluation", 0, (), argv=("report", "runs/t", "--device", "cpu"),
         prep=(prior_run(), doctored_evaluation), check=_report_has_no_secret),
    # --- environment
    Case("output-dir-is-file", 2, ("output_dir:", "is a file, not a folder", "set output_dir to a folder path"),
         ov=("output_dir=cfg.yaml",)),
    Case("output-dir-under-file", 2, ("is a file, not a folder",), ov=("output_dir=cfg.yaml/runs",)),
    Case("output-dir-not-writable", 2, ("output_dir:", "set output_dir to a writable folder"), ov=(f"output_dir={UNWRITABLE}",),
         prep=() if IS_ROOT else (unwritable_dir,)),
    Case("output-dir-in-proc", 2, ("output_dir: cannot create folders in /proc", "set output_dir to a writable folder"),
         ov=("output_dir=/proc/cnnft-test-runs",),
         marks=(pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc"),)),
    Case("disk-full-first-checkpoint", 2, ("cannot write", "best.pt: no space left on the device", "it needs",
                                           "free at least", "then resume the run: cnnft train --resume"),
         cfg=LENET, run="failed", patch=(disk_full(1),), check=_disk_full_first,
         marks=(pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc"),)),
    Case("disk-full-second-epoch", 2, ("no space left on the device", "free at least"),
         cfg={**LENET, "train": {"epochs": 2}}, run="failed", patch=(disk_full(2),), check=_disk_full_later,
         marks=(pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc"),)),
    # --- numerical faults
    Case("nan-loss-later", 1, ("loss became nan at epoch", "lower train.lr"), cfg=NAN_LATER, run="failed",
         check=_nan_kept_progress),
    Case("inf-loss-first-step", 1, ("at epoch 1, step 1", "lower train.lr"), run="failed", check=_nan_first_step,
         ov=("model.backbone=lenet5", "model.weights=huge.pt"), prep=(weights_file("huge.pt", lambda: lenet_state(2, 1e30)),)),
]


def _params():
    return [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


def _setup(case: Case, tmp: Path) -> tuple[list[str], set[str]]:
    make_dataset(tmp / "data")
    if isinstance(case.cfg, dict):
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(merged(BASE, case.cfg), sort_keys=False))
    elif isinstance(case.cfg, bytes):
        (tmp / "cfg.yaml").write_bytes(case.cfg)
    elif isinstance(case.cfg, str):
        (tmp / "cfg.yaml").write_text(case.cfg)
    for prep in case.prep:
        prep(tmp)
    argv = list(case.argv) if case.argv is not None else ["train", "cfg.yaml", *case.ov]
    return argv, {p.name for p in run_folders(tmp / "runs")}


def _check(case: Case, tmp: Path, res: Result, before: set[str]) -> None:
    shown = f"exit {res.code}\n--- stderr\n{res.err}\n--- stdout\n{res.out}"
    assert res.code == case.code, shown
    for fragment in case.says:
        assert flat(fragment) in res.flat_err, f"missing {fragment!r}\n{shown}"
    assert TRACEBACK not in res.err + res.out, shown
    if case.code != 0:
        assert "internal error" not in res.err, shown
    new = [p for p in run_folders(tmp / "runs") if p.name not in before]
    if case.run == "none":
        assert not new, f"a failed command left run folders {new}"
    elif case.run == "failed":
        assert len(new) == 1, new
        s = summary_of(new[0])
        assert s and s["status"] == "failed" and s["error"], s
    else:
        assert len(new) == 1, new
        s = summary_of(new[0])
        assert s and s["status"] == "completed", s
    if case.check:
        case.check(tmp, res)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, tmp_path: Path, monkeypatch, capfd) -> None:
    argv, before = _setup(case, tmp_path)
    for patch in case.patch:
        patch(tmp_path, monkeypatch)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    _check(case, tmp_path, res, before)


# the real console entry point, for a sample of rows: config, data, weights and success
REAL_ENTRY_POINT = ["config-missing", "override-unknown-key", "truncated-jpeg-error", "weights-torch-zip-with-code",
                    "odd-modes-all-train"]


@pytest.mark.parametrize("case", [c for c in _params() if c.id in REAL_ENTRY_POINT])
def test_real_entry_point_agrees(case: Case, tmp_path: Path) -> None:
    argv, before = _setup(case, tmp_path)
    res = run_subprocess(argv, tmp_path)
    _check(case, tmp_path, res, before)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 110
    assert len({c.id for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch, capfd) -> None:
    case = next(c for c in CASES if c.id == "lr-zero")
    argv, _ = _setup(case, tmp_path)
    res = run_inprocess(["--debug", *argv], monkeypatch, capfd, tmp_path)
    assert res.code == 2
    assert TRACEBACK in res.err and "ConfigError" in res.err
    assert "train.lr: Input should be greater than 0" in res.flat_err


def test_malicious_checkpoint_is_refused_by_load(tmp_path: Path) -> None:
    from cnnft.errors import CheckpointError
    from cnnft.run import checkpoint

    evil_pickle(tmp_path)
    for name in ("evil.pkl", "evil.pt"):
        with pytest.raises(CheckpointError, match="refused to load"):
            checkpoint.load(tmp_path / name)
    assert not (tmp_path / "pwned").exists()
    # the same object really does run code when unpickled without protection
    pickle.loads((tmp_path / "evil.pkl").read_bytes())
    assert (tmp_path / "pwned").exists()


def test_resume_without_last_checkpoint_reuses_the_run_folder(tmp_path: Path, monkeypatch, capfd) -> None:
    """A run killed before its first checkpoint resumes from scratch in the same folder."""
    make_dataset(tmp_path / "data")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(merged(BASE, LENET)))
    assert run_inprocess(["train", "cfg.yaml"], monkeypatch, capfd, tmp_path).code == 0
    run = tmp_path / "runs" / "t"
    for f in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "summary.json"):
        (run / f).unlink()
    # what a kill during the first save leaves: partial writes beside no whole file
    (run / "checkpoints" / ".best.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (run / ".metrics.csv.k1ll3d.tmp").write_text("epoch,")
    res = run_inprocess(["train", "--resume", "runs/t"], monkeypatch, capfd, tmp_path)
    assert res.code == 0, res.err
    assert "holds no finished epoch" in res.flat_err and "starting it fresh" in res.flat_err
    assert "removed a partial write left by the interrupted run: .best.pt.k1ll3d.tmp" in res.flat_err
    assert not list(run.rglob("*.tmp"))
    assert [p.name for p in run_folders(tmp_path / "runs")] == ["t"]
    s = summary_of(run)
    assert s["status"] == "completed" and s["epochs_completed"] == 1 and Path(s["run_dir"]).name == "t"

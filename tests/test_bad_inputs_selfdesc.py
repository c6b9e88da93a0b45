"""Self-descriptions that lie, table-driven: a hand-edited checkpoint (best.pt, last.pt) or
export description (FILE.json beside a TorchScript model) is refused with exit 2 by a message
that names the file and the field, before anything trusts it.

One lenet5 run and one TorchScript export of it are made once for the module and copied into
each row's folder; each row then edits one field and runs a command on it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from _robust import make_dataset, run_inprocess
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module
from test_bad_inputs import BASE, Case, _check, _setup, merged

_TEMPLATE: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _remove_template():
    yield
    for t in _TEMPLATE:
        shutil.rmtree(t, ignore_errors=True)


def _template() -> Path:
    """A finished 1-epoch lenet5 run (runs/t) and its TorchScript export (m.pt, m.pt.json)."""
    if not _TEMPLATE:
        from cnnft.recipes import export
        from cnnft.recipes import train as train_recipe

        root = Path(tempfile.mkdtemp(prefix="cnnft-selfdesc-"))
        make_dataset(root / "data")
        cfg = merged(BASE, {"model": {"backbone": "lenet5"}, "data": {"train": str(root / "data")},
                            "output_dir": str(root / "runs")})
        (root / "prior.yaml").write_text(yaml.safe_dump(cfg))
        train_recipe.train(root / "prior.yaml", [], log=lambda m: None)
        export.export(root / "runs" / "t", "torchscript", root / "m.pt")
        _TEMPLATE.append(root)
    return _TEMPLATE[0]


def trained(tmp: Path) -> None:
    src = _template()
    shutil.copytree(src / "runs", tmp / "runs")
    for name in ("m.pt", "m.pt.json"):
        shutil.copy(src / name, tmp / name)


def edit_ckpt(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """runs/t/checkpoints/NAME loaded, changed, saved again (as a hand edit would)."""
    def prep(tmp: Path) -> None:
        p = tmp / "runs" / "t" / "checkpoints" / name
        obj = torch.load(p, weights_only=True)
        change(obj)
        torch.save(obj, p)
    return prep


def edit_meta(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def prep(tmp: Path) -> None:
        p = tmp / "m.pt.json"
        meta = json.loads(p.read_text())
        change(meta)
        p.write_text(json.dumps(meta))
    return prep


def setter(path: str, value) -> Callable[[dict], None]:
    """Set (or, for ``DROP``, delete) a dotted key."""
    def change(d: dict) -> None:
        *parents, last = path.split(".")
        for k in parents:
            d = d[k]
        if value is DROP:
            del d[last]
        else:
            d[last] = value
    return change


DROP = object()
PREDICT_BEST = ("predict", "runs/t/checkpoints/best.pt", "data", "--device", "cpu")
PREDICT_EXPORT = ("predict", "m.pt", "data", "--device", "cpu")
RESUME = ("train", "--resume", "runs/t", "train.epochs=2")


def best(id: str, key: str, value, *says: str, argv=PREDICT_BEST) -> Case:
    return Case(id, 2, ("best.pt: invalid checkpoint", *says), argv=argv,
                prep=(trained, edit_ckpt("best.pt", setter(key, value))))


def last(id: str, key: str, value, *says: str) -> Case:
    return Case(id, 2, ("last.pt: invalid checkpoint", *says), argv=RESUME,
                prep=(trained, edit_ckpt("last.pt", setter(key, value))), check=_last_untouched)


def meta(id: str, key: str, value, *says: str) -> Case:
    return Case(id, 2, ("m.pt.json", *says), argv=PREDICT_EXPORT, prep=(trained, edit_meta(setter(key, value))))


def _last_untouched(tmp: Path, res) -> None:
    rows = (tmp / "runs" / "t" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2, rows  # header + the one epoch trained before the edit


def _both(change_a, change_b):
    def change(d):
        change_a(d)
        change_b(d)
    return change


CASES = [
    # --- checkpoints: the examples
    best("ckpt-classes-shorter", "classes", ["a"], "classes lists 1 name(s) but num_classes is 2"),
    best("ckpt-classes-longer", "classes", ["a", "b", "c"], "classes lists 3 name(s) but num_classes is 2"),
    best("ckpt-preprocess-missing-key", "preprocess.std", DROP, "preprocess.std: Field required"),
    best("ckpt-preprocess-extra-key", "preprocess.gamma", 2.2, "preprocess.gamma: Extra inputs are not permitted"),
    best("ckpt-crop-size-zero", "preprocess.crop_size", 0, "preprocess.crop_size:", "a whole number from 16 to 1,024"),
    best("ckpt-unknown-interpolation", "preprocess.interpolation", "bilinearr", "preprocess.interpolation:",
         "'bilinear'"),
    best("ckpt-num-classes-negative", "num_classes", -3, "num_classes:", "a whole number from 2 to 1,000,000"),
    best("ckpt-num-classes-1e12", "num_classes", 10**12, "num_classes:", "a whole number from 2 to 1,000,000"),
    best("ckpt-std-zeros", "preprocess.std", [0.0, 0.0, 0.0], "preprocess.std.0:", "greater than or equal to 0.001"),
    best("ckpt-duplicate-classes", "classes", ["a", "a"], "classes:", "'a' appears more than once"),
    last("last-epoch-negative", "epoch", -5, "epoch:", "a whole number from 0 to 100,000"),
    last("last-step-1e9", "step", 10**9, "step:", "a whole number from 0 to 100,000,000"),
    # --- checkpoints: more lies
    best("ckpt-num-classes-float", "num_classes", 1e12, "num_classes: Input should be a valid integer"),
    best("ckpt-mean-nan", "preprocess.mean", [float("nan"), 0.5, 0.5], "preprocess.mean.0:", "finite number"),
    best("ckpt-std-negative", "preprocess.std", [0.2, -0.2, 0.2], "preprocess.std.1:"),
    best("ckpt-mean-two-values", "preprocess.mean", [0.5, 0.5], "preprocess.mean.2: Field required"),
    best("ckpt-resize-below-crop", "preprocess.resize_size", 20, "resize_size 20 is smaller than crop_size"),
    best("ckpt-classes-not-a-list", "classes", "ab", "classes: Input should be a valid list"),
    best("ckpt-class-name-empty", "classes", ["a", " "], "classes:", "class name 1 is empty"),
    best("ckpt-class-name-number", "classes", ["a", 7], "classes.1: Input should be a valid string"),
    best("ckpt-model-name-empty", "model_name", "", "model_name:"),
    best("ckpt-epoch-float", "epoch", 1.5, "epoch: Input should be a valid integer"),
    best("ckpt-preprocess-not-mapping", "preprocess", "imagenet", "preprocess:"),
    best("ckpt-classes-shorter-evaluate", "classes", ["a"], "classes lists 1 name(s)",
         argv=("evaluate", "runs/t/checkpoints/best.pt", "--data", "data", "--device", "cpu")),
    best("ckpt-std-zeros-extract", "preprocess.std", [0.0, 0.0, 0.0], "preprocess.std.0:",
         argv=("extract", "runs/t/checkpoints/best.pt", "--data", "data", "--out", "f.npz", "--device", "cpu")),
    best("ckpt-duplicate-classes-export", "classes", ["b", "b"], "appears more than once",
         argv=("export", "runs/t/checkpoints/best.pt", "--format", "torchscript", "--out", "n.pt")),
    last("last-epoch-ahead-of-history", "epoch", 7, "epoch 7 disagrees with its own history"),
    last("last-step-without-running", "step", 3, "step 3 disagrees with the stopped epoch's running sums"),
    last("last-epoch-string", "epoch", "1", "epoch: Input should be a valid integer"),
    last("last-history-not-list", "history", {"epoch": 1}, "history: Input should be a valid list"),
    # --- export descriptions: the issue's examples
    meta("export-classes-longer", "classes", ["a", "b", "c"], "classes lists 3 name(s) but num_classes is 2"),
    meta("export-preprocess-missing-key", "preprocess.mean", DROP, "preprocess.mean: Field required"),
    meta("export-preprocess-extra-key", "preprocess.antialias", True, "preprocess.antialias: Extra inputs"),
    meta("export-crop-size-zero", "preprocess.crop_size", 0, "preprocess.crop_size:", "a whole number from 16 to 1,024"),
    meta("export-unknown-interpolation", "preprocess.interpolation", "cubic-ish", "preprocess.interpolation:"),
    meta("export-num-classes-negative", "num_classes", -3, "num_classes:", "a whole number from 2 to 1,000,000"),
    meta("export-num-classes-1e12", "num_classes", 10**12, "num_classes:"),
    meta("export-std-zeros", "preprocess.std", [0, 0, 0], "preprocess.std.0:", "greater than or equal to 0.001"),
    meta("export-duplicate-classes", "classes", ["b", "b"], "'b' appears more than once"),
    # --- export descriptions: more lies
    meta("export-classes-shorter", "classes", ["a"], "classes lists 1 name(s) but num_classes is 2"),
    Case("export-one-output-claimed", 2, ("m.pt.json", "num_classes:", "a whole number from 2 to 1,000,000"),
         argv=PREDICT_EXPORT, prep=(trained, edit_meta(_both(setter("classes", ["a"]), setter("num_classes", 1))))),
    Case("export-classes-longer-than-head", 2, ("m.pt.json: classes lists 3 name(s) but the model in m.pt gives 2 output(s)",),
         argv=PREDICT_EXPORT, prep=(trained, edit_meta(_both(setter("classes", ["a", "b", "c"]), setter("num_classes", 3))))),
    meta("export-mean-text", "preprocess.mean", ["x", 0.5, 0.5], "preprocess.mean.0:"),
    meta("export-std-inf", "preprocess.std", [1e999, 0.2, 0.2], "preprocess.std.0:"),
    meta("export-crop-size-huge", "preprocess.crop_size", 10**9, "preprocess.crop_size:"),
    meta("export-classes-missing", "classes", DROP, "classes: Field required"),
    meta("export-model-name-number", "model_name", 5, "model_name: Input should be a valid string"),
    meta("export-class-name-empty", "classes", ["", "b"], "class name 0 is empty"),
    meta("export-resize-below-crop", "preprocess.resize_size", 16, "resize_size 16 is smaller than crop_size"),
]


def _params():
    return [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_lying_self_description(case: Case, tmp_path: Path, monkeypatch, capfd) -> None:
    argv, before = _setup(case, tmp_path)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    _check(case, tmp_path, res, before)


def test_table_is_distinct() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40


def test_untouched_files_still_load(tmp_path: Path, monkeypatch, capfd) -> None:
    """The schemas take what cnnft itself writes: the template's checkpoints and export."""
    trained(tmp_path)
    make_dataset(tmp_path / "data")
    for argv in (PREDICT_BEST, PREDICT_EXPORT, ("evaluate", "runs/t", "--data", "data", "--device", "cpu")):
        res = run_inprocess(list(argv), monkeypatch, capfd, tmp_path)
        assert res.code == 0, res.err

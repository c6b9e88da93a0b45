"""Data that is legal but unusual, table-driven: phone photos turned by their EXIF orientation,
class folder names that look like markup, one class folder where nothing needs two, and
thousands of empty class folders told in one short message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _robust import make_dataset, run_inprocess
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module
from PIL import Image
from test_bad_inputs import Case, _check, _setup, prior_run




# ------------------------------------------------------------------ EXIF orientation

def _sideways(path: Path, orientation: int) -> np.ndarray:
    """A 40x20 (w x h) upright picture stored as a camera would for ``orientation`` (1-8):
    the pixels transformed, with the EXIF tag that says how to undo it. Returns the upright array."""
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))
    stored = {1: upright, 2: upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
              3: upright.transpose(Image.Transpose.ROTATE_180), 4: upright.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
              5: upright.transpose(Image.Transpose.TRANSPOSE), 6: upright.transpose(Image.Transpose.ROTATE_90),
              7: upright.transpose(Image.Transpose.TRANSVERSE), 8: upright.transpose(Image.Transpose.ROTATE_270)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes())  # PNG keeps pixels exactly (and its eXIf chunk)
    return np.asarray(upright)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_where_images_are_decoded(orientation: int, tmp_path: Path) -> None:
    from cnnft.data import folders as data

    upright = _sideways(tmp_path / "photo.png", orientation)
    got = np.asarray(data.open_image(tmp_path / "photo.png"))
    assert got.shape == upright.shape and np.array_equal(got, upright)


def test_exif_jpeg_draft_is_upright(tmp_path: Path) -> None:
    """The fast JPEG path (draft decoding, used by the checks and thumbnails) turns it too."""
    from cnnft.data import folders as data

    img = Image.new("RGB", (400, 200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "p.jpg", exif=exif.tobytes())
    assert data.open_image(tmp_path / "p.jpg", draft=64).size[0] < data.open_image(tmp_path / "p.jpg", draft=64).size[1]


def test_predict_sees_the_photo_upright(tmp_path: Path) -> None:
    """predict's decode (training/inference.py) gives the model the upright picture."""
    from cnnft.training import inference

    upright = _sideways(tmp_path / "photo.png", 6)
    ds = inference.FileImages([str(tmp_path / "photo.png")], lambda im: torch.from_numpy(np.asarray(im).copy()), None)
    _, x, err = ds[0]
    assert err is None and tuple(x.shape) == upright.shape


def test_feature_cache_key_changed_with_decoding() -> None:
    """Activations cached from sideways decodes must not be reused: the cache format moved on."""
    from cnnft.training import cache

    assert cache.FORMAT_VERSION >= 2


# ------------------------------------------------------------------ table

def markup_class(name: str):
    def prep(tmp: Path) -> None:
        (tmp / "data" / "b").rename(tmp / "data" / name)
    return prep


def single_class(folder: str = "one", cls: str = "a"):
    def prep(tmp: Path) -> None:
        make_dataset(tmp / folder, classes=(cls,), n=3, seed=4)
    return prep


def empty_classes(n: int):
    def prep(tmp: Path) -> None:
        for i in range(n):
            (tmp / "data" / f"empty{i:05d}").mkdir()
    return prep


def _short_message(limit: int):
    def check(tmp: Path, res) -> None:
        assert len(res.err) < limit, len(res.err)
    return check


def _eval_complete(tmp: Path, res) -> None:
    meta = json.loads(res.out)
    out = Path(meta["out_dir"])
    assert (out / "metrics.json").is_file() and list(out.glob("*.png")), list(out.iterdir())


def _extract_one_class(tmp: Path, res) -> None:
    with np.load(tmp / "f.npz") as z:
        assert list(z["classes"]) == ["a"] and set(z["labels"].tolist()) == {0}


LENET = ("model.backbone=lenet5",)
EVAL = ("evaluate", "runs/t", "--data", "data", "--device", "cpu", "--json")

CASES = [
    # --- class names are text, never markup
    Case("class-named-bad-tex-evaluates", 0, (), argv=EVAL, prep=(markup_class(r"$\frac{$"), prior_run()),
         check=_eval_complete),
    Case("class-named-unknown-command-evaluates", 0, (), argv=EVAL, prep=(markup_class(r"$\notacommand$"), prior_run()),
         check=_eval_complete),
    Case("class-named-caret-evaluates", 0, (), argv=EVAL, prep=(markup_class("a$^$b"), prior_run()), check=_eval_complete),
    Case("class-named-underscore-evaluates", 0, (), argv=EVAL, prep=(markup_class("$_$"), prior_run()),
         check=_eval_complete),
    Case("class-named-sqrt-report", 0, (), argv=("report", "runs/t", "--device", "cpu"),
         prep=(markup_class(r"$\sqrt{$"), prior_run())),
    Case("class-named-brace-report", 0, (), argv=("report", "runs/t", "--device", "cpu"),
         prep=(markup_class("${$"), prior_run())),
    # --- one class folder where nothing needs two
    Case("evaluate-one-class-folder", 0, (), argv=("evaluate", "runs/t", "--data", "one", "--device", "cpu", "--json"),
         prep=(prior_run(), single_class()), check=_eval_complete),
    Case("evaluate-other-single-class", 0, (), argv=("evaluate", "runs/t", "--data", "one", "--device", "cpu", "--json"),
         prep=(prior_run(), single_class(cls="b")), check=_eval_complete),
    Case("extract-one-class-folder", 0, (), argv=("extract", "runs/t", "--data", "one", "--out", "f.npz", "--device", "cpu"),
         prep=(prior_run(), single_class()), check=_extract_one_class),
    Case("evaluate-one-unknown-class", 2, ("not known to the model: zz",),
         argv=("evaluate", "runs/t", "--data", "one", "--device", "cpu"), prep=(prior_run(), single_class(cls="zz"))),
    # --- many empty class folders: one short message
    Case("ten-thousand-empty-classes", 2, ("10,000 class folder(s) with no images", "and 9,980 more"),
         ov=LENET, prep=(empty_classes(10_000),), check=_short_message(2_000)),
    Case("thirty-empty-classes", 2, ("30 class folder(s) with no images", "and 10 more (30 in all)"),
         ov=LENET, prep=(empty_classes(30),), check=_short_message(2_000)),
    Case("ten-thousand-empty-classes-validate", 2, ("10,000 class folder(s) with no images",),
         argv=("validate", "cfg.yaml"), prep=(empty_classes(10_000),), check=_short_message(3_000)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_unusual_data(case: Case, tmp_path: Path, monkeypatch, capfd) -> None:
    argv, before = _setup(case, tmp_path)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    _check(case, tmp_path, res, before)


# ------------------------------------------------------------------ extreme aspect ratios

@pytest.mark.parametrize("size", [(2, 20_000), (20_000, 2), (1, 50_000), (3, 9_000)])
def test_eval_resize_allocates_little_for_a_strip(size: tuple[int, int]) -> None:
    """A strip of a few thousand pixels must not become resize^2 x its aspect ratio pixels in the
    eval pipeline (what train's validation, evaluate, predict and extract run)."""
    from cnnft.data import transforms
    from cnnft.models import Preprocess

    pre = Preprocess(crop_size=32, resize_size=36)
    x, biggest = Image.new("RGB", size, (90, 120, 200)), 0
    for t in transforms.eval_transform(pre).transforms:
        x = t(x)
        n = x.size[0] * x.size[1] if isinstance(x, Image.Image) else x.shape[-1] * x.shape[-2]
        biggest = max(biggest, n)
    assert tuple(x.shape) == (3, 32, 32)
    assert biggest <= max(size[0] * size[1], 36 * 36 * transforms.MAX_ASPECT), biggest


def test_ordinary_aspect_ratios_are_untouched() -> None:
    from cnnft.data import transforms

    img = Image.new("RGB", (800, 100))
    assert transforms.BoundedAspect()(img) is img

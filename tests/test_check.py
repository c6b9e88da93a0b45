"""cnnft check on planted cases: exact copies (a re-saved PNG of a JPEG too) within and across
splits, near-duplicates and likely label errors (real weights), the other findings, --json keys,
--fail-on exit codes, check.html in headless Chromium, and train's default duplicate warning."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _fixtures import run_cli
from cnnft.data import duplicates
from cnnft.data import folders as data
from cnnft.errors import DataError
from cnnft.recipes import check as check_recipe
from cnnft.recipes import train as train_recipe
from cnnft.results import datacheck

JSON_KEYS = {"data", "model", "image_size", "classes", "splits", "class_counts", "balance", "unreadable",
             "small_images", "colour_modes", "exact_duplicates", "near_duplicates", "near_duplicate_pairs",
             "near_threshold", "leaks", "label_issues", "summary", "seconds", "out_dir", "files"}


def _noise(rng, size=40, colour=0) -> Image.Image:
    base = np.full((size, size, 3), 60 + 120 * colour, dtype=np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 50, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture
def planted(tmp_path) -> Path:
    """train/val with: a JPEG in train whose decoded pixels are saved as PNG in val (a leak), an
    exact copy inside train, a greyscale image, a tiny image and an unreadable file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "set"
    for split, n in (("train", 8), ("val", 4)):
        for c, cls in enumerate(("cats", "dogs")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                _noise(rng, colour=c).save(d / f"{i}.png")
    _noise(rng, colour=0).save(root / "train" / "cats" / "photo.jpg", quality=90)
    with Image.open(root / "train" / "cats" / "photo.jpg") as im:
        im.convert("RGB").save(root / "val" / "cats" / "photo_resaved.png")  # same pixels, other format and name
    shutil.copy(root / "train" / "dogs" / "0.png", root / "train" / "dogs" / "copy of 0.png")
    _noise(rng, colour=1).convert("L").save(root / "train" / "dogs" / "grey.png")
    _noise(rng, size=12, colour=1).save(root / "train" / "dogs" / "tiny.png")
    (root / "train" / "cats" / "broken.jpg").write_bytes(b"not an image")
    return root


def _tiny_config(tmp_path: Path, root: Path) -> Path:
    cfg = tmp_path / "check.yaml"
    cfg.write_text(f"data:\n  train: {root / 'train'}\n  val: {root / 'val'}\n  image_size: 32\n"
                   "model:\n  backbone: lenet5\n  weights: none\n")
    return cfg


def test_exact_copies_by_decoded_pixels_within_and_across_splits(planted):
    _, _, _, splits, _ = check_recipe._resolve(planted, None, None)
    groups = duplicates.exact_groups(splits, duplicates.scan(splits))
    named = [{Path(m["path"]).name for m in g["images"]} for g in groups]
    assert {"photo.jpg", "photo_resaved.png"} in named and {"0.png", "copy of 0.png"} in named
    assert len(groups) == 2
    leak = next(g for g in groups if g["leak"])
    assert leak["splits"] == ["train", "val"]


@pytest.mark.slow
def test_check_cli_json_keys_findings_and_fail_on(planted, tmp_path, monkeypatch, capsys):
    cfg = _tiny_config(tmp_path, planted)
    code, out, err = run_cli(monkeypatch, capsys, "check", cfg, "--json", "--out", tmp_path / "o1", "--device", "cpu")
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == JSON_KEYS
    s = res["summary"]
    # random-init features call many pairs similar; the exact leak is the planted one
    assert [lk for lk in res["leaks"] if lk["kind"] == "exact"] == [
        {"kind": "exact", "images": [m for g in res["exact_duplicates"] if g["leak"] for m in g["images"]]}]
    assert s["exact_duplicate_groups"] == 2 and s["unreadable"] == 1
    assert res["unreadable"][0]["path"].endswith("broken.jpg")
    assert any(r["path"].endswith("tiny.png") for r in res["small_images"])
    assert res["colour_modes"]["L"] == 1
    assert res["class_counts"]["train"] == {"cats": 9, "dogs": 11} and res["splits"] == {"train": 20, "val": 9}
    assert json.loads((tmp_path / "o1" / "check.json").read_text())["summary"] == s
    # --fail-on: exit 3 when a named finding is there, 0 when none of the named ones is
    code, out, err = run_cli(monkeypatch, capsys, "check", cfg, "--out", tmp_path / "o2", "--fail-on", "leak",
                             "--device", "cpu")
    assert code == 3 and "leak" in err and "leaks across splits: " in out
    clean = tmp_path / "clean"
    shutil.copytree(planted, clean)
    for p in ("val/cats/photo_resaved.png", "train/dogs/copy of 0.png"):
        (clean / p).unlink()
    (tmp_path / "o3").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "check", _tiny_config(tmp_path / "o3", clean), "--out", tmp_path / "o4", "--fail-on", "leak,duplicates", "--near-threshold", "1",
                           "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "check", cfg, "--fail-on", "leaks,typo")
    assert code == 2 and "--fail-on" in err and "leak, duplicates, labels" in err


def test_check_of_something_that_is_not_data(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "check", tmp_path / "missing")
    assert code == 2 and "not a folder or a config file" in err


def test_confident_learning_on_a_hand_made_case():
    # class 0's threshold: mean p0 over images labelled 0 = (0.9 + 0.8 + 0.2) / 3 = 0.633
    # class 1's threshold: (0.9 + 0.7) / 2 = 0.8; image 2 (labelled 0) has p1 = 0.8 >= 0.8: it belongs to 1
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1, 1])
    issues = datacheck.confident_learning(probs, labels)
    assert [(r["index"], r["given"], r["suggested"]) for r in issues] == [(2, 0, 1)]
    assert issues[0]["score"] == pytest.approx(0.8)


def test_similar_pairs_and_folds():
    x = np.array([[1, 0], [0.99, 0.05], [0, 1], [-1, 0]], dtype=np.float32)
    i, j, sim = datacheck.similar_pairs(x, 0.95)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)] and sim[0] == pytest.approx(0.9987, abs=1e-3)
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    i, j, sim = datacheck.similar_pairs(x, 0.5, chunk=64)  # across chunk borders, as the full matrix says
    z = datacheck.normalised(x)
    full = z @ z.T
    want = {(a, b) for a in range(300) for b in range(a + 1, 300) if full[a, b] >= 0.5}
    assert set(zip(i.tolist(), j.tolist())) == want and len(i) == len(want)
    assert (np.diff(sim) <= 0).all()
    folds = datacheck.stratified_folds(np.array([0] * 10 + [1] * 5), 5, 0)
    assert sorted(np.bincount(folds[:10]).tolist()) == [2] * 5 and sorted(np.bincount(folds[10:]).tolist()) == [1] * 5


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_check_html_is_self_contained_escaped_and_renders_in_chromium(planted, tmp_path):
    evil = planted / "train" / "cats" / "<img src=x onerror=boom>.png"
    shutil.copy(planted / "train" / "cats" / "1.png", evil)  # an exact copy with a name that is markup
    res = check_recipe.check(_tiny_config(tmp_path, planted), out_dir=tmp_path / "out", device="cpu",
                             log=lambda m: None)
    page = Path(res.files["check.html"]).read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=boom&gt;.png" in page
    assert page.count("data:image/jpeg;base64,") >= 4  # thumbnails of each pair, embedded
    assert "src=\"http" not in page and "src=\"file" not in page
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
                    Path(res.files["check.html"]).resolve().as_uri()], check=True, timeout=120, capture_output=True)
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    colours = len(np.unique(arr.reshape(-1, 3), axis=0))
    assert colours > 200, colours  # the noise thumbnails are on the page, decoded
    assert (arr.sum(2) < 700).mean() > 0.02


@pytest.mark.slow
def test_train_warns_about_exact_copies_across_splits_and_can_stop(planted, tmp_path):
    lines: list[str] = []
    overrides = [f"data.train={planted / 'train'}", f"data.val={planted / 'val'}", "data.image_size=32",
                 "data.num_workers=0", "model.backbone=lenet5", "model.weights=none", "train.epochs=1",
                 f"output_dir={tmp_path / 'runs'}"]
    train_recipe.train(None, overrides, log=lines.append)
    warned = [m for m in lines if m.startswith("warning: data check")]
    assert len(warned) == 1 and "1 image(s) appear in more than one split" in warned[0]
    assert "photo.jpg" in warned[0] and "cnnft check" in warned[0]
    with pytest.raises(DataError, match="data check"):
        train_recipe.train(None, overrides + ["data.check=error"], log=lambda m: None)
    assert len(list((tmp_path / "runs").iterdir())) == 1  # the refused run left no folder


def test_train_check_says_when_nothing_was_found_and_can_be_off(tmp_path):
    from conftest import make_image_folder

    root = make_image_folder(tmp_path / "d", per_class=6)
    bundle = data.build_data(_data_cfg(root), 0)
    lines: list[str] = []
    assert duplicates.check_before_training("warn", bundle, lines.append) == []
    assert len(lines) == 1 and lines[0].startswith("data check: no exact copies across train/val")
    lines.clear()
    duplicates.check_before_training("off", bundle, lines.append)
    assert lines == []


def _data_cfg(root: Path):
    from cnnft import config

    return config.validate({"data": {"train": str(root)}}).data


# --------------------------------------------------------------------------- real weights

def _copy_subset(src: Path, dst: Path, n: int) -> list[Path]:
    dst.mkdir(parents=True)
    out = []
    for p in sorted(src.iterdir())[:n]:
        shutil.copy(p, dst / p.name)
        out.append(dst / p.name)
    return out


@pytest.mark.real
@pytest.mark.slow
def test_near_duplicates_leaks_and_label_errors_on_real_photos(hymenoptera, tmp_path):
    root = tmp_path / "hym"
    files = {}
    for split, n in (("train", 30), ("val", 10)):
        for cls in ("ants", "bees"):
            files[split, cls] = _copy_subset(hymenoptera / split / cls, root / split / cls, n)
    # a near-duplicate leak: a train photo resized, re-encoded and slightly cropped, placed in val
    with Image.open(files["train", "ants"][0]) as im:
        w, h = im.size
        im.convert("RGB").crop((w // 30, h // 30, w - w // 30, h - h // 30)).resize((w * 2 // 3, h * 2 // 3)).save(
            root / "val" / "ants" / "near_copy.jpg", quality=75)
    # two train labels flipped: bees moved to ants
    flipped = [root / "train" / "ants" / f"flipped_{p.name}" for p in files["train", "bees"][:2]]
    for p, q in zip(files["train", "bees"][:2], flipped):
        p.rename(q)
    res = check_recipe.check(root, image_size=64, out_dir=tmp_path / "out", device="cpu", log=lambda m: None)
    near_leaks = [lk for lk in res.leaks if lk["kind"] == "near"]
    assert any({Path(m["path"]).name for m in lk["images"]} == {files["train", "ants"][0].name, "near_copy.jpg"}
               for lk in near_leaks), res.near_duplicates[:5]
    suspects = [Path(r["path"]).name for r in res.label_issues[:8]]
    found = [q.name for q in flipped if q.name in suspects]
    assert len(found) >= 1, (suspects, [q.name for q in flipped])
    flagged = next(r for r in res.label_issues if Path(r["path"]).name in found)
    assert flagged["given_label"] == "ants" and flagged["suggested_label"] == "bees" and 0 < flagged["score"] <= 1

"""extract on a folder of images without class folders, the usual case for embeddings."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from _fixtures import run_cli


def _pngs(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_images_directly_in_the_folder_are_unlabelled(tmp_path, monkeypatch, capsys):
    _pngs(tmp_path / "photos", 5)
    code, out, err = run_cli(monkeypatch, capsys, "extract", "lenet5", "--data", tmp_path / "photos",
                             "--out", tmp_path / "f.npz", "--device", "cpu", "--batch-size", "2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["images"] == 5 and res["classes"] == [] and "labels are -1" in res["note"]
    npz = np.load(tmp_path / "f.npz")
    assert npz["features"].shape == (5, res["feature_dim"]) and list(npz["labels"]) == [-1] * 5
    assert npz["classes"].shape == (0,) and len(npz["paths"]) == 5
    assert "labels are -1" in " ".join(err.split())

    code, out, err = run_cli(monkeypatch, capsys, "extract", "lenet5", "--data", tmp_path / "photos",
                             "--out", tmp_path / "g.npz", "--device", "cpu")
    assert code == 0 and "5 images" in out and "unlabelled" in out


def test_images_beside_sub_folders_are_all_unlabelled(tmp_path, monkeypatch, capsys):
    _pngs(tmp_path / "mixed", 2)
    _pngs(tmp_path / "mixed" / "more", 3, seed=1)
    code, out, err = run_cli(monkeypatch, capsys, "extract", "lenet5", "--data", tmp_path / "mixed",
                             "--out", tmp_path / "f.npz", "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    npz = np.load(tmp_path / "f.npz")
    assert res["images"] == 5 and res["classes"] == [] and "sub-folders" in res["note"]
    assert list(npz["labels"]) == [-1] * 5


def test_class_folders_still_give_labels(tmp_path, monkeypatch, capsys):
    _pngs(tmp_path / "d" / "a", 2)
    _pngs(tmp_path / "d" / "b", 2, seed=1)
    code, out, err = run_cli(monkeypatch, capsys, "extract", "lenet5", "--data", tmp_path / "d",
                             "--out", tmp_path / "f.npz", "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["classes"] == ["a", "b"] and res["note"] is None
    assert list(np.load(tmp_path / "f.npz")["labels"]) == [0, 0, 1, 1]

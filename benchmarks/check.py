"""What `cnnft check` finds in planted real data, how long it takes, and what calibration does.

    PYTHONPATH=. python benchmarks/check.py [--parts plant,time,calibration] [--time-images 5000]

plant: copies of the ants/bees photos ($CNNFT_DATASETS/hymenoptera_data) and of scikit-learn's
digits written as PNG files (32 px, stratified 80/20 into train/val) get planted problems:
  - exact copies of train images in val (half byte copies, half re-saved as PNG from the decoded pixels)
  - near-duplicates: a train image resized (x0.6), re-encoded (JPEG q=60), cropped (4 % a side) or
    brightness-shifted (+25 %), placed in val
  - 5 % of the train images moved to another class folder (label flipped)
then `cnnft check` runs on each (efficientnet_lite0, 64 px) and the table compares with the targets;
the near-duplicate threshold sweep shows how the default threshold was chosen: recall of the
planted copies and precision against all other pairs (distinct images, same class or not).
time: `check` on N distinct 64 px images (digits, randomly shifted and noised): cold, then warm.
calibration: trains efficientnet_lite0 (head_only, 3 epochs) on ants/bees with the val folder as
data.test and on digits (lenet5, random init, 4 epochs, digits' val as data.test) and prints the
ECE/NLL before and after the temperature on val (where it was fitted) and on test (honest), and
the accuracy before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from cnnft.data import packaged
from cnnft.recipes import check as check_recipe
from cnnft.results import datacheck

DATASETS = Path(os.environ.get("CNNFT_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
MODEL, SIZE = "efficientnet_lite0", 64
EDITS = ("resize", "reencode", "crop", "brightness")


def write_digits(root: Path, seed: int = 0, side: int = 32) -> Path:
    """scikit-learn's digits as PNG files in train/ and val/ class folders (80/20 per class)."""
    raw, target = packaged.digits_arrays()
    rng = np.random.default_rng(seed)
    for c in range(10):
        idx = rng.permutation(np.nonzero(target == c)[0])
        cut = int(len(idx) * 0.8)
        for split, part in (("train", idx[:cut]), ("val", idx[cut:])):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in part:
                img = Image.fromarray((raw[i] * 255 / 16).astype(np.uint8), "L").resize((side, side), Image.BILINEAR)
                img.save(root / split / str(c) / f"d{i:04d}.png")
    return root


def edit(img: Image.Image, how: str) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    if how == "resize":
        return img.resize((max(8, int(w * 0.6)), max(8, int(h * 0.6))), Image.BICUBIC)
    if how == "crop":
        dx, dy = max(1, int(w * 0.04)), max(1, int(h * 0.04))
        return img.crop((dx, dy, w - dx, h - dy))
    if how == "brightness":
        return ImageEnhance.Brightness(img).enhance(1.25)
    return img  # reencode: saved as a JPEG below


def plant(root: Path, n_exact: int, n_near: int, flip_share: float, seed: int = 1) -> dict:
    """Plant exact and near copies of train images into val and flip a share of train labels."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (root / "train").iterdir())
    train = sorted((root / "train").glob("*/*"))
    pick = rng.permutation(len(train))
    exact, near, flipped = [], [], []
    for k, i in enumerate(pick[:n_exact]):
        src = train[i]
        dst = root / "val" / src.parent.name / f"exact{k}_{src.stem}{src.suffix if k % 2 else '.png'}"
        if k % 2:
            shutil.copy(src, dst)
        else:
            with Image.open(src) as im:
                im.load()
                im.save(dst)
        exact.append((str(src), str(dst)))
    for k, i in enumerate(pick[n_exact:n_exact + n_near]):
        src, how = train[i], EDITS[k % len(EDITS)]
        dst = root / "val" / src.parent.name / f"near{k}_{how}_{src.stem}.jpg"
        with Image.open(src) as im:
            edit(im, how).save(dst, quality=60 if how == "reencode" else 90)
        near.append((str(src), str(dst), how))
    used = set(pick[:n_exact + n_near].tolist())
    rest = [i for i in pick[n_exact + n_near:] if i not in used]
    n_flip = max(1, round(flip_share * len(train)))
    for i in rest[:n_flip]:
        src = train[i]
        other = rng.choice([c for c in classes if c != src.parent.name])
        dst = root / "train" / other / f"flip_{src.name}"
        src.rename(dst)
        flipped.append(str(dst))
    # the near/exact sources must still be where they were: flips only use other images
    return {"exact": exact, "near": near, "flipped": flipped, "train_images": len(train)}


def score(res, planted: dict, feats_pairs: list[tuple[str, str, float]]) -> dict:
    exact_found = {frozenset(m["path"] for m in lk["images"]) for lk in res.leaks if lk["kind"] == "exact"}
    exact_hit = sum(any({a, b} <= g for g in exact_found) for a, b in planted["exact"])
    planted_pairs = {frozenset((a, b)) for a, b, _ in planted["near"]}
    near_found = {frozenset((p["a"]["path"], p["b"]["path"])) for p in res.near_duplicates}
    near_hit = len(planted_pairs & near_found)
    # precision: flagged pairs that are a planted copy and its original (exact copies are not near pairs)
    precision = near_hit / res.near_duplicate_pairs if res.near_duplicate_pairs else float("nan")
    per_edit = {how: sum(frozenset((a, b)) in near_found for a, b, h in planted["near"] if h == how) for how in EDITS}
    top = {r["path"] for r in res.label_issues[:2 * len(planted["flipped"])]}
    flip_hit = sum(p in top for p in planted["flipped"])
    return {"exact": (exact_hit, len(planted["exact"])), "near": (near_hit, len(planted_pairs)),
            "near_precision": precision, "per_edit": per_edit, "flagged_pairs": res.near_duplicate_pairs,
            "flips": (flip_hit, len(planted["flipped"])), "suspects": len(res.label_issues), "seconds": res.seconds}


def sweep(pairs_sim: list[tuple[frozenset, float]], planted: dict, thresholds) -> list[tuple[float, float, float]]:
    planted_pairs = {frozenset((a, b)) for a, b, _ in planted["near"]}
    exact = {frozenset(p) for p in planted["exact"]}  # check reports these as exact, never as near pairs
    rows = []
    for t in thresholds:
        flagged = {p for p, s in pairs_sim if s >= t and p not in exact}
        hit = len(flagged & planted_pairs)
        rows.append((t, hit / len(planted_pairs), hit / len(flagged) if flagged else float("nan")))
    return rows


def all_pairs(root: Path, low: float) -> list[tuple[frozenset, float]]:
    """Every pair above ``low`` from the same features check used (read back from the feature cache)."""
    from cnnft.run import build, cached
    from cnnft.training import runtime

    cfg, _, classes, splits, _ = check_recipe._resolve(root, MODEL, SIZE)
    bb = build.setup_backbone(cfg, len(classes))
    rt = runtime.make_runtime("cpu", False, False)
    ids, feats = [], []
    for src in splits.values():
        feats.append(cached.pooled_features(cfg, bb, src, rt, lambda m: None, False).numpy())
        ids += src.ids
    x = np.concatenate(feats)
    return [(frozenset((ids[a], ids[b])), s) for a, b, s in datacheck.similar_pairs(x, low)]


def part_plant(work: Path, names: list[str]) -> None:
    sets = {}
    if "ants-bees" in names:
        hym = work / "hymenoptera"
        shutil.copytree(DATASETS / "hymenoptera_data", hym, ignore=shutil.ignore_patterns(".*"))
        sets["ants/bees"] = (hym, plant(hym, 10, 20, 0.05))
    if "digits" in names:
        dig = write_digits(work / "digits")
        sets["digits"] = (dig, plant(dig, 20, 40, 0.05))
    print(f"\n## planted findings ({MODEL} at {SIZE} px, default near-duplicate threshold "
          f"{datacheck.NEAR_DUPLICATE_THRESHOLD})\n")
    print("| data | exact cross-split copies found | near copies found (target >= 95 %) | precision (target >= 90 %) "
          "| flipped in top 2x suspects (target >= 70 %) | check seconds |")
    print("|---|---|---|---|---|---|")
    sweeps = {}
    for name, (root, planted) in sets.items():
        res = check_recipe.check(root, model=MODEL, image_size=SIZE, out_dir=work / f"out-{name.replace('/', '-')}",
                                 device="cpu", log=lambda m: None)
        s = score(res, planted, [])
        pct = (lambda h: f"{h[0]}/{h[1]} ({h[0] / h[1]:.0%})")
        print(f"| {name} | {pct(s['exact'])} | {pct(s['near'])} (by edit: "
              f"{', '.join(f'{k} {v}' for k, v in s['per_edit'].items())}) | {s['near_precision']:.1%} of "
              f"{s['flagged_pairs']} pairs | {pct(s['flips'])} of {s['suspects']} suspects | {s['seconds']:.0f} |")
        sweeps[name] = sweep(all_pairs(root, 0.80), planted, [0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.95, 0.97])
    print("\n## near-duplicate threshold sweep (recall of planted copies / precision against every other pair)\n")
    print("| threshold | " + " | ".join(sweeps) + " |")
    print("|---|" + "---|" * len(sweeps))
    for k in range(len(next(iter(sweeps.values())))):
        t = next(iter(sweeps.values()))[k][0]
        print(f"| {t:.2f} | " + " | ".join(f"{r[k][1]:.1%} / {r[k][2]:.1%}" for r in sweeps.values()) + " |")


def part_time(work: Path, n: int) -> None:
    raw, target = packaged.digits_arrays()
    rng = np.random.default_rng(3)
    root = work / f"timing{n}"
    for k in range(n):
        i = k % len(raw)
        img = np.kron(raw[i] * 255 / 16, np.ones((8, 8)))
        img = np.roll(img, rng.integers(-4, 5, 2), axis=(0, 1)) + rng.normal(0, 8, img.shape)
        d = root / ("train" if k % 5 else "val") / str(target[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(d / f"t{k:05d}.png")
    times = []
    for _ in ("cold", "warm"):
        t0 = time.perf_counter()
        check_recipe.check(root, model=MODEL, image_size=SIZE, out_dir=work / "out-timing", device="cpu", log=lambda m: None)
        times.append(time.perf_counter() - t0)
    print(f"\n## check on {n} images at {SIZE} px ({os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.0f}; target <= 120 s)\n")
    print(f"| images | cold (features computed) | warm (features from the cache) |\n|---|---|---|\n"
          f"| {n} | {times[0]:.0f} s | {times[1]:.0f} s |")


def _train(work: Path, name: str, overrides: list[str]) -> dict:
    from cnnft.recipes import train as train_recipe

    return train_recipe.train(None, overrides + [f"output_dir={work / 'runs'}", f"name={name}", "seed=0"],
                              log=lambda m: None).to_dict()


def part_calibration(work: Path) -> None:
    hym = DATASETS / "hymenoptera_data"
    dig = write_digits(work / "digits-cal", seed=5)
    runs = {
        "ants/bees, efficientnet_lite0 head_only": _train(work, "hym", [
            f"data.train={hym / 'train'}", "data.val_split=0.3", f"data.test={hym / 'val'}", "data.num_workers=0",
            "model.backbone=efficientnet_lite0", "freeze.strategy=head_only", "train.epochs=3", "train.lr=0.01"]),
        "digits, lenet5 (random init)": _train(work, "dig", [
            f"data.train={dig / 'train'}", "data.val_split=0.3", f"data.test={dig / 'val'}", "data.num_workers=0",
            "data.image_size=32", "model.backbone=lenet5", "model.weights=none", "train.epochs=4"]),
    }
    print("\n## calibration (temperature fitted on val; test never seen by the fit)\n")
    print("| run | T | val ECE before -> after | test ECE before -> after | test NLL before -> after "
          "| test accuracy before / after |")
    print("|---|---|---|---|---|---|")
    for name, s in runs.items():
        v, t = s["calibration"]["val"], s["calibration"]["test"]
        print(f"| {name} | {v['temperature']:.3f} | {v['ece_before']:.4f} -> {v['ece_after']:.4f} | "
              f"{t['ece_before']:.4f} -> {t['ece_after']:.4f} | {t['nll_before']:.4f} -> {t['nll_after']:.4f} | "
              f"{t['accuracy_before']:.4f} / {t['accuracy_after']:.4f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="plant,time,calibration")
    ap.add_argument("--time-images", type=int, default=5000)
    ap.add_argument("--sets", default="ants-bees,digits", help="planted sets: ants-bees, digits")
    ap.add_argument("--size", type=int, default=64, help="image size of the features (plant, time)")
    args = ap.parse_args(argv)
    global SIZE
    SIZE = args.size
    os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="cnnft-bench-cache-"))
    with tempfile.TemporaryDirectory(prefix="cnnft-bench-check-") as tmp:
        work = Path(tmp)
        parts = args.parts.split(",")
        print(f"load average at start {os.getloadavg()[0]:.0f} on {os.cpu_count()} cores (a shared machine)")
        if "plant" in parts:
            part_plant(work, args.sets.split(","))
        if "time" in parts:
            part_time(work, args.time_images)
        if "calibration" in parts:
            part_calibration(work)
        sys.stdout.flush()


if __name__ == "__main__":
    main()

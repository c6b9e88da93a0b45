"""How long `cnnft freeze-plan --data DIR --model efficientnet_lite0` takes, and what it decides.

    python benchmarks/similarity.py [--classes 10 --per-class 200]

Builds a 2,000-image folder (10 classes x 200 images: scikit-learn's digits written as PNG
files, repeated with a one-pixel shift where a class has fewer than 200), then times the
measurement at the model's default input size (224 px) with the command's own code, and does
the same on ../shared/datasets/hymenoptera_data when it is there. Prints a table: data, images,
images sampled, wall seconds, CPU seconds, decision. The measurement samples at most 100
images per class and 500 in all, so its cost is bounded whatever the folder's size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnft.recipes import freeze_plan as plan_recipe  # noqa: E402

MODEL = "efficientnet_lite0"


def digits_folder(root: Path, classes: int, per_class: int) -> Path:
    """``classes`` x ``per_class`` PNG digits in class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(classes):
        imgs = d.images[d.target == c]
        out = root / str(c)
        out.mkdir(parents=True)
        for i in range(per_class):
            img = imgs[i % len(imgs)]
            if i >= len(imgs):  # a repeat: shifted by one pixel so that no two files are equal
                img = np.roll(img, 1 + i // len(imgs), axis=1)
            Image.fromarray((img * 255 / 16).astype(np.uint8)).save(out / f"{i}.png")
    return root


def timed(what: str, data_dir: Path) -> str:
    t0, c0 = time.perf_counter(), time.process_time()
    advice = plan_recipe.measured_plan(model=MODEL, data_dir=str(data_dir))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    images = sum(1 for p in data_dir.rglob("*") if p.is_file())
    m = advice.measured
    sample = (advice.sample or {}).get("images", "?")
    return (f"| {what} | {images} | {sample} | {wall:.1f} | {cpu:.1f} | "
            f"{'similar' if m.similar else 'different'}: {advice.strategy} (peak {m.peak}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("CNNFT_DATASETS", REPO.parent / "shared" / "datasets")))
    args = ap.parse_args()
    print(f"{MODEL} at its default input size, {os.cpu_count()} CPU threads, load average "
          f"{os.getloadavg()[0]:.1f} before the first run\n")
    print("| data | images | sampled | wall s | CPU s | decision |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = digits_folder(Path(tmp) / "digits", args.classes, args.per_class)
        print(timed(f"digits as PNG files, {args.classes} x {args.per_class}", folder), flush=True)
    hym = args.root / "hymenoptera_data" / "train"
    if hym.is_dir():
        print(timed("hymenoptera_data/train (JPEG photos)", hym), flush=True)


if __name__ == "__main__":
    main()

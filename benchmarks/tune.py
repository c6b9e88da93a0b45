"""What `cnnft tune --budget` buys over `cnnft train`'s defaults, side by side in one run, per data set:

  train: `cnnft train` given only the data, the backbone, the image size and the epochs;
  tune:  `cnnft tune` on the same config with `--budget`.

    python benchmarks/tune.py [--budget 10m] [--datasets digits hymenoptera] [--epochs 10] [--digits-size 64]
        [--photo-size N]

Each data set gets a test split neither command selects on: digits (scikit-learn's, 8x8 written
as PNGs) is cut 60/20/20; ants/bees keeps its train folder and splits its val folder in half
(val / test). Printed: val accuracy (tune's is the winner's selection score, optimistic), test
accuracy, wall seconds of the whole command (process start included) against the budget, and
trials run / pruned. Nothing is asserted: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnft.config import duration_seconds  # noqa: E402
from cnnft.data import packaged  # noqa: E402

BACKBONE = "efficientnet_lite0"  # packaged ImageNet weights: runs offline


def digits_folders(root: Path) -> dict[str, Path]:
    """scikit-learn's digits as class folders of PNGs: train 60 %, val 20 %, test 20 % (seeded)."""
    images, target = packaged.digits_arrays()
    order = np.random.default_rng(0).permutation(len(target))
    cut = {"train": order[: int(0.6 * len(order))], "val": order[int(0.6 * len(order)): int(0.8 * len(order))],
           "test": order[int(0.8 * len(order)):]}
    for split, idx in cut.items():
        for i in idx:
            d = root / split / str(int(target[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.asarray(images[i]).reshape(8, 8) * 255 / 16).astype(np.uint8)).save(d / f"{i}.png")
    return {k: root / k for k in cut}


def hymenoptera_folders(src: Path, root: Path) -> dict[str, Path]:
    """ants/bees: its train folder; its val folder split in half (every other image) into val and test."""
    for cls in sorted(p.name for p in (src / "val").iterdir() if p.is_dir()):
        for k, f in enumerate(sorted((src / "val" / cls).iterdir())):
            d = root / ("val" if k % 2 == 0 else "test") / cls
            d.mkdir(parents=True, exist_ok=True)
            (d / f.name).symlink_to(f.resolve())
    return {"train": src / "train", "val": root / "val", "test": root / "test"}


def _run(argv: list[str], cwd: Path) -> tuple[dict, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cnnft", *argv, "--json"], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"cnnft {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout), wall


def compare(name: str, folders: dict[str, Path], size: int | None, epochs: int, budget: str, work: Path) -> list[dict]:
    cfg = work / f"{name}.yaml"
    cfg.write_text(f"name: {name}\noutput_dir: {work / 'runs'}\nseed: 0\n"
                   f"data: {{train: {folders['train']}, val: {folders['val']}, test: {folders['test']}, "
                   f"image_size: {size if size else 'null'}}}\nmodel: {{backbone: {BACKBONE}}}\n"
                   f"train: {{epochs: {epochs}}}\n")
    tr, tr_wall = _run(["train", str(cfg)], work)
    tu, tu_wall = _run(["tune", str(cfg), "--budget", budget], work)
    best = tu["best"] or {}
    return [
        {"data": name, "how": "train defaults", "val": tr["best_val_acc"], "test": tr["test_acc"], "wall": tr_wall,
         "budget": None, "trials": "-", "plan": tr["strategy"]},
        {"data": name, "how": f"tune --budget {budget}", "val": best.get("value"),
         "test": (tu["test"] or {}).get("accuracy"), "wall": tu_wall, "budget": duration_seconds(budget),
         "trials": f"{tu['trials_run']} ({tu['trials_pruned']} pruned)",
         "plan": "default" if best.get("default_plan") else _plan(best.get("params") or {})},
    ]


def _plan(p: dict) -> str:
    return f"depth {p.get('trainable_stages')}, lr {p.get('lr', 0):.2g}, {p.get('image_size', '')}px".strip()


HEADER = (f"{'data':<12} {'run':<20} {'val acc':>8} {'test acc':>9} {'wall s':>8} {'budget s':>9} "
          f"{'wall/budget':>12} {'trials':>14}  winner")


def _row(r: dict) -> str:
    ratio = f"{r['wall'] / r['budget']:.3f}" if r["budget"] else "-"
    val = f"{r['val']:.4f}" if r["val"] is not None else "-"
    test = f"{r['test']:.4f}" if r["test"] is not None else "-"
    return (f"{r['data']:<12} {r['how']:<20} {val:>8} {test:>9} {r['wall']:>8.0f} "
            f"{(r['budget'] or 0):>9.0f} {ratio:>12} {r['trials']:>14}  {r['plan']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="10m")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--datasets", nargs="+", default=["digits", "hymenoptera"])
    ap.add_argument("--digits-size", type=int, default=64, help="digits' input size (8x8 images upscaled)")
    ap.add_argument("--photo-size", type=int, default=None, help="ants/bees' input size (default: the weights')")
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("CNNFT_DATASETS", REPO.parent / "shared" / "datasets")))
    args = ap.parse_args()
    print(HEADER, flush=True)  # each pair of rows as soon as it is measured
    with tempfile.TemporaryDirectory(prefix="cnnft-tune-bench-") as tmp:
        work = Path(tmp)
        for name in args.datasets:
            if name == "digits":
                folders, size = digits_folders(work / "digits"), args.digits_size
            else:
                folders, size = hymenoptera_folders(args.root / "hymenoptera_data", work / "hym"), args.photo_size
            for r in compare(name, folders, size, args.epochs, args.budget, work):
                print(_row(r), flush=True)
    print(f"backbone {BACKBONE}; {args.epochs} epochs; {os.cpu_count()} CPU cores; tune's val is its selection "
          "score (optimistic), test is the winner's best.pt on a split neither command chose on")


if __name__ == "__main__":
    main()

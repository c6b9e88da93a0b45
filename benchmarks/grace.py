"""How long must a trial run before it may be judged? `cnnft tune`'s grace period, measured:
the head alone against the whole network fine-tuned, epoch by epoch, on the same data.

    python benchmarks/grace.py [--epochs 3] [--datasets digits hymenoptera]

Printed: validation accuracy after each epoch for head_only and full (no head phase, so epoch 1
is the first epoch of each plan). Where full trails after epoch 1 and leads later, a pruner with a
grace period of 1 epoch would stop the plan that wins.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnft.recipes import train as train_recipe  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from tune import digits_folders, hymenoptera_folders  # noqa: E402


def curve(folders: dict, size: int | None, strategy: str, epochs: int, out: Path) -> list[float]:
    s = train_recipe.train(None, [f"data.train={folders['train']}", f"data.val={folders['val']}",
                                  f"data.image_size={size or 'null'}", "model.backbone=efficientnet_lite0",
                                  f"freeze.strategy={strategy}", "train.head_phase=false", f"train.epochs={epochs}",
                                  f"output_dir={out}", f"name={strategy}"], log=lambda m: None)
    with open(Path(s.run_dir) / "metrics.csv") as f:
        return [float(r["val_acc"]) for r in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=["digits", "hymenoptera"])
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("CNNFT_DATASETS", REPO.parent / "shared" / "datasets")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnft-grace-") as tmp:
        work = Path(tmp)
        print(f"{'data':<12} {'plan':<10} " + " ".join(f"{'epoch ' + str(e + 1):>8}" for e in range(args.epochs)))
        for name in args.datasets:
            if name == "digits":
                folders, size = digits_folders(work / "digits"), 64
            else:
                folders, size = hymenoptera_folders(args.root / "hymenoptera_data", work / "hym"), None
            for strategy in ("head_only", "full"):
                accs = curve(folders, size, strategy, args.epochs, work / "runs" / name)
                print(f"{name:<12} {strategy:<10} " + " ".join(f"{a:>8.4f}" for a in accs), flush=True)


if __name__ == "__main__":
    main()

"""Does the default recipe beat the ten-line alternative? Side by side in one run, per dataset:

  (a) the linear probe: scikit-learn's LogisticRegression on the frozen backbone's features
      (`cnnft extract` + the README's example), and
  (b) `cnnft train` given only the data, the backbone, the image size, `freeze.similar` and an
      epoch budget; everything else default.

    python benchmarks/quality.py [--epochs 10] [--datasets digits hymenoptera]

Prints a table (data, recipe, val accuracy, wall seconds) and the margin over the probe.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnft import data, models, transforms  # noqa: E402
from cnnft.config import DataConfig  # noqa: E402
from cnnft.recipes import train as train_recipe  # noqa: E402

BACKBONE = "efficientnet_lite0"


def datasets(root: Path) -> dict[str, dict]:
    hym = root / "hymenoptera_data"
    return {
        "digits": {"data": DataConfig(dataset="digits"), "size": 96, "similar": False,
                   "overrides": ["data.dataset=digits"], "what": "scikit-learn digits, 8x8 upscaled (small, different)"},
        "hymenoptera": {"data": DataConfig(train=str(hym / "train"), val=str(hym / "val")), "size": None,
                        "similar": True, "overrides": [f"data.train={hym / 'train'}", f"data.val={hym / 'val'}"],
                        "what": "ants/bees photos (small, similar)"},
    }


@torch.inference_mode()
def features(bb: models.Backbone, src: data.Source, pre: models.Preprocess) -> np.ndarray:
    """Penultimate features (the head's input) of every sample, eval preprocessing."""
    captured: list[torch.Tensor] = []
    hook = models.head_module(bb.model).register_forward_pre_hook(
        lambda _m, inp: captured.append(inp[0].flatten(1)))
    loader = data.make_loader(data.ImageDataset(src, transforms.eval_transform(pre), pre.resize_size), 64, 0)
    bb.model.eval()
    for x, _ in loader:
        bb.model(x)
    hook.remove()
    return torch.cat(captured).numpy()


def probe(spec: dict) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    bundle = data.build_data(spec["data"], seed=0)
    bb = models.build(BACKBONE, "DEFAULT", None)
    pre = bb.preprocess.with_size(spec["size"])
    xtr, xva = features(bb, bundle.train, pre), features(bb, bundle.val, pre)
    clf = LogisticRegression(max_iter=3000).fit(xtr, bundle.train.labels)
    return float(clf.score(xva, bundle.val.labels)), time.perf_counter() - t0


def cnnft_default(spec: dict, epochs: int) -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        s = train_recipe.train(None, [*spec["overrides"], f"model.backbone={BACKBONE}",
                                      f"data.image_size={spec['size'] or 'null'}",
                                      f"freeze.similar={'true' if spec['similar'] else 'false'}",
                                      f"train.epochs={epochs}", f"output_dir={out}",
                                      f"train.cache_dir={Path(out) / 'cache'}"], log=lambda m: None)
        return s.best_val_acc, time.perf_counter() - t0, f"{s.strategy}, best epoch {s.best_epoch}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--datasets", nargs="+", default=["digits", "hymenoptera"])
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("CNNFT_DATASETS", REPO.parent / "shared" / "datasets")))
    args = ap.parse_args()
    specs = datasets(args.root)
    print(f"backbone {BACKBONE} (ImageNet weights), {os.cpu_count()} CPU threads, torch {torch.__version__}\n")
    print("| data | recipe | val acc | wall s | margin over probe |\n|---|---|---|---|---|")
    for name in args.datasets:
        spec = specs[name]
        p_acc, p_s = probe(spec)
        print(f"| {name}: {spec['what']} | linear probe (LogisticRegression on frozen features) | {p_acc:.4f} | "
              f"{p_s:.0f} | |", flush=True)
        acc, secs, how = cnnft_default(spec, args.epochs)
        print(f"| | cnnft defaults, {args.epochs} epochs ({how}) | {acc:.4f} | {secs:.0f} | "
              f"{(acc - p_acc) * 100:+.1f} points |", flush=True)


if __name__ == "__main__":
    main()

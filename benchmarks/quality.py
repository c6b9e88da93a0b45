"""Does the default recipe beat the ten-line alternative? Side by side in one run, per dataset:

  (a) the linear probe: scikit-learn's LogisticRegression on the frozen backbone's features
      (`cnnft extract` + the README's example), and
  (b) `cnnft train` given only the data, the backbone, the image size and an epoch budget;
      everything else default (so `freeze.similar: auto` measures the data's likeness to
      ImageNet and plans from it), and
  (c) the same with `freeze.similar` set as a user would guess it (digits: false, ants/bees:
      true), the quadrant table's plan without the measurement.

    python benchmarks/quality.py [--epochs 10] [--datasets digits hymenoptera]

Prints a table (data, recipe, val accuracy, wall seconds) and the margin over the probe; the
guessed quadrant's row also gives the measured plan's margin over it.
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

from cnnft import models
from cnnft.config import DataConfig  # noqa: E402
from cnnft.data import folders as data  # noqa: E402
from cnnft.data import transforms
from cnnft.recipes import train as train_recipe  # noqa: E402

BACKBONE = "efficientnet_lite0"
LOG = lambda m: None  # noqa: E731  (--verbose: the runs' own log lines on stderr)


def datasets(root: Path) -> dict[str, dict]:
    hym = root / "hymenoptera_data"
    return {
        "digits": {"data": DataConfig(dataset="digits"), "size": 64, "similar": False,
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


def cnnft_default(spec: dict, epochs: int, guess: bool = False) -> tuple[float, float, str]:
    """`cnnft train` with defaults; ``guess``: with freeze.similar as a user would guess it."""
    guessed = [f"freeze.similar={'true' if spec['similar'] else 'false'}"] if guess else []
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        s = train_recipe.train(None, [*spec["overrides"], f"model.backbone={BACKBONE}",
                                      f"data.image_size={spec['size'] or 'null'}", *guessed,
                                      f"train.epochs={epochs}", f"output_dir={out}",
                                      f"train.cache_dir={Path(out) / 'cache'}"], log=LOG)
        trained = _trained_stages(Path(s.run_dir))
        return s.best_val_acc, time.perf_counter() - t0, f"{s.strategy}: {trained}, best epoch {s.best_epoch}"


def _trained_stages(run: Path) -> str:
    import json

    plan = json.loads((run / "freeze_plan.json").read_text())
    body = [st["name"] for st in plan["stages"] if not st["frozen"] and st["name"] != "head"]
    return (f"{body[0]}..{body[-1]} + head" if len(body) > 1 else f"{body[0]} + head") if body else "head"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--datasets", nargs="+", default=["digits", "hymenoptera"])
    ap.add_argument("--no-guessed", dest="guessed", action="store_false",
                    help="skip the runs with freeze.similar guessed (the quadrant table without measurement)")
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("CNNFT_DATASETS", REPO.parent / "shared" / "datasets")))
    ap.add_argument("--verbose", action="store_true", help="show the training runs' log lines on stderr")
    args = ap.parse_args()
    if args.verbose:
        global LOG
        LOG = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    specs = datasets(args.root)
    print(f"backbone {BACKBONE} (ImageNet weights), {os.cpu_count()} CPU threads, torch {torch.__version__}\n")
    print("| data | recipe | val acc | wall s | margin over probe |\n|---|---|---|---|---|")
    for name in args.datasets:
        spec = specs[name]
        p_acc, p_s = probe(spec)
        print(f"| {name}: {spec['what']} | linear probe (LogisticRegression on frozen features) | {p_acc:.4f} | "
              f"{p_s:.0f} | |", flush=True)
        acc, secs, how = cnnft_default(spec, args.epochs)
        print(f"| | cnnft defaults, similarity measured, {args.epochs} epochs ({how}) | {acc:.4f} | {secs:.0f} | "
              f"{(acc - p_acc) * 100:+.1f} points |", flush=True)
        if args.guessed:
            g_acc, g_secs, g_how = cnnft_default(spec, args.epochs, guess=True)
            print(f"| | cnnft defaults, freeze.similar={str(spec['similar']).lower()} guessed ({g_how}) | "
                  f"{g_acc:.4f} | {g_secs:.0f} | {(g_acc - p_acc) * 100:+.1f} points; measured plan "
                  f"{(acc - g_acc) * 100:+.1f} points over the guess |", flush=True)


if __name__ == "__main__":
    main()

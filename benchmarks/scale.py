"""cnnft's cost as the data grows: memory, passes over the images and wall time per phase.

Builds (once, under the cache folder, never in the repository) class folders of 5,000 / 20,000 /
60,000 PNG images made from scikit-learn's digits (8x8, upscaled to 28 px, each copy shifted,
rotated and noised), then runs, each in a fresh process so that its peak RSS is its own
(``resource.getrusage``):

  plain       a hand-written loop: the same model with its backbone frozen, the head trained on
              every image each epoch (ImageFolder-like list + PIL, batch 32), no validation; and
              the same loop training the stages the measured plan trains (the loop that plan's
              cache replaces)
  head_only   ``cnnft train`` with freeze.strategy=head_only (head phase + epochs)
  measured    ``cnnft train`` with the plan its similarity probe picks (freeze.strategy=auto)

all EfficientNet-Lite0 with its packaged weights at 64 px, for ``--epochs`` epochs. Printed per
size and case: wall per phase (pre-scan, similarity probe, cache setup, head phase, time to the
first epoch line, total), peak RSS, bytes stored in the feature cache, passes over the images
(decodes after the pre-scan / images) and the plain loop's wall beside, with the targets:
peak RSS at 60k <= 2.5 GB, flat from 20k to 60k (<= +15 %), first epoch line <= the plain loop's
first epoch + 10 %.

    python benchmarks/scale.py [--sizes 5000 20000 60000] [--epochs 1] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZE_PX = 64
MODEL = "efficientnet_lite0"


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnft" / "bench-scale"


def build_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` digits images in 10 class folders (made once; a finished folder has a DONE file)."""
    from PIL import Image
    from scipy import ndimage
    from sklearn.datasets import load_digits

    out = root / f"digits-{n}"
    if (out / "DONE").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(10):
        (out / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(d.images)
        img = ndimage.zoom(d.images[k] / 16.0, 28 / 8, order=1)
        img = ndimage.rotate(img, rng.uniform(-15, 15), reshape=False, order=1)
        img = ndimage.shift(img, rng.uniform(-2, 2, 2), order=1)
        img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(out / str(d.target[k]) / f"{i:06d}.png")
    (out / "DONE").write_text("")
    return out


def _count_decodes(counter) -> None:
    """Count every image decode (in this process and its forked loader workers)."""
    from cnnft.data import folders

    original = folders.open_image

    def counted(*args, **kwargs):
        with counter.get_lock():
            counter.value += 1
        return original(*args, **kwargs)

    folders.open_image = counted


class _Images:
    """The plain loop's dataset: a file list, PIL decoding, torchvision transforms."""

    def __init__(self, files, labels, tf, open_image) -> None:
        self.files, self.labels, self.tf, self.open_image = files, labels, tf, open_image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.tf(self.open_image(str(self.files[i]))), self.labels[i]


def plain_case(folder: str, epochs: int, frozen: list[str] | None, q) -> None:
    """``frozen``: the stages kept frozen (BatchNorm in them too); None: every stage but the head."""
    mp.set_start_method("fork", force=True)  # loader workers share the decode counter
    from types import SimpleNamespace

    import torch
    from torch import nn
    from torchvision import transforms as T

    from cnnft import models
    from cnnft.data.folders import open_image
    from cnnft.training import freeze

    t0 = time.perf_counter()
    torch.manual_seed(0)
    bb = models.build(MODEL, "DEFAULT", 10)
    if frozen is None:
        frozen = [st.name for st in bb.stages if st.name != "head"]
    freeze.apply_plan(bb.model, bb.stages, SimpleNamespace(frozen=frozen, batchnorm="train"))
    pre = bb.preprocess
    tf = T.Compose([T.RandomResizedCrop(SIZE_PX, scale=(0.35, 1.0)), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    files = sorted(Path(folder).rglob("*.png"))
    labels = [int(f.parent.name) for f in files]

    loader = torch.utils.data.DataLoader(_Images(files, labels, tf, open_image), batch_size=32, shuffle=True,
                                         num_workers=2)
    opt = torch.optim.AdamW([p for p in bb.model.parameters() if p.requires_grad], lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    firsts = []
    for _ in range(epochs):
        t = time.perf_counter()
        bb.model.train()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(models.logits_of(bb.model(x)), y).backward()
            opt.step()
        firsts.append(time.perf_counter() - t)
    q.put({"wall": time.perf_counter() - t0, "epoch": firsts[0],
           "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def cnnft_case(folder: str, epochs: int, strategy: str, cache_dir: str, q) -> None:
    mp.set_start_method("fork", force=True)  # loader workers share the decode counter
    counter = mp.Value("q", 0)
    _count_decodes(counter)
    from cnnft.recipes import train as train_recipe

    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()

    def log(m: str) -> None:
        marks.append((time.perf_counter() - t0, m))
        print(f"  [{marks[-1][0]:7.1f}s] {m}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as out:
        s = train_recipe.train(None, [f"data.train={folder}", "data.val_split=0.1", f"model.backbone={MODEL}",
                                      f"data.image_size={SIZE_PX}", f"freeze.strategy={strategy}",
                                      f"train.epochs={epochs}", f"output_dir={out}", f"train.cache_dir={cache_dir}",
                                      "data.num_workers=2"], log=log)
        plan = json.loads((Path(s.run_dir) / "freeze_plan.json").read_text())
    wall = time.perf_counter() - t0

    def at(text: str) -> float | None:
        return next((t for t, m in marks if text in m), None)

    stored = sum(p.stat().st_size for p in Path(cache_dir).glob("*.npy"))
    images = s.train_images + s.val_images
    q.put({"wall": wall, "checked": at("checked "), "similarity": at("similarity:"), "cache": at("feature cache"),
           "head": at("head phase  train"), "first_epoch": at(f"epoch 1/{epochs}"),
           "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "stored": stored,
           "passes": (counter.value - images) / images, "strategy": s.strategy, "acc": s.best_val_acc,
           "frozen": [st["name"] for st in plan["stages"] if st["frozen"]]})


def apart(fn, *args) -> dict:
    """``fn`` in a fresh process (forked loader workers stay its children); its result."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    got = q.get()
    p.join()
    return got


def _plain_row(n: int, strategy: str, plain: dict, epochs: int) -> None:
    print(f"{n:>7} {'plain':<10} {strategy:<12} {'':>8} {'':>6} {'':>6} {'':>6} {_s(plain['epoch']):>7} "
          f"{_s(plain['wall']):>7} {'':>9} {'':>6} {plain['rss'] / 2**30:>7.2f}GB {'-':>9} {epochs:>6.2f}", flush=True)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 60000])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--root", type=Path, default=default_root())
    ap.add_argument("--cases", nargs="+", default=["plain", "head_only", "measured"])
    args = ap.parse_args()
    print(f"{MODEL}, packaged weights, {SIZE_PX} px, {args.epochs} epoch(s); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'images':>7} {'case':<10} {'strategy':<12} {'pre-scan':>8} {'probe':>6} {'cache':>6} {'head':>6} "
          f"{'1st ep':>7} {'total':>7} {'plain 1st':>9} {'plain':>6} {'peak RSS':>9} {'stored':>9} {'passes':>6}",
          flush=True)
    rss: dict[tuple[str, int], int] = {}
    for n in args.sizes:
        folder = str(build_folder(args.root, n))
        plain = apart(plain_case, folder, args.epochs, None) if "plain" in args.cases else None
        if plain:
            rss[("plain", n)] = plain["rss"]
            _plain_row(n, "head_only", plain, args.epochs)
        for case in [c for c in args.cases if c != "plain"]:
            with tempfile.TemporaryDirectory() as cache_dir:
                r = apart(cnnft_case, folder, args.epochs, "head_only" if case == "head_only" else "auto", cache_dir)
            rss[(case, n)] = r["rss"]
            against = plain
            if plain and r["strategy"] != "head_only":  # the loop this plan's cache replaces trains its stages
                against = apart(plain_case, folder, args.epochs, r["frozen"])
                _plain_row(n, r["strategy"], against, args.epochs)
            first = r["first_epoch"]
            target = "" if not against or first is None else (
                " ok" if first <= against["epoch"] * 1.1 + (r["checked"] or 0) + (r["similarity"] or 0) else " SLOW")
            print(f"{n:>7} {case:<10} {r['strategy']:<12} {_s(r['checked']):>8} {_s(r['similarity']):>6} "
                  f"{_s(r['cache']):>6} {_s(r['head']):>6} {_s(first):>7} {_s(r['wall']):>7} "
                  f"{_s(against['epoch'] if against else None):>9} {_s(against['wall'] if against else None):>6} "
                  f"{r['rss'] / 2**30:>7.2f}GB {r['stored'] / 2**20:>7.0f}MB {r['passes']:>6.2f}{target}", flush=True)
    print("targets: peak RSS at 60k <= 2.5 GB; flat 20k -> 60k (<= +15 %); first epoch line <= the first epoch of "
          "the plain loop training the same stages + 10 % (after the pre-scan and probe, which it does not make)")
    for case in [c for c in args.cases if c != "plain"]:
        got = {n: rss[(case, n)] for (c, n) in rss if c == case}
        if 60000 in got:
            print(f"  {case}: peak RSS at 60k {got[60000] / 2**30:.2f} GB "
                  f"({'ok' if got[60000] <= 2.5 * 2**30 else 'over'})")
        if 20000 in got and 60000 in got:
            grow = got[60000] / got[20000] - 1
            print(f"  {case}: 20k -> 60k {grow:+.0%} ({'ok' if grow <= 0.15 else 'over'})")
    print(json.dumps({f"{c}/{n}": v for (c, n), v in rss.items()}))


if __name__ == "__main__":
    main()

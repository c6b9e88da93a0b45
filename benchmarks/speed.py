"""cnnft against a plain training loop, side by side in one run, on the data at hand.

The plain loop is the PyTorch transfer-learning tutorial's: torchvision ImageFolder + PIL,
the same model, batch size and optimizer, every epoch through the whole network, run in a
fresh interpreter (nothing cnnft sets up in its process helps it). cnnft runs its own recipe
for the strategy. Printed per case: wall seconds and images/s of each, their ratio, the
accuracy reached, and the achieved FLOP rate as a fraction of a matmul peak measured in the
same run (the higher of torch.mm's and oneDNN's).

    python benchmarks/speed.py [--data ../shared/datasets/hymenoptera_data] [--epochs 10] [--quick]

Cases:
  head_only  EfficientNet-Lite0 at 224 px on the ants/bees photos: plain loop vs cnnft with a cold
             feature cache vs cnnft with the cache of the previous run (warm)
  freeze_most  EfficientNet-Lite0 at 64 px on scikit-learn's digits: cnnft uncached vs cached
  full       ResNet-18 at 112 px: plain loop vs cnnft, training images/s and the FLOP rate of the
             training epoch and of its steps without the time spent waiting for images
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnft import models
from cnnft.recipes import train as train_recipe  # noqa: E402
from cnnft.training import freeze  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """fp32 GFLOP/s of an n x n x n matmul on this machine, the best of ``repeats``: by torch.mm
    (the BLAS torch links, MKL) and by oneDNN, the library that runs convolutions, as a 1x1
    convolution of the same shape. MKL may take a slow path on some CPUs (AMD's, seen here at
    half oneDNN's rate), so the higher of the two is the peak the FLOP rates are set against."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    blas = 2 * n ** 3 / _best(lambda: torch.mm(a, b, out=out), repeats) / 1e9
    x = torch.randn(1, n, n // 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        dnn = 2 * n ** 3 / _best(lambda: torch.conv2d(x, w), repeats) / 1e9
    return blas, dnn


def train_flops_per_image(model: nn.Module, size: int) -> float:
    """Forward FLOPs of one image x 3 (forward + backward of a fully trained network)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return 3.0 * counter.get_total_flops()


def plain_loop(name: str, train_dir: Path, val_dir: Path, strategy: str, size: int, epochs: int,
               lr: float, batch: int = 32, steps: int | None = None) -> dict:
    """The tutorial's loop: ImageFolder + PIL + transforms, every epoch through the whole model."""
    from torchvision import datasets
    from torchvision import transforms as T

    torch.manual_seed(0)
    bb = models.build(name, "DEFAULT" if name != "resnet18" else "none", 2)
    pre = bb.preprocess.with_size(size)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, lr)
    freeze.apply_plan(bb.model, bb.stages, plan)
    norm = T.Normalize(pre.mean, pre.std)
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(pre.resize_size), T.CenterCrop(size), T.ToTensor(), norm])
    tr = torch.utils.data.DataLoader(datasets.ImageFolder(train_dir, train_tf), batch_size=batch, shuffle=True)
    va = torch.utils.data.DataLoader(datasets.ImageFolder(val_dir, val_tf), batch_size=batch)
    opt = torch.optim.AdamW(freeze.param_groups(bb.model, bb.stages, plan, 0.01), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    seen, train_s, wait_s, acc = 0, 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    for _ in range(epochs):
        bb.model.train()
        t = waiting = time.perf_counter()
        for i, (x, y) in enumerate(tr):
            wait_s += time.perf_counter() - waiting
            if steps is not None and i >= steps:
                break
            opt.zero_grad()
            loss_fn(models.logits_of(bb.model(x)), y).backward()
            opt.step()
            seen += len(y)
            waiting = time.perf_counter()
        train_s += time.perf_counter() - t
        if steps is None:
            bb.model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in va:
                    correct += int((bb.model(x).argmax(1) == y).sum())
                    total += len(y)
            acc = correct / total
    return {"wall": time.perf_counter() - t0, "images_per_s": seen / train_s, "acc": acc,
            "data_wait": wait_s / train_s}


def plain_loop_apart(*args, **kwargs) -> dict:
    """The plain loop in a fresh interpreter: cnnft tunes the process's C allocator when it runs
    on CPU (see cnnft.training.runtime.tune_cpu_allocator), and a hand-written loop has no such help."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(plain_loop, args, kwargs)


def cnnft_run(overrides: list[str], cache_dir: Path) -> dict:
    """``cnnft train`` with these overrides; wall time of the whole recipe (data check, caching)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        s = train_recipe.train(None, [*overrides, f"output_dir={out}", f"train.cache_dir={cache_dir}",
                                      "data.num_workers=0"], log=lambda m: None)
        wall = time.perf_counter() - t0
        import csv

        with open(Path(s.run_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["phase"] == "train"]
    ips = sum(float(r["images_per_second"]) for r in rows) / max(len(rows), 1)
    wait = sum(float(r["data_wait"]) for r in rows) / max(len(rows), 1)
    return {"wall": wall, "images_per_s": ips, "acc": s.best_val_acc, "data_wait": wait}


def flop_note(r: dict, flops: float, peak: float) -> str:
    """The FLOP rate of the training epoch and of its steps alone (the time not spent waiting
    for images), each against the peak."""
    epoch = r["images_per_s"] * flops / 1e9
    steps = epoch / max(1.0 - r["data_wait"], 1e-9)
    return (f"epoch {epoch:.0f} GFLOP/s = {epoch / peak:.2f} of peak; steps alone {steps:.0f} GFLOP/s = "
            f"{steps / peak:.2f} ({r['data_wait']:.0%} of the epoch waits for images)")


def row(case: str, who: str, r: dict, base: dict | None, extra: str = "") -> str:
    ratio = f"{base['wall'] / r['wall']:.1f}x" if base else "1.0x"
    return (f"| {case} | {who} | {r['wall']:.1f} | {r['images_per_s']:.0f} | {ratio} | "
            f"{r['acc']:.4f} | {extra} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CNNFT_DATASETS", REPO.parent / "shared" / "datasets")) / "hymenoptera_data")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="2 epochs per case (a smoke run of the script)")
    args = ap.parse_args()
    epochs = 2 if args.quick else args.epochs
    torch.set_num_threads(os.cpu_count() or 1)
    blas, dnn = matmul_peak()
    peak = max(blas, dnn)
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}; fp32 matmul peak {peak:.0f} GFLOP/s "
          f"(torch.mm {blas:.0f}, oneDNN 1x1 convolution {dnn:.0f})")
    print(f"\n| case | run | wall s | train images/s | speed-up | best val acc | notes |\n|---|---|---|---|---|---|---|")
    tr, va = args.data / "train", args.data / "val"

    # 1. head_only, Lite0 at 224 px, ants/bees
    plain = plain_loop_apart("efficientnet_lite0", tr, va, "head_only", 224, epochs, lr=0.01)
    print(row("head_only, Lite0 224 px, hymenoptera", "plain loop", plain, None), flush=True)
    # cnnft's own recipe for this strategy (its defaults: learning rate, augmentation, head phase)
    common = [f"data.train={tr}", f"data.val={va}", "model.backbone=efficientnet_lite0",
              "freeze.strategy=head_only", f"train.epochs={epochs}"]
    with tempfile.TemporaryDirectory() as cache:
        cold = cnnft_run(common, Path(cache))
        print(row("", "cnnft, cold cache", cold, plain), flush=True)
        warm = cnnft_run(common, Path(cache))
        print(row("", "cnnft, warm cache", warm, plain), flush=True)

    # 2. freeze_most, Lite0 at 64 px, digits: cached vs uncached, everything else equal
    digits = ["data.dataset=digits", "data.image_size=64", "model.backbone=efficientnet_lite0",
              "freeze.strategy=freeze_most", "freeze.similar=false", f"train.epochs={epochs}"]
    with tempfile.TemporaryDirectory() as cache:
        off = cnnft_run([*digits, "train.feature_cache=off", "train.head_phase=false"], Path(cache))
        print(row("freeze_most, Lite0 64 px, digits", "cnnft, uncached", off, None), flush=True)
        on = cnnft_run([*digits, "train.head_phase=false"], Path(cache))
        print(row("", "cnnft, cached", on, off), flush=True)

    # 3. full fine-tune, ResNet-18 at 112 px: training steps only (a fixed number per run)
    steps = 4 if args.quick else 8
    plain = plain_loop_apart("resnet18", tr, va, "full", 112, 1, lr=0.001, steps=steps)
    flops = train_flops_per_image(models.build("resnet18", "none", 2).model, 112)
    print(row("full, ResNet-18 112 px", "plain loop", plain, None, flop_note(plain, flops, peak)))
    ours = cnnft_run([f"data.train={tr}", f"data.val={va}", "model.backbone=resnet18", "model.weights=none",
                      "freeze.strategy=full", "data.image_size=112", "train.epochs=1"], Path(tempfile.mkdtemp()))
    ours["wall"] = plain["wall"] * plain["images_per_s"] / ours["images_per_s"]  # compare the steps' rates
    print(row("", "cnnft", ours, plain, flop_note(ours, flops, peak) + "; speed-up of the training images/s"))

if __name__ == "__main__":
    main()

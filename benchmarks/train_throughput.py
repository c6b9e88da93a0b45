"""Training throughput of one backbone under the options that matter on a CPU, side by side.

    python benchmarks/train_throughput.py [--model resnet18] [--size 160] [--batch 32] [--steps 6]

Prints images/second for each freeze strategy with channels_last on and off (synthetic
batches, so decoding is excluded), and the ratios between them. Random init: the speed does
not depend on the weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cnnft import freeze, models


def measure(name: str, strategy: str, channels_last: bool, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    bb = models.build(name, "none", 10)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, 1e-3)
    freeze.apply_plan(bb.model, bb.stages, plan)
    model = bb.model.train()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(freeze.param_groups(model, bb.stages, plan, 0.01))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(models.logits_of(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    print(f"{a.model} @ {a.size}px, batch {a.batch}, {torch.get_num_threads()} threads")
    print(f"{'strategy':<14}{'contiguous':>12}{'channels_last':>15}{'ratio':>8}")
    base = None
    for strategy in ("full", "freeze_early", "freeze_most", "head_only"):
        plain = measure(a.model, strategy, False, a.size, a.batch, a.steps)
        cl = measure(a.model, strategy, True, a.size, a.batch, a.steps)
        base = base or plain
        print(f"{strategy:<14}{plain:>10.1f}/s{cl:>13.1f}/s{cl / plain:>7.2f}x")
    print("(images/second of a full training step; ratio = channels_last / contiguous)")


if __name__ == "__main__":
    main()

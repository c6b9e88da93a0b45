"""Training speed and memory of one backbone under each freeze strategy, side by side.

    python benchmarks/train_throughput.py [--model resnet18] [--size 160] [--batch 32] [--steps 6]

For each freeze strategy, with channels_last off and on, prints images/second of a full
training step (forward, backward, optimizer) and the memory the steps add on top of the built
model (peak resident memory, CPU). Every configuration runs in a fresh process, so neither
warm-up order nor an earlier peak colours another's figures. Synthetic batches: decoding is
excluded (see decode.py). Random init: the speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

STRATEGIES = ("full", "freeze_early", "freeze_most", "head_only")


def _peak_mb() -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(name: str, strategy: str, channels_last: bool, size: int, batch: int, steps: int) -> dict:
    import torch
    from torch import nn

    from cnnft import models
    from cnnft.training import freeze

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

    before = _peak_mb()
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = batch * steps / (time.perf_counter() - t0)
    return {"rate": rate, "added_mb": _peak_mb() - before, "trainable": plan.trainable_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--one", nargs=2, metavar=("STRATEGY", "CHANNELS_LAST"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # a single configuration, in this fresh process
        print(json.dumps(measure(a.model, a.one[0], a.one[1] == "1", a.size, a.batch, a.steps)))
        return

    def run(strategy: str, cl: bool) -> dict:
        cmd = [sys.executable, __file__, "--model", a.model, "--size", str(a.size), "--batch", str(a.batch),
               "--steps", str(a.steps), "--one", strategy, "1" if cl else "0"]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    import torch

    print(f"{a.model} @ {a.size}px, batch {a.batch}, {a.steps} timed steps, {torch.get_num_threads()} threads")
    print(f"{'strategy':<14}{'trainable':>12}{'contiguous':>12}{'channels_last':>15}{'ratio':>7}"
          f"{'+MiB (contig.)':>16}{'vs full':>9}")
    full_mb = None
    for strategy in STRATEGIES:
        plain, cl = run(strategy, False), run(strategy, True)
        full_mb = full_mb or plain["added_mb"]
        print(f"{strategy:<14}{plain['trainable']:>12,}{plain['rate']:>10.1f}/s{cl['rate']:>13.1f}/s"
              f"{cl['rate'] / plain['rate']:>6.2f}x{plain['added_mb']:>16.0f}{plain['added_mb'] / full_mb:>8.2f}x")
    print("(images/second of a full training step; ratio = channels_last / contiguous;\n"
          " +MiB = peak resident memory the training steps add to the built model)")


if __name__ == "__main__":
    main()

"""What cnnft's CPU settings buy, side by side in one run: glibc's allocator as it comes against
cnnft's setting (``CNNFT_CPU_ALLOCATOR``, see cnnft.training.runtime.tune_cpu_allocator), and
BatchNorm merged into the convolution before it (cnnft.training.fold) against the model as trained.

    python benchmarks/cpu_settings.py [--batch 32]

Each allocator setting runs in its own interpreter (the setting is process-wide). Printed:
images/s of an eval-mode forward pass (EfficientNet-Lite0 and MobileNetV3-Large at 224 px,
channels_last, with and without the merge) and of a ResNet-18 training step at 112 px, and
the seconds the process spent in the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rate(fn, images: int, seconds: float = 2.0) -> float:
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        n += images
    return n / (time.perf_counter() - t)


def measure(batch: int) -> dict:
    """Images/s of each case in this process (its allocator as the environment says)."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from cnnft import models
    from cnnft.training import fold, runtime

    runtime.make_runtime("cpu", False, True)  # what every cnnft command on CPU does first
    tuned = runtime.tune_cpu_allocator()  # (done once: this says whether it took)
    out: dict = {"tuned": tuned}
    cl = torch.channels_last
    for name in ("efficientnet_lite0", "mobilenet_v3_large"):
        m = models.build(name, "none", 2).model.eval().to(memory_format=cl)
        x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=cl)
        merged = fold.for_inference(m, x[:2], models.logits_of)
        with torch.inference_mode():
            out[f"{name} forward"] = _rate(lambda: m(x), batch)
            out[f"{name} forward, BN merged"] = _rate(lambda: merged(x), batch)
    r = models.build("resnet18", "none", 2).model.train().to(memory_format=cl)
    opt = torch.optim.AdamW(r.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(batch, 3, 112, 112).contiguous(memory_format=cl), torch.randint(0, 2, (batch,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(r(x), y).backward()
        opt.step()

    out["resnet18 training step, 112 px"] = _rate(step, batch)
    out["kernel seconds"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.batch)))
        return
    runs = {}
    for label, setting in (("glibc as it comes", "system"), ("cnnft's setting", "")):
        proc = subprocess.run([sys.executable, __file__, "--worker", "--batch", str(args.batch)], check=True,
                              capture_output=True, text=True, env={**os.environ, "CNNFT_CPU_ALLOCATOR": setting})
        runs[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    base, ours = runs["glibc as it comes"], runs["cnnft's setting"]
    print(f"{os.cpu_count()} CPU threads, batch {args.batch}; allocator tuned in the second run: {ours['tuned']}\n")
    print("| case | glibc as it comes | cnnft's allocator setting | ratio |\n|---|---|---|---|")
    for key in base:
        if key == "tuned":
            continue
        unit = "s" if key == "kernel seconds" else "img/s"
        print(f"| {key} | {base[key]:.0f} {unit} | {ours[key]:.0f} {unit} | {ours[key] / max(base[key], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()

"""One command that checks cnnft's CUDA paths on a GPU machine and prints a table.

    python benchmarks/gpu_check.py [--workdir DIR] [--steps 20]

On a machine with a CUDA device (a few minutes; well under 8 on one GPU):
  1. a `cnnft train` smoke run on CUDA with AMP (bf16 where supported) and channels_last;
  2. resnet50 at 224 px, training images/s: cnnft's training step (AMP, channels_last) against a
     plain fp32 PyTorch loop on the same GPU, and as a fraction of the GPU's measured bf16 matmul peak;
  3. the feature cache on the GPU (freeze_most: the frozen prefix runs once);
  4. `evaluate` and `predict` on CUDA against the CPU (same predictions, probabilities close);
  5. a 1-GPU `torchrun` run (NCCL).
Synthetic images (random PNGs, two classes) and random-init weights: nothing is downloaded.
Each check reports ok / FAILED with its figure; the exit code is 1 when one failed. Without a
CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

RESNET50_GFLOPS = 4.1  # forward, per 224 px image; a training step is about 3x the forward


def training_fraction_of_peak(images_per_second: float, peak_tflops: float) -> float:
    """The share of the matmul peak a training step at ``images_per_second`` uses (resnet50 at 224)."""
    return images_per_second * 3 * RESNET50_GFLOPS / (peak_tflops * 1000)


def table(rows: list[tuple[str, bool, str]]) -> str:
    """The report: one line per check, its verdict and its figures."""
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'check'.ljust(width)}  result  figures", f"{'-' * width}  ------  -------"]
    lines += [f"{name.ljust(width)}  {'ok' if ok else 'FAILED':6s}  {detail}" for name, ok, detail in rows]
    return "\n".join(lines)


def no_device_message() -> str | None:
    """What to say when there is no CUDA device here (None when there is one)."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"no CUDA device on this machine (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
            "nothing to check. Run this on a machine with an NVIDIA GPU.")


def make_images(root: Path, per_class: int = 24, size: int = 64) -> Path:
    """Two class folders of random PNGs, the second brighter (learnable in one epoch)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "bright")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(rng.normal(70 + 110 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def train_overrides(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """The smoke run's config: resnet18, random init, 64 px, 2 epochs, on CUDA with AMP and channels_last."""
    return [f"data.train={data}", "data.image_size=64", "data.num_workers=2", "data.batch_size=16",
            "model.backbone=resnet18", "model.weights=none", "train.epochs=2", "train.device=cuda",
            "train.amp=true", "train.channels_last=true", f"output_dir={out}", f"name={name}", *extra]


def check_smoke(data: Path, out: Path) -> tuple[bool, str, str]:
    from cnnft.recipes import train
    from cnnft.training import runtime

    s = train.train(None, train_overrides(data, out, "smoke"), log=lambda m: None)
    rt = runtime.make_runtime("cuda", True, True)
    return s.status == "completed", f"{s.device}, autocast {rt.amp_dtype}, val acc {s.best_val_acc:.2f}", s.run_dir


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def _images_per_second(step: Callable[[], None], batch: int, steps: int) -> float:
    import torch

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def check_resnet50(steps: int, batch: int = 64) -> tuple[bool, str]:
    import torch
    from torch import nn

    from cnnft import models
    from cnnft.training import engine, runtime

    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    plain = models.build("resnet50", "none", 10).model.cuda()
    opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    xc, yc = x.cuda(), y.cuda()

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(xc), yc).backward()
        opt.step()

    plain_ips = _images_per_second(plain_step, batch, steps)
    del plain, opt
    rt = runtime.make_runtime("cuda", True, True)
    ours = models.build("resnet50", "none", 10).model
    rt.prepare(ours)
    opt2 = torch.optim.SGD(ours.parameters(), lr=0.01)
    scaler = rt.grad_scaler()

    def cnnft_step() -> None:
        engine.train_one_epoch(ours, [(x, y)], opt2, None, nn.CrossEntropyLoss(), rt, epoch=1, scaler=scaler)

    ips = _images_per_second(cnnft_step, batch, steps)
    peak = matmul_peak_tflops()
    frac = training_fraction_of_peak(ips, peak)
    return ips > 0, (f"cnnft {ips:.0f} img/s vs plain fp32 loop {plain_ips:.0f} img/s ({ips / plain_ips:.2f}x); "
                     f"bf16 matmul peak {peak:.0f} TFLOPS; cnnft at {frac:.0%} of it")


def check_cache(data: Path, out: Path) -> tuple[bool, str]:
    from cnnft.recipes import train

    lines: list[str] = []
    s = train.train(None, train_overrides(data, out, "cache", "freeze.strategy=freeze_most",
                                          "train.feature_cache=memory", "train.head_phase=false"), log=lines.append)
    said = [m for m in lines if m.startswith("feature cache")]
    return s.status == "completed" and bool(said), (said[0][:110] if said else "no feature-cache line in the log")


def check_inference(run_dir: str, data: Path) -> tuple[bool, str]:
    from cnnft.recipes import evaluate, predict

    gpu = predict.predict(run_dir, [str(data)], device="cuda", log=lambda m: None)
    cpu = predict.predict(run_dir, [str(data)], device="cpu", log=lambda m: None)
    same = sum(a["class"] == b["class"] for a, b in zip(gpu.predictions, cpu.predictions))
    diff = max(abs(a["prob"] - b["prob"]) for a, b in zip(gpu.predictions, cpu.predictions))
    eg = evaluate.evaluate(run_dir, data_dir=data, device="cuda", out_dir=Path(run_dir) / "eval-gpu", log=lambda m: None)
    ec = evaluate.evaluate(run_dir, data_dir=data, device="cpu", out_dir=Path(run_dir) / "eval-cpu", log=lambda m: None)
    ok = same == len(cpu.predictions) and abs(eg.accuracy - ec.accuracy) < 1e-9 and diff < 1e-2
    return ok, (f"predict: {same}/{len(cpu.predictions)} same class, max prob diff {diff:.1e}; "
                f"evaluate acc cuda {eg.accuracy:.3f} cpu {ec.accuracy:.3f}")


def torchrun_command(data: Path, out: Path) -> list[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc_per_node", "1", "-m", "cnnft", "train",
            *train_overrides(data, out, "ddp", "train.head_phase=false")]


def check_torchrun(data: Path, out: Path) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(torchrun_command(data, out), capture_output=True, text=True, env=env, timeout=300)
    tail = (p.stderr.strip().splitlines() or [""])[-1][:120]
    return p.returncode == 0 and (out / "ddp" / "summary.json").is_file(), f"exit {p.returncode}: {tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=20, help="timed resnet50 steps")
    args = ap.parse_args(argv)
    said = no_device_message()
    if said is not None:
        print(said)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cnnft-gpu-check-"))
    data, out = make_images(work / "data"), work / "runs"
    rows: list[tuple[str, bool, str]] = []
    smoke: dict = {}

    def run(name: str, fn: Callable[[], tuple]) -> None:
        start = time.perf_counter()
        try:
            res = fn()
            rows.append((name, bool(res[0]), f"{res[1]} ({time.perf_counter() - start:.0f}s)"))
            smoke.update({name: res[2]} if len(res) > 2 else {})
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            rows.append((name, False, f"{type(exc).__name__}: {str(exc).strip()[:140]}"))

    run("train smoke (cuda, amp, channels_last)", lambda: check_smoke(data, out))
    run("resnet50 224px training speed", lambda: check_resnet50(args.steps))
    run("feature cache on the GPU", lambda: check_cache(data, out))
    run("evaluate/predict cuda vs cpu", lambda: check_inference(smoke["train smoke (cuda, amp, channels_last)"], data))
    run("torchrun 1 GPU (NCCL)", lambda: check_torchrun(data, out))
    import torch

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(table(rows))
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/gpu_check.py: what runs without a GPU — the no-device answer (exit 0), the
table, the peak arithmetic, the synthetic data and the configs it trains with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnft import config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "no CUDA device on this machine" in p.stdout


def test_the_table_and_the_peak_arithmetic():
    text = gpu_check.table([("train smoke", True, "12 img/s"), ("torchrun 1 GPU (NCCL)", False, "exit 1: boom")])
    lines = text.splitlines()
    assert lines[0].startswith("check") and "ok" in lines[2] and "FAILED" in lines[3] and "exit 1: boom" in lines[3]
    # 1000 img/s x 3 x 4.1 GFLOPs = 12.3 TFLOPS of a 123 TFLOPS peak
    assert gpu_check.training_fraction_of_peak(1000, 123.0) == pytest.approx(0.1)


def test_the_checks_train_with_valid_configs(tmp_path):
    data = gpu_check.make_images(tmp_path / "data", per_class=3, size=16)
    assert sorted(p.parent.name for p in data.rglob("*.png")) == ["bright"] * 3 + ["dark"] * 3
    for extra in ((), ("freeze.strategy=freeze_most", "train.feature_cache=memory", "train.head_phase=false")):
        cfg = config.load(None, gpu_check.train_overrides(data, tmp_path / "runs", "x", *extra))
        assert cfg.train.device == "cuda" and cfg.train.amp and cfg.train.channels_last
    cmd = gpu_check.torchrun_command(data, tmp_path / "runs")
    assert cmd[1:6] == ["--standalone", "--nproc_per_node", "1", "-m", "cnnft"] and "train.device=cuda" in cmd

"""README's "Tracking runs in MLflow", "Sharing a model (timm / Hugging Face)" and "Checking a
GPU machine" blocks, run as written in a folder holding a small stand-in for
hymenoptera_data (random images in ants/ and bees/). The one change: the MLflow server's port
5000 becomes a free loopback port."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import _fixtures
import pytest
from _fixtures import run_cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def block(section: str, lang: str = "sh") -> list[str]:
    """The command lines of the first ```lang block of ``## section`` (backslash continues a line)."""
    body = re.search(rf"## {re.escape(section)}\n(.*?)(?=\n## )", README, re.S).group(1)
    code = re.search(rf"```{lang}\n(.*?)```", body, re.S).group(1)
    return [" ".join(part.strip() for part in c.split("\\\n")) for c in re.split(r"(?<!\\)\n", code) if c.strip()]


def _stand_in(root: Path) -> None:
    for split, n in (("train", 8), ("val", 3)):
        _fixtures.random_image_folder(root / "hymenoptera_data" / split, classes=("ants", "bees"), per_class=n,
                                      size=64, seed=len(split))


def _cnnft(monkeypatch, capsys, line: str) -> str:
    args = shlex.split(line)
    assert args[0] == "cnnft", line
    code, out, err = run_cli(monkeypatch, capsys, *args[1:])
    assert code == 0, f"{line}\n{err}"
    return out


@pytest.mark.slow
def test_sharing_a_model_as_written(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    _stand_in(tmp_path)
    from cnnft.recipes import train

    train.train(None, ["data.train=hymenoptera_data/train", "name=hym", "model.backbone=efficientnet_lite0",
                       "train.epochs=1"], log=lambda m: None)  # the walkthrough's runs/hym, small
    lines = block("Sharing a model (timm / Hugging Face)")
    assert lines[0] == "cnnft export runs/hym --format hf --out hym-timm"
    for line in lines:
        out = _cnnft(monkeypatch, capsys, line)
        if line.startswith("cnnft predict"):
            assert "ants" in out or "bees" in out
    assert (tmp_path / "runs" / "from-shared" / "summary.json").is_file()
    python = "\n".join(block("Sharing a model (timm / Hugging Face)", "python"))
    exec(compile(python, "README", "exec"), {})
    assert capsys.readouterr().out.strip() == "['ants', 'bees']"
    assert torch.load(tmp_path / "runs" / "from-shared" / "checkpoints" / "best.pt",
                      weights_only=True)["model_name"] == "timm/tf_efficientnet_lite0"


@pytest.mark.slow
def test_tracking_runs_in_mlflow_as_written(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from test_mlflow import _free_port, _stop

    monkeypatch.chdir(tmp_path)
    _stand_in(tmp_path)
    server, *commands = block("Tracking runs in MLflow")
    port = str(_free_port())
    assert server.startswith("mlflow server ") and server.endswith(" &")
    args = shlex.split(server.removesuffix(" &").replace("5000", port))
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        import time
        import urllib.request

        for _ in range(360):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        for line in commands:
            _cnnft(monkeypatch, capsys, line.replace("5000", port))
        c = MlflowClient(uri)
        runs = c.search_runs([c.get_experiment_by_name("hym-mlflow").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "val_acc"))
        assert steps[-3:] == [1, 2, 3]
        assert runs[0].data.params["model.backbone"] == "efficientnet_lite0"
    finally:
        _stop(proc)


def test_checking_a_gpu_machine_as_written():
    (line,) = block("Checking a GPU machine")
    assert line == "python benchmarks/gpu_check.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, *shlex.split(line)[1:]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "no CUDA device" in p.stdout

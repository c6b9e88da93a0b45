"""Training in several processes (torchrun, gloo on the CPU): sharding, exact metrics, one run folder."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_image_folder
from torch import nn

from cnnft import models
from cnnft.data import folders as data
from cnnft.recipes import evaluate as evaluate_recipe
from cnnft.recipes import train as train_recipe
from cnnft.training import distributed, freeze

N_TRAIN = 22  # 30 images, val_split 0.27 -> 8 val


# ------------------------------------------------------------------------ the sharded sampler

@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16, 17, 22, 33])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_shards_cover_the_epoch_once_in_equal_steps(n, world, batch):
    shards = [distributed.ShardedSampler(n, 5, True, rank=r, world=world, batch_size=batch) for r in range(world)]
    for s in shards:
        s.set_epoch(3)
    seen = [list(s) for s in shards]
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)), "a sample in two shards"
    kept = distributed.trained_count(n, world, batch)
    assert len(flat) == kept and n - kept < world * min(batch, 2)
    steps = {-(-len(s) // batch) for s in seen}
    assert len(steps) == 1, f"processes would take different numbers of steps: {[len(s) for s in seen]}"
    if batch > 1 and kept:
        assert all(len(s) % batch != 1 for s in seen), "a BatchNorm batch of one"
    # step k of all processes together is the k-th global batch of the epoch's permutation
    perm = data.EpochSampler(n, 5, shuffle=True)
    perm.set_epoch(3)
    order = list(perm)[:kept]
    for k in range(steps.pop() if kept else 0):
        step = {i for s in seen for i in s[k * batch:(k + 1) * batch]}
        assert step == set(order[k * batch * world:(k + 1) * batch * world])


def test_one_process_drops_what_a_single_process_loader_drops():
    for n in range(1, 40):
        lone = n % 4 == 1  # make_loader's rule: a lone last image waits for the next epoch
        assert distributed.trained_count(n, 1, 4) == (n - 1 if lone else n)


def test_resume_position_counts_samples_of_the_shard():
    full = distributed.ShardedSampler(22, 1, True, rank=1, world=2, batch_size=4)
    full.set_epoch(2)
    rest = distributed.ShardedSampler(22, 1, True, rank=1, world=2, batch_size=4)
    rest.set_epoch(2, start=2 * 4)  # two steps done, as _Loaders.position sets it
    assert list(rest) == list(full)[8:] and len(rest) == len(full) - 8


def test_validation_shards_keep_every_sample():
    shards = [distributed.ShardedSampler(9, 0, False, rank=r, world=4, batch_size=4, drop_tail=False)
              for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(9))
    assert sorted(i for r in range(4) for i in distributed.Dist(r, 4).eval_indices(9)) == list(range(9))


def test_sync_bn_converts_only_batchnorm_that_trains():
    bb = models.build("resnet18", "none", 3)
    plan = freeze.make_plan(bb.model, bb.stages, "freeze_early", 0.01, 0.1, pretrained=False, frozen_stages=2,
                            trainable_stages=1)
    pinned = freeze.apply_plan(bb.model, bb.stages, plan)
    before = dict(bb.model.state_dict())
    n = distributed.convert_trainable_batchnorm(bb.model)
    bns = [m for m in bb.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert n == len(bns) - len(pinned) > 0
    assert all(not isinstance(m, nn.SyncBatchNorm) for m in pinned)
    after = bb.model.state_dict()
    assert after.keys() == before.keys() and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in after)


def test_resume_needs_the_process_count_the_run_started_with():
    from cnnft.errors import InputError

    distributed.Dist(0, 2).check_resumable({"world_size": 2})
    distributed.Dist().check_resumable({})  # a single-process checkpoint records nothing
    with pytest.raises(InputError, match="2 process"):
        distributed.Dist().check_resumable({"world_size": 2})
    with pytest.raises(InputError, match="1 process"):
        distributed.Dist(1, 2).check_resumable({})
    assert distributed.Dist().header() == {} and distributed.Dist(0, 2).header() == {"world_size": 2}


def test_a_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dd = distributed.setup("cpu")
    assert not dd.active and dd.is_main and dd.device("cuda:1") == "cuda:1"
    assert type(dd.sampler(10, 0, 4)) is data.EpochSampler
    assert distributed.torchrun_command(2, ["train", "c.yaml"])[-5:] == ["--nproc_per_node=2", "-m", "cnnft",
                                                                         "train", "c.yaml"]


# ------------------------------------------------------------------------------ torchrun runs

def _config(tmp_path: Path, **train) -> Path:
    folder = tmp_path / "data"
    if not folder.is_dir():
        make_image_folder(folder, per_class=15, size=32)
    cfg = {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 3,
           "data": {"train": str(folder), "val_split": 0.27, "image_size": 32, "batch_size": 4, "num_workers": 0,
                    "augment": "none"},
           "model": {"backbone": "lenet5", "weights": "none"},
           "freeze": {"strategy": "full"},
           "train": {"epochs": 2, "lr": 0.01, "device": "cpu", "feature_cache": "off", **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args: list[str], *, nproc: int = 2, env: dict | None = None, launcher: list[str] | None = None,
              timeout: int = 240) -> subprocess.CompletedProcess:
    launcher = launcher or ["--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "cnnft", *args]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_processes_write_one_run_see_each_sample_once_and_resume(tmp_path):
    logs = tmp_path / "samples"
    logs.mkdir()
    cfg = _config(tmp_path, epochs=1)
    p = _torchrun(["train", str(cfg), "--json"], env=_env(**{distributed.SAMPLE_LOG_ENV: str(logs)}))
    _ok(p)
    summary = json.loads(p.stdout)  # rank 0 alone prints the summary
    run = Path(summary["run_dir"])
    assert [d.name for d in (tmp_path / "runs").iterdir()] == ["t"], "one run folder"
    assert p.stderr.count("run folder:") == 1 and p.stderr.count("epoch 1/1") == 1, "other ranks are quiet"
    assert summary["train_images"] == N_TRAIN

    # a run of two processes resumes only with two: its schedule counts their steps
    from cnnft.errors import InputError

    with pytest.raises(InputError, match="2 process"):
        train_recipe.train(None, ["train.epochs=2"], resume=run, log=lambda m: None)
    # the run goes on under torchrun (--nproc launches it) from its checkpoint
    p = subprocess.run([sys.executable, "-m", "cnnft", "train", "--resume", str(run), "train.epochs=2", "--nproc",
                        "2", "--json"], env=_env(**{distributed.SAMPLE_LOG_ENV: str(logs)}), capture_output=True,
                       text=True, timeout=240)
    _ok(p)
    summary = json.loads(p.stdout)
    assert summary["epochs_completed"] == 2 and summary["run_dir"] == str(run)

    # per epoch the two processes together trained on every sample exactly once
    epochs: dict[int, list[int]] = {}
    for rank in (0, 1):
        for line in (logs / f"rank{rank}.txt").read_text().splitlines():
            epoch, *idx = map(int, line.split())
            epochs.setdefault(epoch, []).extend(idx)
    assert sorted(epochs) == [0, 1]
    for idx in epochs.values():
        assert sorted(idx) == list(range(N_TRAIN))

    # the validation accuracy of the run is what one process evaluating best.pt finds
    ev = evaluate_recipe.evaluate(run, device="cpu", log=lambda m: None)
    assert ev.accuracy == summary["best_val_acc"]
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in best["model"]), "the checkpoint holds the unwrapped model"


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """DDP averages the gradients of two batches of 4 = one process's batch of 8 over the same
    samples (step k covers the same slice of the epoch's permutation): the runs agree up to
    floating-point summation order. Tolerance: val loss 1e-4, val accuracy identical."""
    two = tmp_path / "two"
    _ok(_torchrun(["train", str(_config(two)), "--quiet"]))
    torch.set_num_threads(1)
    one = train_recipe.train(_config(tmp_path / "one"), ["data.batch_size=8"], log=lambda m: None)
    a, b = _rows(two / "runs" / "t"), _rows(Path(one.run_dir))
    for ra, rb in zip(a, b, strict=True):
        assert float(ra["val_acc"]) == float(rb["val_acc"])
        assert abs(float(ra["val_loss"]) - float(rb["val_loss"])) < 1e-4
        assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_finish_a_run_with_the_feature_cache(tmp_path):
    cfg = _config(tmp_path, epochs=1, feature_cache="disk", cache_dir=str(tmp_path / "cache"))
    text = cfg.read_text().replace("strategy: full", "strategy: freeze_early")
    cfg.write_text(text)
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "cnnft", "train", str(cfg), "--json"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [n.communicate(timeout=240) for n in nodes]
    for n, (out, errs) in zip(nodes, outs):
        assert n.returncode == 0, out[-2000:] + errs[-2000:]
    assert outs[1][0] == "", "node 1 prints nothing"
    summary = json.loads(outs[0][0])
    assert summary["epochs_completed"] == 1 and "feature cache: the frozen layers" in outs[0][1]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2, "val and train activations stored once"
    ev = evaluate_recipe.evaluate(summary["run_dir"], device="cpu", log=lambda m: None)
    assert ev.accuracy == summary["best_val_acc"]


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_the_same_step_and_rank_0_saves(tmp_path):
    import signal
    import time

    cfg = _config(tmp_path, epochs=10_000)
    proc = subprocess.Popen([sys.executable, "-m", "cnnft", "train", str(cfg), "--quiet", "--nproc", "2"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "t" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, errs = proc.communicate(timeout=120)
    assert proc.returncode == 130, errs[-3000:]
    assert errs.count("stopped by SIGINT") == 1, errs[-3000:]
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["world_size"] == 2
    if ckpt["running"]:  # stopped inside an epoch: the sums of both processes' batches
        assert ckpt["running"]["seen"] == 2 * 4 * ckpt["step"]

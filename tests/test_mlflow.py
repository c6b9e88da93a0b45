"""MLflow tracking against a real tracking server started here on a loopback port, read back
with MlflowClient: params, per-epoch metrics, artifacts, tags, a resumed run continuing its
MLflow run, a server killed mid-run (training finishes, one warning), parent/child runs."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import _fixtures
import pytest
from _fixtures import run_cli

from cnnft.errors import InputError
from cnnft.recipes import train as train_recipe
from cnnft.results import mlflow as tracking

pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'cnnft[mlflow]'")
from mlflow.tracking import MlflowClient  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not answer within 180 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, uri = _start_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    _stop(proc)


def _train(tmp_path: Path, *overrides: str, resume=None, log=None, hook=None):
    data = tmp_path / "data"
    if not data.exists():
        _fixtures.random_image_folder(data)
    base = [] if resume else [f"data.train={data}", "data.val_split=0.34", "data.image_size=32",
                              "data.num_workers=0", "data.batch_size=4", "model.backbone=lenet5",
                              "model.weights=none", f"output_dir={tmp_path / 'runs'}",
                              f"train.cache_dir={tmp_path / 'cache'}"]
    return train_recipe.train(None, base + list(overrides), resume=resume, log=log or (lambda m: None),
                              on_epoch_end=hook)


def _run_id(run_dir) -> str:
    return json.loads((Path(run_dir) / "mlflow.json").read_text())["run_id"]


@pytest.mark.slow
def test_a_run_in_mlflow_params_metrics_tags_artifacts(server, tmp_path):
    s = _train(tmp_path, "name=tracked", "train.epochs=2", "train.log_to=[mlflow]", f"train.mlflow_uri={server}",
               "train.log_checkpoint=true")
    c = MlflowClient(server)
    run = c.get_run(_run_id(s.run_dir))
    assert run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "tracked"  # the run's name by default
    p = run.data.params
    assert p["model.backbone"] == "lenet5" and p["train.epochs"] == "2" and p["train.log_to"] == '["mlflow"]'
    assert p["data.image_size"] == "32" and p["seed"] == "0"
    assert run.data.tags["cnnft.strategy"] == s.strategy
    assert json.loads(run.data.tags["cnnft.freeze_plan"])["strategy"] == s.strategy
    rows = list(csv.DictReader(open(Path(s.run_dir) / "metrics.csv")))
    numeric = [k for k in rows[0] if k not in ("epoch", "phase", "trainable_stages") and rows[0][k] != ""]
    assert {"val_acc", "val_loss", "train_loss", "val_f1", "images_per_second", "data_wait"} <= set(numeric)
    for key in numeric:
        hist = sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == [int(r["epoch"]) for r in rows], key
        assert [m.value for m in hist] == pytest.approx([float(r[key]) for r in rows]), key
    assert run.data.metrics["best_val_acc"] == pytest.approx(s.best_val_acc)
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "freeze_plan.json", "metrics.csv", "summary.json", "checkpoints"} <= names
    assert [a.path for a in c.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(server, tmp_path):
    first = _train(tmp_path, "name=resumed", "train.epochs=1", "train.log_to=[mlflow]", f"train.mlflow_uri={server}")
    run_id = _run_id(first.run_dir)
    again = _train(tmp_path, "train.epochs=3", resume=first.run_dir)
    assert _run_id(again.run_dir) == run_id and again.epochs_completed == 3
    c = MlflowClient(server)
    assert [m.step for m in sorted(c.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)] == [1, 2, 3]
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cnnft.resumed"] == "true"
    assert len(c.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_a_server_killed_mid_run_loses_nothing_but_the_logging(tmp_path):
    proc, uri = _start_server(tmp_path / "server")
    lines: list[str] = []

    def kill_after_first(row: dict) -> bool:
        if row["epoch"] == 1:
            _stop(proc)
        return True

    try:
        s = _train(tmp_path, "name=killed", "train.epochs=3", "train.log_to=[mlflow]", f"train.mlflow_uri={uri}",
                   log=lines.append, hook=kill_after_first)
    finally:
        _stop(proc)
    assert s.status == "completed" and s.epochs_completed == 3
    assert (Path(s.run_dir) / "summary.json").is_file()
    warnings = [m for m in lines if m.startswith("warning: MLflow logging stopped")]
    assert len(warnings) == 1, lines
    end = [m for m in lines if m.startswith("MLflow: not logged")]
    assert len(end) == 1 and "epoch 3 metrics" in end[0] and "artifact summary.json" in end[0], end


def test_a_server_that_is_down_from_the_start_is_said_once(tmp_path):
    lines: list[str] = []
    s = _train(tmp_path, "train.epochs=1", "train.log_to=[mlflow]", f"train.mlflow_uri=http://127.0.0.1:{_free_port()}",
               log=lines.append)
    assert s.status == "completed"
    assert len([m for m in lines if m.startswith("warning: MLflow logging stopped")]) == 1
    assert any(m.startswith("MLflow: not logged") and "params" in m and "epoch 1 metrics" in m for m in lines)


def test_tensorboard_true_is_log_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    old = _train(tmp_path, "name=tb1", "train.epochs=1", "train.tensorboard=true")
    new = _train(tmp_path, "name=tb2", "train.epochs=1", "train.log_to=[tensorboard]")
    for s in (old, new):
        assert list((Path(s.run_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_extra_is_exit_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if mlflow were not installed
    with pytest.raises(InputError, match="mlflow package") as e:
        tracking.client(None)
    assert "pip install 'cnnft[mlflow]'" in e.value.hint
    data = _fixtures.random_image_folder(tmp_path / "data")
    code, _, err = run_cli(monkeypatch, capsys, "train", f"data.train={data}", "model.backbone=lenet5",
                           "model.weights=none", "train.log_to=[mlflow]", f"output_dir={tmp_path / 'runs'}")
    assert code == 2 and "pip install 'cnnft[mlflow]'" in err
    assert not (tmp_path / "runs").exists()  # said before the run folder is made


def test_bad_log_to_names_what_is_allowed(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "validate", "train.log_to=[wandb]")
    assert code == 2 and "train.log_to" in err and "mlflow" in err


@pytest.mark.slow
def test_parent_and_child_runs(server):
    """What a study uses: one parent run, a child run per trial."""
    parent = tracking.open_run(server, "study", "study", print)
    child = tracking.open_run(server, "study", "trial-0", print, parent=parent)
    child.metrics({"val_acc": 0.5}, 1, "trial")
    child.close("FINISHED")
    parent.close("FINISHED")
    c = MlflowClient(server)
    assert c.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert c.get_run(child.run_id).data.metrics["val_acc"] == 0.5
    assert not parent.missed and not child.missed

"""A run logged to MLflow (optional: the mlflow extra): the resolved config as params, the
freeze plan and measured similarity as tags, every numeric metrics.csv column per epoch
(the epoch as step), the summary figures, and the run folder's files as artifacts.

The MLflow run's id is kept in ``RUN/mlflow.json``, so a resumed run continues the same
MLflow run. Only the main process logs. A tracking server that is down or refuses never
costs the training run: the first failure is said once, nothing more is sent, and the end
of the run says what was not logged (the run folder holds it all). :func:`open_run` with
``parent`` gives the parent run / child runs of a study.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from ..config import Config
from ..errors import InputError
from ..files import atomic_write_json
from .rundir import RunDir

RUN_ID_FILE = "mlflow.json"
INSTALL = "pip install 'cnnft[mlflow]'"
_MAX_TAG = 5000  # MLflow's limit is 8000 characters; a plan and its probe table fit well within this


def client(uri: str | None):
    """An MlflowClient for ``uri`` (else $MLFLOW_TRACKING_URI, else MLflow's default), with
    HTTP retries off: a server that is down is said at once, not after minutes."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise InputError("train.log_to: mlflow needs the mlflow package, which is not installed",
                         hint=f"{INSTALL}, or take mlflow out of train.log_to") from None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return MlflowClient(tracking_uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or None)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.01}}`` -> ``{"train.lr": "0.01"}`` (MLflow params are text)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)
    return out


class Tracker:
    """One MLflow run. Every call to the server goes through :meth:`_send`: after a failure
    nothing more is sent and what was not logged is listed for :meth:`close`."""

    def __init__(self, mlflow_client, run_id: str | None, log: Callable[[str], None]) -> None:
        self.client, self.run_id, self.log = mlflow_client, run_id, log
        self.failed: str | None = None
        self.missed: list[str] = []

    def _send(self, what: str, call: Callable[[], object]) -> bool:
        if self.failed is None and self.run_id is not None:
            try:
                call()
                return True
            except Exception as exc:  # noqa: BLE001 - any server or network failure: training goes on
                self.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                self.log(f"warning: MLflow logging stopped ({self.failed}); training goes on, the run folder "
                         "keeps everything")
        self.missed.append(what)
        return False

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._send("params", lambda b=items[i:i + 100]: self.client.log_batch(self.run_id, params=b))

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, v[:_MAX_TAG]) for k, v in values.items()]
        self._send("tags", lambda: self.client.log_batch(self.run_id, tags=tags))

    def metrics(self, values: dict, step: int, what: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._send(what, lambda: self.client.log_batch(self.run_id, metrics=batch))

    def artifacts(self, paths: Iterable[Path], folder: str | None = None) -> None:
        for p in paths:
            if p.is_dir():
                self._send(f"artifact {p.name}/", lambda p=p: self.client.log_artifacts(self.run_id, str(p), p.name))
            elif p.is_file():
                self._send(f"artifact {p.name}", lambda p=p: self.client.log_artifact(self.run_id, str(p), folder))

    def close(self, status: str) -> None:
        """End the MLflow run (FINISHED, FAILED or KILLED) and say what was not logged."""
        self._send("end of run", lambda: self.client.set_terminated(self.run_id, status))
        if self.missed:
            self.log(f"MLflow: not logged ({self.failed or 'no run'}): {_shorten(self.missed)}; "
                     "the run folder holds all of it")


def _shorten(missed: list[str]) -> str:
    seen = list(dict.fromkeys(missed))
    return ", ".join(seen[:12]) + (f" and {len(seen) - 12} more" if len(seen) > 12 else "")


def open_run(uri: str | None, experiment: str, name: str, log: Callable[[str], None], *,
             run_id: str | None = None, parent: Tracker | None = None) -> Tracker:
    """Start an MLflow run (or continue ``run_id``) in ``experiment`` (made when missing); a
    ``parent`` makes it a child run. A server that fails gives a Tracker that logs nothing."""
    c = client(uri)
    tracker = Tracker(c, None, log)

    def start() -> None:
        if run_id is not None:
            c.update_run(run_id, status="RUNNING")
            tracker.run_id = run_id
            return
        exp = c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
        tags = {"mlflow.parentRunId": parent.run_id} if parent is not None and parent.run_id else {}
        tracker.run_id = c.create_run(exp_id, run_name=name, tags=tags).info.run_id

    tracker.run_id = "starting"
    if not tracker._send("the run", start):
        tracker.run_id = None
    return tracker


class RunTracking:
    """MLflow for one training run as ``train.log_to`` says (only the main process logs):
    made before the run folder opens (a missing extra is said before anything is written),
    started once it is open, fed each epoch's row through the train recipe's ``on_epoch_end``
    hook, closed with the summary. A context manager: a run that fails or is stopped ends
    its MLflow run as FAILED or KILLED."""

    def __init__(self, cfg: Config, is_main: bool, log: Callable[[str], None]) -> None:
        self.cfg, self.log, self.tracker, self.run = cfg, log, None, None
        self.enabled = "mlflow" in cfg.train.log_to and is_main
        if self.enabled:
            client(None)  # the extra is installed, or InputError with the command that installs it

    def start(self, run: RunDir) -> "RunTracking":
        """A new MLflow run, or the one a resumed run folder names in mlflow.json."""
        self.run = run
        if not self.enabled:
            return self
        t, id_file = self.cfg.train, run.root / RUN_ID_FILE
        known = _read(id_file)
        uri = t.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or known.get("tracking_uri")
        tracker = self.tracker = open_run(uri, t.mlflow_experiment or self.cfg.name, run.root.name, self.log,
                                          run_id=known.get("run_id"))
        if tracker.run_id is not None and not known:
            atomic_write_json(id_file, {"run_id": tracker.run_id, "tracking_uri": tracker.client.tracking_uri})
            tracker.params(flatten(self.cfg.to_dict()))
            tracker.tags(_plan_tags(run.freeze_plan))
        elif tracker.run_id is not None:
            tracker.tags({"cnnft.resumed": "true", "cnnft.epochs": str(t.epochs)})
        else:
            tracker.missed += ["params", "tags"]
        self.log(f"MLflow: {'continuing' if known else 'logging to'} run {tracker.run_id} at "
                 f"{tracker.client.tracking_uri}" if tracker.run_id else "MLflow: not logging this run")
        return self

    def hook(self, then: Callable[[dict], bool] | None) -> Callable[[dict], bool] | None:
        """``then`` (the caller's hook) after logging the row."""
        if self.tracker is None:
            return then

        def on_epoch_end(row: dict) -> bool:
            self.tracker.metrics({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]),
                                 f"epoch {row['epoch']} metrics")
            return True if then is None else then(row)

        return on_epoch_end

    def _files(self) -> list[Path]:
        return [self.run.config, self.run.freeze_plan, self.run.metrics, self.run.summary]

    def __enter__(self) -> "RunTracking":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.tracker is not None and kind is not None:
            from ..errors import Interrupted

            self.tracker.artifacts(self._files())
            self.tracker.close("KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED")

    def finished(self, summary):
        """Log the summary figures and the run folder's files (the report page when there is
        one, best.pt under ``train.log_checkpoint``), end the MLflow run; returns ``summary``."""
        if self.tracker is not None:
            figures = summary.to_dict()
            keys = ("best_val_acc", "best_epoch", "final_val_acc", "final_val_loss", "epochs_completed",
                    "wall_seconds", "test_acc")
            self.tracker.metrics({k: figures[k] for k in keys if figures.get(k) is not None},
                                 int(figures["epochs_completed"]), "summary figures")
            self.tracker.artifacts(self._files() + [self.run.report])
            if self.cfg.train.log_checkpoint:
                self.tracker.artifacts([self.run.best], "checkpoints")
            self.tracker.close("FINISHED")
        return summary


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) and isinstance(d.get("run_id"), str) else {}


def _plan_tags(plan_file: Path) -> dict[str, str]:
    """The freeze plan and the measured similarity (freeze_plan.json) as tags."""
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    sim = plan.get("similarity")
    tags = {"cnnft.model": str(plan.get("model")), "cnnft.weights": str(plan.get("weights")),
            "cnnft.strategy": str(plan.get("strategy")), "cnnft.freeze_plan": json.dumps(plan)}
    if plan.get("auto"):
        tags["cnnft.auto"] = str(plan["auto"])  # why the strategy was picked, the measurement's verdict included
    if sim is not None:
        tags["cnnft.similarity"] = json.dumps(sim)
    return tags

"""``cnnft tune``: trial 0 is train's plan, the space comes from the tune: section, trials are
pruned and recorded, the budget ends a trial with its best checkpoint, best.yaml trains the
winner again, a stopped search resumes, and workers share one journal file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _robust import make_dataset, subprocess_env

from cnnft import config as config_mod
from cnnft.errors import ConfigError
from cnnft.recipes import train as train_recipe
from cnnft.recipes import tune as tune_recipe
from cnnft.tuning import space

pytestmark = pytest.mark.slow


def _base(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, classes=("a", "b", "c"), n=8)
    return [f"data.train={data}", "model.backbone=lenet5", "model.weights=none", "data.num_workers=0",
            "data.batch_size=8", "train.epochs=3", f"output_dir={tmp_path / 'runs'}", *extra]


def _tune(tmp_path: Path, *extra: str, budget: str = "10m", trials: int | None = 2, **kw) -> dict:
    return tune_recipe.tune(None, _base(tmp_path, *extra), budget=budget, train=train_recipe.train, trials=trials,
                            log=lambda m: None, **kw)


def _records(summary: dict) -> list[dict]:
    path = Path(summary["tune_dir"]) / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trial_0_is_the_plan_train_would_run(tmp_path):
    s = _tune(tmp_path)
    first = _records(s)[0]
    assert first["number"] == 0 and first["default_plan"]
    trial = yaml.safe_load((Path(first["run_dir"]) / "config.yaml").read_text())
    plain = train_recipe.train(None, _base(tmp_path, f"output_dir={tmp_path / 'plain'}"), log=lambda m: None)
    again = yaml.safe_load((Path(plain.run_dir) / "config.yaml").read_text())
    for key in ("name", "output_dir"):
        trial.pop(key), again.pop(key)
    trial["train"].pop("time_budget"), again["train"].pop("time_budget")
    assert trial == again  # the same run as `cnnft train` on the config, nothing of the space applied
    assert json.loads((Path(first["run_dir"]) / "freeze_plan.json").read_text())["strategy"] == plain.strategy
    assert first["params"]["trainable_stages"] == 3  # lenet5: stem + 2 stages, all train (full)
    assert s["default_plan"]["number"] == 0 and s["trials_run"] == 2


def test_the_space_takes_fixed_values_ranges_and_choices_from_yaml(tmp_path):
    cfg = config_mod.load(None, _base(tmp_path, "tune.lr={low: 0.0001, high: 0.01, log: true}", "tune.mixup=0",
                                      "tune.augment=[mild, strong]", "tune.trainable_stages=[0, 3]"))
    sp = {a.name: a for a in space.build(cfg, 2, 32, 32).axes}
    assert (sp["lr"].low, sp["lr"].high, sp["lr"].log) == (0.0001, 0.01, True)
    assert sp["mixup"].fixed and sp["mixup"].value == 0
    assert sp["augment"].choices == ("mild", "strong") and sp["trainable_stages"].choices == (0, 3)
    assert sp["image_size"].fixed and sp["image_size"].value == 32  # lenet5 runs at 32 px only
    assert space.Space(tuple(sp.values()), 2).overrides(
        {"trainable_stages": 3, "lr": 0.001, "backbone_lr_scale": 0.1, "layer_decay": None, "augment": "mild",
         "mixup": 0, "label_smoothing": 0.0, "image_size": 32})[:1] == ["freeze.strategy=full"]


@pytest.mark.parametrize("override, key", [
    ("tune.lr={low: 0.01, high: 0.001}", "tune.lr"),
    ("tune.lr=[0.001, -1]", "tune.lr"),
    ("tune.label_smoothing=[0, 1.5]", "tune.label_smoothing"),
    ("tune.trainable_stages=9", "tune.trainable_stages"),
    ("tune.backbone_lr_scale={low: 0, high: 1, log: true}", "tune.backbone_lr_scale"),
])
def test_a_bad_search_value_names_its_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as exc:  # refused by the schema's ranges, or by the space's own checks
        space.build(config_mod.load(None, _base(tmp_path, override)), 2, 32, 32)
    assert key in str(exc.value) and exc.value.exit_code == 2


def test_a_bad_search_value_exits_2_before_any_trial(tmp_path):
    p = subprocess.run([sys.executable, "-m", "cnnft", "tune", *_base(tmp_path, "tune.mixup=[0, -2]"),
                        "--budget", "1m"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 2 and "tune.mixup" in p.stderr
    assert not list((tmp_path / "runs").glob("*/trials/*"))


def test_trials_are_pruned_and_recorded(tmp_path):
    s = _tune(tmp_path, "tune.pruner=halving", "tune.grace_epochs=1", "tune.lr=[0.01, 0.000001]", trials=6)
    pruned = [r for r in _records(s) if r["state"] == "pruned"]
    assert pruned and s["trials_pruned"] == len(pruned)
    assert all(r["pruned_at"] >= 1 and r["epochs"] == r["pruned_at"] < 3 for r in pruned)
    assert len(_records(s)) == s["trials_run"] == 6


def test_the_budget_ends_a_running_trial_with_its_best_checkpoint(tmp_path):
    s = _tune(tmp_path, "train.epochs=100000", budget="40s", trials=1)
    rec = _records(s)[0]
    assert rec["stopped_by"] == "train.time_budget" and 0 < rec["epochs"] < 100000
    run = Path(rec["run_dir"])
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    best = yaml.safe_load((Path(s["tune_dir"]) / "best.yaml").read_text())
    assert best["train"]["epochs"] == rec["epochs"] and best["train"]["time_budget"] is None


def test_best_yaml_trains_the_winner_again(tmp_path):
    s = _tune(tmp_path, "tune.trainable_stages=[1, 3]", trials=3)
    best_yaml = Path(s["tune_dir"]) / "best.yaml"
    again = train_recipe.train(best_yaml, [f"output_dir={tmp_path / 'again'}"], log=lambda m: None)
    winner = Path(s["best"]["run_dir"])
    rows = (winner / "metrics.csv").read_text().splitlines()
    rows2 = (Path(again.run_dir) / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("val_loss")
    assert again.best_val_acc == s["best"]["value"]
    assert [float(r.split(",")[col]) for r in rows[1:]] == pytest.approx([float(r.split(",")[col]) for r in rows2[1:]])
    # only the winner keeps its checkpoints
    others = [Path(r["run_dir"]) for r in _records(s) if r["number"] != s["best"]["number"]]
    assert others and all(not list((o / "checkpoints").glob("*.pt")) for o in others)
    assert (winner / "checkpoints" / "best.pt").is_file()
    assert (Path(s["tune_dir"]) / "optimization_history.png").is_file()


def test_a_stopped_search_resumes_where_it_stood(tmp_path):
    s = _tune(tmp_path, trials=2)
    again = tune_recipe.tune(None, [], budget=None, resume=s["tune_dir"], train=train_recipe.train, trials=4,
                             log=lambda m: None)
    numbers = [r["number"] for r in _records(again)]
    assert again["tune_dir"] == s["tune_dir"] and sorted(numbers) == [0, 1, 2, 3]
    assert again["trials_run"] == 4
    clock = json.loads((Path(s["tune_dir"]) / "clock.json").read_text())
    assert clock["used_seconds"] > s["used_seconds"]  # the second part's time adds to the first's


def test_two_workers_share_one_journal_file(tmp_path):
    # trials long enough (40 epochs) that the second process, which starts a while after the first
    # (its imports), gets some of them
    p = subprocess.run([sys.executable, "-m", "cnnft", "tune", *_base(tmp_path, "train.epochs=40", "tune.pruner=none"),
                        "--budget", "15m", "--trials", "4", "--workers", "2", "--json"], capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(p.stdout)
    recs = _records(s)
    numbers = [r["number"] for r in recs]
    assert len(numbers) == len(set(numbers)) and len(numbers) >= 4  # none run twice, none lost
    assert len({r["worker"] for r in recs}) == 2  # both processes ran trials
    assert len({r["run_dir"] for r in recs}) == len(recs)
    assert s["trials_failed"] == 0 and s["trials_run"] == len(recs)


def test_ctrl_c_leaves_a_consistent_study_that_resumes(tmp_path):
    import signal
    import time

    import optuna

    p = subprocess.Popen([sys.executable, "-m", "cnnft", "tune", *_base(tmp_path, "train.epochs=400",
                          "tune.pruner=none"), "--budget", "150s", "--trials", "2"],
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "runs" / "run-tune"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:
        if list(folder.glob("trials/*/metrics.csv")):  # a trial is under way, an epoch done
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 130, err[-3000:]
    assert f"cnnft tune --resume {folder}" in err
    study = optuna.load_study(study_name="run-tune", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study.journal"))))
    first = study.trials[0]
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    assert (Path(first.user_attrs.get("run_dir", folder / "trials" / "trial-0000")) / "checkpoints" / "last.pt").is_file()
    # resumed with the budget left, the interrupted plan runs again first (its epochs fitted to the time)
    again = tune_recipe.tune(None, [], budget=None, resume=folder, train=train_recipe.train, trials=2,
                             log=lambda m: None)
    recs = _records(again)
    assert recs[0]["retry_of"] == 0 and recs[0]["default_plan"] and again["trials_run"] >= 1
    assert again["status"] == "completed" and again["best"] is not None


def test_sqlite_is_refused_for_parallel_workers(tmp_path):
    from cnnft.errors import InputError
    from cnnft.tuning import study

    with pytest.raises(InputError) as exc:
        study.check_storage(f"sqlite:///{tmp_path / 'x.db'}", workers=2)
    assert "SQLite" in str(exc.value) and "postgresql://" in exc.value.hint and exc.value.exit_code == 2
    study.check_storage(f"sqlite:///{tmp_path / 'x.db'}", workers=1)  # one process: Optuna's own advice allows it
    assert study.masked("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"


def test_without_optuna_the_message_names_the_install_command(monkeypatch):
    import builtins

    from cnnft.errors import InputError
    from cnnft.tuning import study

    real = builtins.__import__

    def no_optuna(name, *a, **k):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(InputError) as exc:
        study.optuna()
    assert "cnnft[tune]" in exc.value.hint and exc.value.exit_code == 2


@pytest.mark.real
def test_a_search_on_real_weights_starts_from_the_measured_plan(tmp_path, hymenoptera):
    """EfficientNet-Lite0 with its ImageNet weights on ants/bees: trial 0 is the plan train's
    similarity measurement picks (and its depth is recorded as that point of the axis)."""
    s = tune_recipe.tune(None, [f"data.train={hymenoptera / 'train'}", f"data.val={hymenoptera / 'val'}",
                                "data.limit_per_class=8", "data.image_size=64", "data.num_workers=0",
                                "model.backbone=efficientnet_lite0", "train.epochs=2", "tune.image_size=64",
                                f"output_dir={tmp_path / 'runs'}"], budget="6m", train=train_recipe.train,
                         trials=2, log=lambda m: None)
    first = _records(s)[0]
    plan = json.loads((Path(first["run_dir"]) / "freeze_plan.json").read_text())
    trains = sum(1 for st in plan["stages"] if st["name"] != "head" and not st["frozen"])
    assert first["default_plan"] and plan["similarity"] is not None  # measured, as `cnnft train` does
    assert first["params"]["trainable_stages"] == trains
    assert s["best"] is not None


def _trial(number: int, value: float, default: bool = False, val_images: int | None = 100):
    import optuna

    attrs = {"default_plan": default, **({"val_images": val_images} if val_images else {})}
    t = optuna.trial.create_trial(value=value, user_attrs=attrs)
    t.number = number
    return t


@pytest.mark.parametrize("values, n, monitor, direction, chosen, kept", [
    ((0.90, 0.92), 100, "val_acc", "maximize", 0, True),      # +2 points, SE 3 points on 100 images: noise
    ((0.90, 0.92), 10_000, "val_acc", "maximize", 1, False),  # SE 0.3 points: a real lead
    ((0.90, 0.95), 100, "val_acc", "maximize", 1, False),     # +5 points > one SE (3)
    ((0.90, 0.92), None, "val_acc", "maximize", 1, None),     # no image count recorded: best value
    ((0.40, 0.30), 100, "val_loss", "minimize", 1, None),     # a loss: best value
])
def test_the_default_plan_is_kept_unless_beaten_beyond_noise(values, n, monitor, direction, chosen, kept):
    from cnnft.tuning import outcome

    done = [_trial(0, values[0], default=True, val_images=n), _trial(1, values[1], val_images=n)]
    best, selection = outcome.winner(done, monitor, direction)
    assert best.number == chosen
    assert selection.get("kept_default") is kept
    if kept:
        assert "within one standard error" in selection["note"] and selection["best_by_value"] == 1

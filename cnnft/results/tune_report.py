"""The tune section of a report: what ``cnnft tune`` searched, what each trial scored, and the
winner beside the default plan, read from a tune folder's ``tune_summary.json``.

The summary is a self-description and is checked as one: every field the page shows has its
type checked, and the winner's run folder is looked up by name under the tune folder's own
``trials/`` (a doctored path cannot pull another folder into a report that may be shared).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError

SUMMARY = "tune_summary.json"
TRIALS = "trials"
PLOTS = (("optimization_history.png", "objective of each trial and the best so far"),
         ("param_importances.png", "which searched settings mattered (fANOVA importances)"))
_TRIAL_NAME = re.compile(r"^(?!\.)[A-Za-z0-9._-]{1,250}$")  # a name, never . or ..


@dataclass
class TuneSection:
    folder: str
    status: str
    objective: str
    direction: str
    budget_seconds: float | None
    used_seconds: float | None
    trials_run: int
    trials_pruned: int
    trials_failed: int
    winner: int
    winner_value: float
    winner_params: dict
    winner_is_default: bool
    winner_run: str  # the winner's run folder (under the tune folder's trials/)
    default_value: float | None
    test_accuracy: float | None
    test_images: int | None
    trials: list[dict]
    plots: list[str]
    selection_note: str | None = None  # why the default plan was kept over a trial with a better value

    def to_dict(self) -> dict:
        return asdict(self)


def is_tune_folder(folder: Path) -> bool:
    return (folder / SUMMARY).is_file()


def read(folder: Path) -> TuneSection:
    """The tune folder's summary, checked field by field; exit 2 names the field that is wrong."""
    path = folder / SUMMARY
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable as JSON ({exc})",
                         hint="run the search again, or resume it: cnnft tune --resume " + str(folder)) from None
    f = _Fields(raw, path)
    best = f.dict_("best", optional=True)
    if not best:
        raise InputError(f"{path}: no trial of this search has completed, so there is no winner to report",
                         hint=f"give the search more time: cnnft tune --resume {folder} --budget LONGER")
    b = _Fields(best, path, "best.")
    run = _winner_run(folder, b.text("run_dir"), path)
    test = f.dict_("test", optional=True)
    t = _Fields(test or {}, path, "test.")
    default = f.dict_("default_plan", optional=True)
    rows = [_trial(_Fields(r, path, f"trials[{i}].")) for i, r in enumerate(f.list_("trials"))]
    return TuneSection(
        folder=folder.name, status=f.text("status"), objective=f.text("objective"), direction=f.text("direction"),
        budget_seconds=f.number("budget_seconds", optional=True), used_seconds=f.number("used_seconds", optional=True),
        trials_run=f.whole("trials_run"), trials_pruned=f.whole("trials_pruned"), trials_failed=f.whole("trials_failed"),
        winner=b.whole("number"), winner_value=b.number("value"), winner_params=b.params("params"),
        winner_is_default=b.flag("default_plan"), winner_run=str(run),
        default_value=_Fields(default, path, "default_plan.").number("value") if default else None,
        test_accuracy=t.number("accuracy", optional=True) if test else None,
        test_images=t.whole("images", optional=True) if test else None,
        trials=rows, plots=[name for name, _ in PLOTS if (folder / name).is_file()],
        selection_note=_Fields(f.dict_("selection", optional=True) or {}, path, "selection.").text("note", optional=True))


def _winner_run(folder: Path, run_dir: str, path: Path) -> Path:
    name = Path(run_dir).name
    run = folder / TRIALS / name
    if not _TRIAL_NAME.match(name) or not run.is_dir():
        raise InputError(f"{path}: best.run_dir: {run_dir!r} is not a run folder under {folder / TRIALS}",
                         hint="the winner's run folder must stay in the tune folder; resume the search to redo it")
    return run


def _trial(f: "_Fields") -> dict:
    return {"number": f.whole("number"), "state": f.text("state"), "value": f.number("value", optional=True),
            "default_plan": f.flag("default_plan"), "epochs": f.whole("epochs", optional=True),
            "seconds": f.number("seconds", optional=True), "pruned_at": f.whole("pruned_at", optional=True),
            "params": f.params("params")}


class _Fields:
    """Typed reads of one JSON object; a wrong type is an InputError naming file and field."""

    def __init__(self, raw: object, path: Path, prefix: str = "") -> None:
        if not isinstance(raw, dict):
            raise InputError(f"{path}: {prefix.rstrip('.') or 'the file'}: expected an object, got {type(raw).__name__}")
        self.raw, self.path, self.prefix = raw, path, prefix

    def _bad(self, key: str, expected: str) -> InputError:
        return InputError(f"{self.path}: {self.prefix}{key}: expected {expected}, got {self.raw.get(key)!r}"[:400],
                          hint="tune_summary.json is written by cnnft tune; resume the search to write it again")

    def _get(self, key: str, ok, expected: str, optional: bool):
        v = self.raw.get(key)
        if v is None and optional:
            return None
        if not ok(v):
            raise self._bad(key, expected)
        return v

    def text(self, key: str, optional: bool = False) -> str | None:
        return self._get(key, lambda v: isinstance(v, str) and len(v) <= 1000, "text", optional)

    def number(self, key: str, optional: bool = False) -> float | None:
        v = self._get(key, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                      "a finite number", optional)
        return None if v is None else float(v)

    def whole(self, key: str, optional: bool = False) -> int | None:
        return self._get(key, lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**9,
                         "a whole number >= 0", optional)

    def flag(self, key: str) -> bool:
        return bool(self._get(key, lambda v: isinstance(v, bool), "true or false", True))

    def dict_(self, key: str, optional: bool = False) -> dict | None:
        return self._get(key, lambda v: isinstance(v, dict), "an object", optional)

    def list_(self, key: str) -> list:
        return self._get(key, lambda v: isinstance(v, list) and len(v) <= 100_000, "a list", False)

    def params(self, key: str) -> dict:
        v = self._get(key, lambda v: isinstance(v, dict) and len(v) <= 100 and all(
            isinstance(k, str) and (isinstance(x, (str, int, float, bool)) or x is None) for k, x in v.items()),
            "an object of plain values", True)
        return dict(v or {})


def plan_text(params: dict) -> str:
    """A trial's plan in one line: ``trainable_stages 3, lr 0.0012, augment light``."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) or "-"


def key_rows(t: TuneSection) -> list[tuple[str, str]]:
    """The search's key figures, as (label, value) rows."""
    def score(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}s"

    rows = [("status", t.status), ("objective", f"{t.objective} ({t.direction})"),
            ("budget / used", f"{secs(t.budget_seconds)} / {secs(t.used_seconds)}"),
            ("trials", f"{t.trials_run} run, {t.trials_pruned} pruned, {t.trials_failed} failed"),
            ("winner", f"trial {t.winner}" + (" (the default plan)" if t.winner_is_default else "")
             + f": {plan_text(t.winner_params)}"),
            (f"winner's {t.objective} (selected on it: optimistic)", score(t.winner_value)),
            (f"default plan's {t.objective} (trial 0, what cnnft train runs)", score(t.default_value))]
    if t.selection_note:
        rows.append(("selection", t.selection_note))
    if t.test_accuracy is not None:
        rows.append(("winner's test accuracy (no trial saw the test split)",
                     f"{t.test_accuracy:.4f} on {t.test_images} images"))
    return rows


def trial_rows(t: TuneSection) -> list[list[str]]:
    """One row per trial: number, state, score, epochs, seconds, plan."""
    return [[str(r["number"]) + (" *" if r["number"] == t.winner else ""),
             r["state"] + (f" after epoch {r['pruned_at']}" if r["pruned_at"] is not None else ""),
             "-" if r["value"] is None else f"{r['value']:.4f}",
             "-" if r["epochs"] is None else str(r["epochs"]),
             "-" if r["seconds"] is None else f"{r['seconds']:.0f}",
             ("default plan: " if r["default_plan"] else "") + plan_text(r["params"])] for r in t.trials]


TRIAL_COLUMNS = ["trial", "state", "score", "epochs", "seconds", "plan"]
HONEST = ("The winner was chosen on the validation split, so its validation score is optimistic; the test "
          "score (when data.test is set) is on images no trial saw. * marks the winner.")

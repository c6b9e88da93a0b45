"""The search space of ``cnnft tune``, from the config's ``tune:`` section.

Each key is ``auto`` (the default search below), a fixed value, a range ``{low, high, log}`` or
a list of choices. The depth is one integer axis: how many stages train, counted from the top,
0 = the head alone (head_only), 1..K = the last stages with the head (freeze_most), K+1 = the
whole network with its stem (full); the four strategies are points of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config, TuneConfig
from ..config import validate as validate_config
from ..errors import ConfigError

# what each key searches when it is `auto` (the depth and the sizes depend on the model and data)
LR_SPAN = 10.0  # train.lr / 10 .. train.lr x 10, log-uniform
AUTO = {
    "backbone_lr_scale": {"low": 0.01, "high": 1.0, "log": True},
    "layer_decay": [None, 0.85, 0.7],
    "augment": ["mild", "light", "standard"],
    "mixup": [0.0, 0.2],
    "label_smoothing": [0.0, 0.1],
}
SIZE_STEPS = (1.0, 0.75, 0.5)  # auto image sizes: the native size and these fractions of it
# where each searched key lands in the config
TARGET = {"lr": "train.lr", "backbone_lr_scale": "train.backbone_lr_scale", "layer_decay": "train.layer_decay",
          "augment": "data.augment", "mixup": "train.mixup", "label_smoothing": "train.label_smoothing",
          "image_size": "data.image_size"}
KEYS = ("trainable_stages", *TARGET)


@dataclass(frozen=True)
class Axis:
    """One searched key: fixed (``value``), a range (``low``..``high``) or ``choices``."""

    name: str
    value: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    @property
    def fixed(self) -> bool:
        return self.low is None and self.choices is None

    def suggest(self, trial) -> Any:
        """The trial's value (Optuna's suggest_* for searched keys)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is not None:
            if self.integer:
                return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        return self.value

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        if self.low is not None:
            return f"{self.name} {self.low:g}..{self.high:g}{' (log)' if self.log else ''}"
        return f"{self.name} = {self.value}"


@dataclass(frozen=True)
class Space:
    """The searched axes, and what a point of them means for the run's config."""

    axes: tuple[Axis, ...]
    body_stages: int  # K: the stages between the stem and the head

    def suggest(self, trial) -> dict[str, Any]:
        return {a.name: a.suggest(trial) for a in self.axes}

    def searched(self) -> list[Axis]:
        return [a for a in self.axes if not a.fixed]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The ``key.sub=value`` overrides that make the base config this point's run."""
        out = _depth_overrides(int(params["trainable_stages"]), self.body_stages)
        for key, target in TARGET.items():
            out.append(f"{target}={_yaml_value(params[key])}")
        return out


def _depth_overrides(n: int, k: int) -> list[str]:
    if n <= 0:
        return ["freeze.strategy=head_only"]
    if n > k:
        return ["freeze.strategy=full"]
    return ["freeze.strategy=freeze_most", f"freeze.trainable_stages={n}"]


def depth_of(strategy: str, frozen: list[bool], k: int) -> int:
    """A freeze plan as a point of the depth axis: how many of stem, stage1..K train."""
    if strategy == "full":
        return k + 1
    return sum(1 for f in frozen if not f)


def _yaml_value(v: Any) -> str:
    return "null" if v is None else str(v)


def build(cfg: Config, body_stages: int, native_size: int, smallest: int, include: dict | None = None) -> Space:
    """The space ``cfg.tune`` describes for a backbone with ``body_stages`` stages between stem
    and head, weights made at ``native_size`` px and inputs no smaller than ``smallest`` px.
    Every fixed value and choice must be one the run's config accepts: a bad one is a
    ConfigError naming its ``tune.`` key. ``include``: the default plan's values, which each
    searched axis is widened to hold (trial 0 is a point of the space)."""
    t: TuneConfig = cfg.tune
    lr = cfg.train.lr if cfg.train.lr != "auto" else 1e-3
    autos = {**AUTO, "trainable_stages": {"low": 0, "high": body_stages + 1},
             "lr": {"low": lr / LR_SPAN, "high": min(lr * LR_SPAN, 10.0), "log": True},
             "image_size": _sizes(native_size, smallest)}
    problems, axes = [], []
    for key in KEYS:
        setting = getattr(t, key)
        try:
            axes.append(_axis(key, autos[key] if setting == "auto" else setting, key == "trainable_stages"
                              or key == "image_size"))
        except ValueError as exc:
            problems.append(f"tune.{key}: {exc}")
    if problems:
        raise ConfigError(problems)
    space = Space(tuple(axes), body_stages)
    _check_values(cfg, space)
    return Space(tuple(_widened(a, (include or {}).get(a.name, a.value)) if a.name in (include or {}) else a
                       for a in axes), body_stages)


def _widened(a: Axis, v: Any) -> Axis:
    if a.choices is not None and not any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in a.choices):
        return Axis(a.name, choices=(*a.choices, v))
    if a.low is not None and isinstance(v, (int, float)) and not a.low <= v <= a.high:
        return Axis(a.name, low=min(a.low, v), high=max(a.high, v), log=a.log, integer=a.integer)
    return a


def _sizes(native: int, smallest: int) -> list[int]:
    sizes = sorted({max(smallest, 16, int(round(native * f / 8)) * 8 or 8) for f in SIZE_STEPS} | {native})
    return [s for s in sizes if s >= smallest] or [native]


def _axis(name: str, setting: Any, integer: bool) -> Axis:
    if isinstance(setting, dict):
        low, high, log = setting.get("low"), setting.get("high"), bool(setting.get("log", False))
        if low is None or high is None or isinstance(low, bool) or isinstance(high, bool):
            raise ValueError("a range needs numbers low and high, e.g. {low: 0.0001, high: 0.01, log: true}")
        if not low < high:
            raise ValueError(f"a range needs low < high (got low {low}, high {high})")
        if log and low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {low})")
        if integer and (low != int(low) or high != int(high)):
            raise ValueError(f"a range of whole numbers needs whole low and high (got {low}, {high})")
        return Axis(name, low=low, high=high, log=log, integer=integer)
    if isinstance(setting, list):
        if not setting:
            raise ValueError("an empty list of choices; give at least one value")
        if len(set(map(repr, setting))) != len(setting):
            raise ValueError(f"choices repeat a value: {setting}")
        return Axis(name, choices=tuple(setting)) if len(setting) > 1 else Axis(name, value=setting[0])
    return Axis(name, value=setting)


def _check_values(cfg: Config, space: Space) -> None:
    """Every fixed value, choice and range end, put in the run's config, must validate."""
    problems = []
    for a in space.axes:
        if a.name == "trainable_stages":
            vals = list(a.choices or ([a.low, a.high] if a.low is not None else [a.value]))
            bad = [v for v in vals if not (isinstance(v, int) and 0 <= v <= space.body_stages + 1)]
            if bad:
                problems.append(f"tune.trainable_stages: {bad[0]!r} is out of range for this model, which has "
                                f"{space.body_stages} stages between stem and head; use 0..{space.body_stages + 1}")
            continue
        vals = list(a.choices or ([a.low, a.high] if a.low is not None else [a.value]))
        section, key = TARGET[a.name].split(".")
        for v in vals:
            raw = cfg.to_dict()
            raw[section][key] = int(v) if a.integer and a.name == "image_size" else v
            try:
                validate_config(raw)
            except ConfigError as exc:
                why = "; ".join(p.split(": ", 1)[-1] for p in exc.problems)
                problems.append(f"tune.{a.name}: {v!r} is not a valid {TARGET[a.name]} ({why})")
                break
    if problems:
        raise ConfigError(problems)

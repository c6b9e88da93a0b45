"""``model.weights`` parsed once into a small type, whether weights can be had offline, and
loading a local weights file into any built model (strictly, except for the head, whose
shape may differ). Importing this module does not import torch (``validate`` parses
weights without it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT = "DEFAULT"  # the config's spelling of "the source's default pretrained weights"
NONE = "none"  # random initialisation
# timm's own schemes naming a model folder (config.json + weights) as a backbone: a folder on
# disk, or a repository on the Hugging Face Hub
HUB_PREFIXES = ("local-dir:", "hf-hub:")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


class Kind(Enum):
    DEFAULT = "default"  # the source's default pretrained weights
    NONE = "none"  # random initialisation
    NAMED = "named"  # a weights name the source knows (torchvision's IMAGENET1K_V2)
    FILE = "file"  # a local weights or checkpoint file


@dataclass(frozen=True)
class WeightsSpec:
    """What ``model.weights`` asks for: the source's default weights, none (random init), a
    weights name the source knows (torchvision's IMAGENET1K_V2), or a local file."""

    kind: Kind
    text: str  # as written in the config

    @classmethod
    def parse(cls, text: str) -> "WeightsSpec":
        """Read a config value: a path first (a bare name counts when such a file exists in
        the working folder), then DEFAULT and none in any case, else a weights name."""
        if _is_path(text):
            return cls(Kind.FILE, text)
        if text.lower() == NONE:
            return cls(Kind.NONE, text)
        if text.upper() == DEFAULT:
            return cls(Kind.DEFAULT, text)
        return cls(Kind.NAMED, text)

    @property
    def path(self) -> Path:
        return Path(self.text).expanduser()


def _is_path(text: str) -> bool:
    if "/" in text or "\\" in text or Path(text).suffix in _WEIGHT_SUFFIXES:
        return True
    # a weights file in the working folder named without a suffix; these exact spellings keep
    # their meaning even then
    return text not in (DEFAULT, NONE, "None", "NONE") and Path(text).is_file()


@dataclass(frozen=True)
class Availability:
    """Whether weights can be had without network: ``status`` is packaged, cached or file
    (offline), none (random init), download (fetched on first use) or missing (cannot be had)."""

    status: str
    detail: str
    url: str | None = None
    path: str | None = None  # where the file is, or where a download puts it

    @property
    def offline(self) -> bool:
        return self.status in ("packaged", "cached", "file", "none")


def file_or_none(spec: WeightsSpec) -> Availability:
    """The availability of a weights file (FILE) or of random initialisation (anything else)."""
    if spec.kind is Kind.FILE:
        if spec.path.is_file():
            return Availability("file", f"local file {spec.path}", path=str(spec.path))
        return Availability("missing", f"model.weights: weights file not found: {spec.path}", path=str(spec.path))
    return Availability("none", "random initialisation (no pretrained weights)")


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a weights/checkpoint file safely (never an arbitrary pickle)."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"model.weights: weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(p))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"model.weights: {p} is not a valid safetensors file: {exc}") from None
    from ..safeload import safe_torch_load

    obj = safe_torch_load(p)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"model.weights: {p} holds no state dict of tensors")
    return obj


def apply_file(model: nn.Module, spec: WeightsSpec, heads: tuple[str, ...]) -> None:
    """Load ``spec``'s file into ``model``: every layer strictly except the heads, which
    are taken from the file only where their shapes fit (same number of classes)."""
    state = load_file(spec.path)
    _load_except_head(model, state, heads, spec.text)
    _load_head_if_fits(model, state, heads)


def _is_head_key(key: str, heads: tuple[str, ...]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


def _load_except_head(model: nn.Module, state: dict, heads: tuple[str, ...], path: str) -> None:
    body = {k: v for k, v in state.items() if not _is_head_key(k, heads)}
    own = model.state_dict()
    missing = [k for k in own if k not in body and not _is_head_key(k, heads)]
    unexpected = [k for k in body if k not in own]
    # checked before loading: load_state_dict raises a bare RuntimeError on a shape mismatch
    wrong = [f"{k} {tuple(v.shape)} vs the model's {tuple(own[k].shape)}"
             for k, v in body.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} keys of another shape (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(
            f"model.weights: {path} does not fit {type(model).__name__}: {'; '.join(parts)}",
            hint="check model.backbone matches the architecture the file was saved from",
        )
    model.load_state_dict(body, strict=False)


def _load_head_if_fits(model: nn.Module, state: dict, heads: tuple[str, ...]) -> None:
    head = {k: v for k, v in state.items() if _is_head_key(k, heads)}
    own = model.state_dict()
    if head and all(k in own and own[k].shape == v.shape for k, v in head.items()):
        model.load_state_dict(head, strict=False)

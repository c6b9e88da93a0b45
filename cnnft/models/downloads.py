"""Where pretrained weights are fetched from, and errors that say what to do when they
cannot be: fail at once with the file to fetch and where to put it, not after retries."""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsUnavailableError


def download_error(what: str, url: str, exc: Exception) -> WeightsUnavailableError:
    """A torchvision download failed: name the file and the hub cache path to put it at."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return WeightsUnavailableError(
        f"cannot download the pretrained weights for {what}: {type(exc).__name__}: {exc}",
        hint=(
            f"on a machine without network, download {url} elsewhere and put it at {cache}; "
            f"or use model.weights=none (random init), a local file (model.weights=path/to/file.pth), "
            f"or an offline backbone (model.backbone=efficientnet_lite0)"
        ),
    )


def network_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed download rather than a bug."""
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)) or any(
        s in text for s in ("urlopen", "connection", "name resolution", "network", "offline", "hub")
    )


def _timm_origin(bare: str) -> tuple[str, str | None, str]:
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


def timm_download_error(bare: str, why: str) -> WeightsUnavailableError:
    """timm's weights for ``bare`` cannot be had: name the file and how to pass it instead."""
    _, repo, url = _timm_origin(bare)
    where = f" (Hugging Face repo {repo})" if repo else ""
    return WeightsUnavailableError(
        f"cannot download the pretrained weights for timm/{bare}{where}: {why}",
        hint=(f"on a machine without network, download {url} elsewhere and pass it as "
              f"model.weights=path/to/{Path(urllib.parse.urlparse(url).path).name or 'weights.pth'} "
              f"(loaded strictly except the head); or use model.weights=none (random init), "
              f"or an offline backbone (model.backbone=efficientnet_lite0)"),
    )


def timm_weights_file(bare: str) -> tuple[str | None, str, str]:
    """Where timm's weights for ``bare`` are or would be: (cached file or None, the URL they
    come from, the file they are fetched into)."""
    _, repo, url = _timm_origin(bare)
    if repo:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        for f in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, f)
            if isinstance(found, str):
                return found, url, found
        return None, url, str(Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}")
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    return (str(target) if url and target.is_file() else None), url, str(target)


def timm_weights_reachable(bare: str, timeout: float = 3.0) -> None:
    """Fail at once, not after a minute of download retries, when timm's weights are neither
    cached nor reachable."""
    host, repo, url = _timm_origin(bare)
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
        raise timm_download_error(bare, f"{host} cannot be reached ({exc.strerror or exc})") from None


# a timm model folder's weights, in the order timm looks for them
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def hub_download_error(name: str, why: str) -> WeightsUnavailableError:
    """An ``hf-hub:`` model cannot be fetched: say how to bring it over as a folder."""
    repo = name.partition(":")[2].split("@")[0]
    return WeightsUnavailableError(
        f"cannot download {name} from the Hugging Face Hub: {why}",
        hint=(f"on a machine with network, fetch it (huggingface-cli download {repo} --local-dir DIR), copy DIR "
              f"here and use model.backbone=local-dir:DIR; or an offline backbone (model.backbone=efficientnet_lite0)"),
    )


def check_hub_model(name: str, want_weights: bool, timeout: float = 3.0) -> None:
    """Fail at once, with what to do, when a ``local-dir:`` folder lacks its config.json (or
    weights), or an ``hf-hub:`` repository is neither cached nor reachable."""
    scheme, _, where = name.partition(":")
    if scheme == "local-dir":
        folder = Path(where).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.backbone: {name}: {folder} is not a timm model folder (no config.json in it); give a "
                "folder written by `cnnft export RUN --format hf --out DIR`, or a timm model downloaded from the "
                "Hugging Face Hub")
        if want_weights and not any((folder / f).is_file() for f in HUB_WEIGHT_FILES):
            raise ConfigError(f"model.weights: {folder} holds no weights file ({', '.join(HUB_WEIGHT_FILES)}); "
                              "model.weights=none trains its architecture from random weights")
        return
    from huggingface_hub import try_to_load_from_cache

    repo = where.split("@")[0]
    needed = [("config.json",)] + ([HUB_WEIGHT_FILES] if want_weights else [])
    if all(any(isinstance(try_to_load_from_cache(repo, f), str) for f in group) for group in needed):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as exc:
        raise hub_download_error(name, f"huggingface.co cannot be reached ({exc.strerror or exc})") from None


def hub_weights_file(name: str) -> str | None:
    """The weights file a ``local-dir:`` folder or a cached ``hf-hub:`` repository holds."""
    scheme, _, where = name.partition(":")
    if scheme == "local-dir":
        found = [Path(where).expanduser() / f for f in HUB_WEIGHT_FILES]
        return next((str(p.resolve()) for p in found if p.is_file()), None)
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(where.split("@")[0], f) for f in HUB_WEIGHT_FILES]
    return next((c for c in cached if isinstance(c, str)), None)


def hub_config(name: str) -> dict:
    """The config.json of a ``local-dir:`` folder or a cached ``hf-hub:`` repository ({} when unreadable)."""
    import json

    scheme, _, where = name.partition(":")
    if scheme == "local-dir":
        path: str | Path | None = Path(where).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(where.split("@")[0], "config.json")
        path = found if isinstance(found, str) else None
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}

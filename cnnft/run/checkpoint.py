"""Self-describing checkpoints: what a run saves (model, classes, preprocessing, freeze plan,
optimizer/scheduler/scaler/RNG state) and how a model is rebuilt from one. Written atomically
(:mod:`cnnft.files`), read through :mod:`cnnft.safeload`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ConfigDict, model_validator
from torch import nn

from .. import config as config_mod
from .. import ranges as R
from ..errors import CheckpointError, NoSpaceError
from ..models import described
from ..files import atomic_write_bytes
from ..results import calibration
from ..results.rundir import RunDir
from ..safeload import safe_torch_load
from ..training import runtime

if TYPE_CHECKING:
    from ..models import Preprocess

FORMAT = "cnnft-checkpoint"
VERSION = 1
EPOCH = R.Range(int, ge=0, le=R.EPOCHS.le)  # 0: only the head phase (or nothing) finished
STEP = R.Range(int, ge=0, le=100_000_000)  # batches of a stopped epoch already trained


class Header(described.Classified):
    """What a checkpoint says about itself, checked before anything uses it (the weights and the
    optimizer/scheduler/RNG states are checked by the code that loads them)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)

    format: Literal[FORMAT]  # type: ignore[valid-type]
    epoch: EPOCH.t
    step: STEP.t
    running: dict[str, Any] | None = None
    history: list[dict[str, Any]]
    config: dict[str, Any]
    freeze_plan: dict[str, Any]

    @model_validator(mode="after")
    def _state_agrees(self) -> "Header":
        if self.history and self.history[-1].get("epoch") != self.epoch:
            raise ValueError(f"epoch {self.epoch} disagrees with its own history, whose last epoch is "
                             f"{self.history[-1].get('epoch')!r}")
        if self.step and (self.running or {}).get("steps") != self.step:
            raise ValueError(f"step {self.step} disagrees with the stopped epoch's running sums "
                             f"({(self.running or {}).get('steps')!r} steps)")
        return self


def save(obj: dict, path: str | Path) -> None:
    """Serialise a checkpoint dict with torch.save, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except NoSpaceError as exc:
        run = RunDir.of_checkpoint(path)
        if run is None:
            raise
        raise NoSpaceError(exc.message, needed=exc.needed,
                           hint=f"{exc.hint}; then resume the run: cnnft train --resume {run}") from None


def load(path: str | Path) -> dict:
    """Load a cnnft checkpoint (a file, or a run folder whose best checkpoint is used)."""
    p = Path(path)
    if p.is_dir():
        run = RunDir(p)
        for cand in (run.best, run.last):
            if cand.is_file():
                p = cand
                break
        else:
            raise CheckpointError(f"{p} holds no checkpoints/best.pt or checkpoints/last.pt")
    obj = safe_torch_load(p)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{p} is not a cnnft checkpoint",
            hint="pass a checkpoint written by `cnnft train` (run_dir/checkpoints/best.pt); "
            "plain weights files go in model.weights",
        )
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{p} was written by a newer cnnft (format {obj['version']}); upgrade cnnft")
    described.read(Header, {k: v for k, v in obj.items() if k in Header.model_fields}, p, "checkpoint",
                   CheckpointError, hint="the file was edited or damaged: use a checkpoint as `cnnft train` wrote "
                   "it (run_dir/checkpoints/best.pt or last.pt), or train again")
    obj["path"] = str(p)
    return obj


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on the CPU, with the run's config."""

    model: nn.Module
    name: str
    classes: list[str]
    preprocess: "Preprocess"
    checkpoint: dict
    config: config_mod.Config

    @property
    def path(self) -> Path:
        return Path(self.checkpoint["path"])

    def to_device(self, device: str) -> runtime.Runtime:
        """Move the model to ``device`` and return the runtime training used there
        (the run's precision and memory format)."""
        rt = runtime.make_runtime(device, self.config.train.amp, self.config.train.channels_last, "--device")
        rt.prepare(self.model)
        return rt

    def inference(self, device: str) -> tuple[nn.Module, runtime.Runtime]:
        """The model on ``device`` in the form that evaluates and predicts fastest: its
        BatchNorm merged into the convolutions before it (see :mod:`cnnft.training.fold`) where that
        gives the same logits; ``model`` itself keeps its layers."""
        from .. import models
        from ..training import fold

        rt = self.to_device(device)
        size = self.preprocess.crop_size
        sample = rt.images(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
        return fold.for_inference(self.model, sample, models.logits_of), rt


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model a checkpoint (or run folder) describes and load its weights strictly.

    The run's config is validated again through the schema, so it is read by attribute,
    and the eval preprocessing is the weights' pipeline at the run's image size.
    """
    from .. import models

    ckpt = load(path)
    cfg = config_mod.validate(ckpt["config"], source=ckpt["path"])
    bb = models.build(ckpt["model_name"], "none", ckpt["num_classes"])
    try:
        bb.model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise CheckpointError(
            f"{ckpt['path']}: the saved weights do not fit {ckpt['model_name']}: {first}",
            hint="was the checkpoint written with a different torchvision/timm version?",
        ) from None
    pre = models.Preprocess.from_dict(ckpt["preprocess"]).with_size(cfg.data.image_size)
    return LoadedModel(bb.model.eval(), ckpt["model_name"], list(ckpt["classes"]), pre, ckpt, cfg)


def temperature_of(ckpt: dict, log) -> float:
    """The calibration temperature stored in a checkpoint; 1 (and one line on ``log``) for a
    checkpoint written before calibration existed or by a run that has not finished."""
    if "temperature" not in ckpt:
        log(f"note: {ckpt['path']} holds no calibration temperature (written by an older cnnft or an unfinished "
            "run): probabilities are uncalibrated (temperature 1)")
        return 1.0
    try:
        return calibration.checked_temperature(ckpt["temperature"], ckpt["path"])
    except ValueError as exc:
        raise CheckpointError(str(exc), hint="the checkpoint is damaged; train again or pass another one") from None


def rng_state() -> dict:
    """The RNG states needed for a resumed run to continue bit-for-bit."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

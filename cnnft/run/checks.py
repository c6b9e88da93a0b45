"""What a run must pass before its first step, in one list that `validate` and `train` both
run: whatever train would refuse once it has its data and model, validate refuses too.

Torch-free: the facts come in as names (classes found in the folders, the backbone's stage
names), so validate can run the checks without building anything it does not need."""

from __future__ import annotations

from typing import Sequence

from ..config import Config
from ..data.samples import class_mismatch
from ..errors import ConfigError


def class_weight_problems(setting: str | dict, classes: Sequence[str]) -> list[str]:
    """``train.class_weights`` as a mapping must name classes the data has."""
    if not isinstance(setting, dict) or not classes:
        return []
    unknown = sorted(set(setting) - set(classes))
    if not unknown:
        return []
    return [f"train.class_weights: unknown class(es) {', '.join(unknown[:20])}; the classes are "
            f"{', '.join(list(classes)[:20])}{', ...' if len(classes) > 20 else ''}"]


def stage_problems(frozen_stages: int | None, trainable_stages: int | str, stage_names: Sequence[str],
                   model: str) -> list[str]:
    """``freeze.frozen_stages`` and ``freeze.trainable_stages`` must fit the model's stages
    (whatever strategy ends up using them: auto may pick freeze_early or freeze_most)."""
    body = [n for n in stage_names if n not in ("stem", "head")]
    k, out = len(body), []
    names = ", ".join(body)
    if frozen_stages is not None and not 0 <= frozen_stages < k:
        out.append(f"freeze.frozen_stages: {frozen_stages} is out of range for {model}, which has {k} stages after "
                   f"the stem ({names}); use 0..{k - 1}")
    if trainable_stages != "auto" and not 0 <= int(trainable_stages) <= k:
        out.append(f"freeze.trainable_stages: {trainable_stages} is out of range for {model}, which has {k} stages "
                   f"after the stem ({names}); use 0..{k}")
    return out


def split_class_problems(key: str, classes: Sequence[str], other: Sequence[str]) -> list[str]:
    """A split (``data.test``) must hold the training classes, by name."""
    differ = class_mismatch(key, classes, other, "the training classes", f"missing in {key.split('.')[-1]}")
    return [] if differ is None else [differ + "; give it one sub-folder per training class, with the same names"]


def before_training(cfg: Config, classes: Sequence[str], stage_names: Sequence[str] | None,
                    test_classes: Sequence[str] | None = None) -> list[str]:
    """Every problem the run would meet before its first step (empty: none)."""
    problems = class_weight_problems(cfg.train.class_weights, classes)
    if stage_names is not None:
        problems += stage_problems(cfg.freeze.frozen_stages, cfg.freeze.trainable_stages, stage_names,
                                   cfg.model.backbone)
    if test_classes is not None and classes:
        problems += split_class_problems("data.test", classes, test_classes)
    return problems


def refuse(problems: list[str]) -> None:
    """Raise them together (exit 2), as the config's own problems are."""
    if problems:
        raise ConfigError(problems)

"""Class imbalance: a warning with the counts, loss weights and a balanced sampler.

A classifier trained on 900 images of one class and 100 of another learns that the first is
nine times as likely; where the classes matter equally, the loss can weight each class by
the inverse of its frequency (``train.class_weights: auto``), or each epoch can draw the
classes equally often (``data.balanced_sampler``).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..errors import ConfigError

IMBALANCED_AT = 2.0  # largest / smallest class count from which a training set counts as imbalanced


def counts(labels: Sequence[int], n_classes: int) -> list[int]:
    c = Counter(labels)
    return [c.get(i, 0) for i in range(n_classes)]


def imbalance(classes: list[str], per_class: list[int]) -> str | None:
    """A warning naming the class counts when the largest class is IMBALANCED_AT times the smallest."""
    low, high = min(per_class), max(per_class)
    if low == 0 or high / low < IMBALANCED_AT:
        return None
    shown = ", ".join(f"{c} {n}" for c, n in sorted(zip(classes, per_class), key=lambda t: -t[1])[:12])
    return (f"warning: the training set is imbalanced ({high / low:.1f}x between the largest and smallest class): "
            f"{shown}{', ...' if len(classes) > 12 else ''}")


def loss_weights(setting: str | dict, classes: list[str], per_class: list[int]) -> torch.Tensor | None:
    """Per-class loss weights for ``train.class_weights``: None (plain loss) for ``none`` or a
    balanced set under ``auto``; inverse frequency (mean 1) under ``auto`` otherwise; a mapping
    names classes (the others weigh 1)."""
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(classes))
        if unknown:
            raise ConfigError(f"train.class_weights: unknown class(es) {', '.join(unknown)}; "
                              f"the classes are {', '.join(classes[:20])}")
        return torch.tensor([float(setting.get(c, 1.0)) for c in classes])
    if setting == "none" or imbalance(classes, per_class) is None:
        return None
    inv = torch.tensor([1.0 / max(n, 1) for n in per_class])
    return inv * len(per_class) / inv.sum()


def sample_weights(labels: Sequence[int], per_class: list[int]) -> torch.Tensor:
    """Per-sample weights that draw every class equally often."""
    return torch.tensor([1.0 / per_class[y] for y in labels], dtype=torch.double)

"""Test-time augmentation: the average of a model's logits on an image and on its mirror.

Valid only where a mirrored image shows the same class: the run must have trained with
flips (``data.hflip``), which is cnnft's record that its data is mirror-invariant.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..models import logits_of


class FlipAverage(nn.Module):
    """``model`` whose logits are averaged over the image and its horizontal mirror."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (logits_of(self.model(x)) + logits_of(self.model(torch.flip(x, dims=[3])))) / 2


def with_tta(model: nn.Module, enabled: bool, trained_with_flips: bool) -> nn.Module:
    """``model`` as it is, or averaged with its mirror view when ``--tta`` asks and it is valid."""
    if not enabled:
        return model
    if not trained_with_flips:
        raise InputError("--tta: this run trained without flips (data.hflip false), so a mirrored image may "
                         "show another class (a mirrored digit is no digit)",
                         hint="leave out --tta, or train with data.hflip=true if mirror images keep their class")
    return FlipAverage(model).eval()

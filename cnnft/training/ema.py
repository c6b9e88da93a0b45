"""Weight EMA: an exponential moving average of the model's weights, updated after every
optimizer step; what is validated and saved for predict/evaluate (timm's ModelEma).

BatchNorm running statistics are averaged like the weights (timm's ModelEmaV2/V3 do the
same): the averaged model's statistics follow the recent batches, smoothed as its weights
are; integer buffers (the batch counter) are copied. The first update copies the weights
(so a head phase before it is not averaged away) and the decay then ramps up as
``min(decay, (1 + n) / (10 + n))`` after n updates (TensorFlow's ExponentialMovingAverage
with num_updates), so that a short run is not dominated by its starting point.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class WeightEma:
    """The averaged weights of ``model`` (None until the first update)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights."""
        current = self.model.state_dict()
        if self.shadow is None:
            self.shadow = {k: v.detach().clone() for k, v in current.items()}
        else:
            d = min(self.decay, (1 + self.updates) / (10 + self.updates))
            floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
            torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k].detach() for k in floats], 1 - d)
            for k, v in self.shadow.items():
                if not v.is_floating_point():
                    v.copy_(current[k])
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights (in place, so modules sharing
        its parameters see them too); its own come back afterwards, bit for bit."""
        if self.shadow is None:
            yield
            return
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.model.load_state_dict(raw)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The weights to validate and publish: the average, or the model's own before any update."""
        return self.shadow if self.shadow is not None else self.model.state_dict()

    def load(self, averaged: dict[str, torch.Tensor], updates: int) -> None:
        """Continue a saved average (``updates`` 0: none started yet)."""
        current = self.model.state_dict()
        self.updates = updates
        self.shadow = None if updates == 0 else {
            k: v.to(device=current[k].device, dtype=current[k].dtype).clone() for k, v in averaged.items()}

"""Mixup and CutMix: training on blends of two images with the blended targets.

Each batch is paired with itself reversed (sample i with sample N-1-i, as timm pairs them)
and mixed with a ratio ``lam`` drawn from Beta(alpha, alpha): mixup blends whole images,
CutMix pastes a box of the partner whose area is ``1 - lam`` (``lam`` is then the share of
pixels actually kept). With both on, each batch uses one of them, chosen with equal odds.
The targets are class probabilities ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``:
``nn.CrossEntropyLoss`` takes them as they are and applies its ``label_smoothing`` to them
(smoothing the mixed one-hots is mixing the smoothed ones). Draws use torch's global RNG,
which checkpoints save, so a resumed run mixes as the uninterrupted one did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Mixer:
    """Mixes a batch of images and labels into mixed images and soft targets ``[N, C]``."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        if mixup <= 0 and cutmix <= 0:
            raise ValueError("Mixer needs mixup > 0 or cutmix > 0")
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.last_lam: float | None = None  # the ratio of the batch mixed last (for tests and logs)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or bool(torch.rand(()) < 0.5))
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            images, lam = _paste_box(images, partner, lam)
        else:
            images = images * lam + partner * (1 - lam)
        one_hot = F.one_hot(labels, self.num_classes).float()
        self.last_lam = lam
        return images, one_hot * lam + one_hot.flip(0) * (1 - lam)


def _paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """``images`` with a random box of area about ``1 - lam`` taken from ``partner`` (clipped at
    the borders); returns them and the share of pixels kept."""
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    out = images.clone()
    out[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return out, 1 - (y1 - y0) * (x1 - x0) / (h * w)

"""Train and eval preprocessing on torchvision.transforms.v2.

Eval preprocessing is what the weights were trained with (their metadata: resize, centre
crop, mean/std, interpolation). Augmentation presets for training:

  * ``none``     - the eval pipeline
  * ``light``    - random resized crop (scale 0.35-1) + horizontal flip
  * ``standard`` - light with scale 0.25-1 + colour jitter (0.2)
  * ``strong``   - random resized crop (0.08-1) + flip + TrivialAugmentWide + random erasing (p=0.25)
"""

from __future__ import annotations

from typing import get_args

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from .config import Augment
from .models import Preprocess

PRESETS = get_args(Augment)  # the schema names the presets; this module implements each


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode(name)


def _tensor(pre: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))]


def eval_transform(pre: Preprocess) -> T.Compose:
    """Resize the short side, centre-crop, normalise: the weights' own eval pipeline."""
    interp = _interp(pre.interpolation)
    return T.Compose([T.Resize(pre.resize_size, interpolation=interp, antialias=True),
                      T.CenterCrop(pre.crop_size), *_tensor(pre)])


def train_transform(pre: Preprocess, preset: str) -> T.Compose:
    """The augmentation preset at the weights' input size and normalisation."""
    if preset == "none":
        return eval_transform(pre)
    interp = _interp(pre.interpolation)
    size = pre.crop_size
    if preset == "light":
        ops = [T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interp, antialias=True),
               T.RandomHorizontalFlip()]
        return T.Compose([*ops, *_tensor(pre)])
    if preset == "standard":
        ops = [T.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=interp, antialias=True),
               T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2)]
        return T.Compose([*ops, *_tensor(pre)])
    if preset == "strong":
        ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp, antialias=True),
               T.RandomHorizontalFlip(), T.TrivialAugmentWide(interpolation=interp)]
        return T.Compose([*ops, *_tensor(pre), T.RandomErasing(p=0.25)])
    raise ValueError(f"unknown augmentation preset {preset!r}; use one of {', '.join(PRESETS)}")

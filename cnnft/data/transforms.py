"""Train and eval preprocessing on torchvision.transforms.v2.

Eval preprocessing is what the weights were trained with (their metadata: resize, centre
crop, mean/std, interpolation). Augmentation presets for training (``auto`` picks ``light`` for photos like ImageNet's and
``mild`` otherwise; ``data.hflip`` decides the flips, by default only for such photos):

  * ``none``     - the eval pipeline
  * ``mild``     - random resized crop (scale 0.6-1), for data unlike ImageNet photos
  * ``light``    - random resized crop (scale 0.35-1) + horizontal flip
  * ``standard`` - light with scale 0.25-1 + colour jitter (0.2)
  * ``strong``   - random resized crop (0.08-1) + flip + TrivialAugmentWide + random erasing (p=0.25)
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..config import AUGMENT_PRESETS
from ..models import Preprocess

PRESETS = AUGMENT_PRESETS  # the schema names the presets; this module implements each


def _interp(name: str) -> InterpolationMode:
    return InterpolationMode(name)


def _tensor(pre: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(pre.mean), list(pre.std))]


MAX_ASPECT = 8  # long side / short side an image keeps before the eval resize


class BoundedAspect:
    """Centre-crop the long side to at most MAX_ASPECT x the short side. The eval resize scales
    the short side to resize_size, so a 1 x 100,000 px strip (small on disk, under the
    decompression-bomb limit) would allocate resize_size^2 x 100,000 pixels; the centre crop
    after the resize keeps less than the short side's length of the long side, so what is cut
    here is never seen, and images up to 8:1 are left as they are."""

    def __call__(self, img):
        w, h = img.size
        short, long = min(w, h), max(w, h)
        if long <= MAX_ASPECT * short:
            return img
        keep = MAX_ASPECT * short
        if w > h:
            left = (w - keep) // 2
            return img.crop((left, 0, left + keep, h))
        top = (h - keep) // 2
        return img.crop((0, top, w, top + keep))


def eval_transform(pre: Preprocess) -> T.Compose:
    """Resize the short side, centre-crop, normalise: the weights' own eval pipeline (extreme
    panoramas first cut to 8:1: the resize never allocates more than resize_size^2 x 8 pixels)."""
    interp = _interp(pre.interpolation)
    return T.Compose([BoundedAspect(), T.Resize(pre.resize_size, interpolation=interp, antialias=True),
                      T.CenterCrop(pre.crop_size), *_tensor(pre)])


# preset -> (random-resized-crop scale range, colour jitter, TrivialAugment + random erasing)
_PRESET_OPS = {
    "mild": ((0.6, 1.0), 0.0, False),
    "light": ((0.35, 1.0), 0.0, False),
    "standard": ((0.25, 1.0), 0.2, False),
    "strong": ((0.08, 1.0), 0.0, True),
}


def resolve_augment(preset: str, hflip: bool | str, similar: bool) -> tuple[str, bool]:
    """``data.augment`` and ``data.hflip`` with ``auto`` decided from what the data is like:
    photos like ImageNet's get ``light`` crops and mirror images; other data (digits, text,
    medical or satellite images, small images) gets ``mild`` crops and no flips, which could
    change what an image shows (a mirrored 2 is no 2)."""
    if preset == "auto":
        preset = "light" if similar else "mild"
    if hflip == "auto":
        hflip = similar
    return preset, bool(hflip) and preset != "none"


def train_transform(pre: Preprocess, preset: str, hflip: bool = True) -> T.Compose:
    """The augmentation preset at the weights' input size and normalisation; ``hflip``
    mirrors half the images at random."""
    if preset == "none":
        return eval_transform(pre)
    if preset not in _PRESET_OPS:
        raise ValueError(f"unknown augmentation preset {preset!r}; use one of {', '.join(PRESETS)}")
    interp = _interp(pre.interpolation)
    scale, jitter, strong = _PRESET_OPS[preset]
    ops = [T.RandomResizedCrop(pre.crop_size, scale=scale, interpolation=interp, antialias=True)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if jitter:
        ops.append(T.ColorJitter(jitter, jitter, jitter))
    if strong:
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    return T.Compose([*ops, *_tensor(pre), *([T.RandomErasing(p=0.25)] if strong else [])])

"""Eval preprocessing follows the weights' metadata; augmentation presets do what README says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnft import models
from cnnft.data import transforms


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 300x200 RGB image with structure (gradients + noise), asymmetric left to right."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:200, 0:300]
    arr = np.stack([x * 255 / 300, y * 255 / 200, (x * y) % 256], axis=-1) + rng.normal(0, 10, (200, 300, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("name, weights", [("resnet50", "IMAGENET1K_V2"), ("vit_b_16", "IMAGENET1K_V1"),
                                           ("efficientnet_b0", "IMAGENET1K_V1")])
def test_eval_preprocessing_equals_the_weights_own(photo, name, weights):
    import torchvision

    w = torchvision.models.get_model_weights(name)[weights]
    pre = models.sources.tv_preprocess(w)  # what models.build records for these weights
    ours = transforms.eval_transform(pre)(photo)
    theirs = w.transforms()(photo)
    assert ours.shape == theirs.shape == (3, pre.crop_size, pre.crop_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_offline_lite_weights_carry_their_own_preprocessing():
    bb = models.build("efficientnet_lite0", "DEFAULT", 3)
    p = bb.preprocess
    assert (p.crop_size, p.mean, p.std, p.interpolation) == (224, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert p.resize_size > p.crop_size  # resize, then centre crop
    small = p.with_size(96)  # data.image_size scales resize and crop together
    assert small.crop_size == 96 and small.resize_size == round(96 * p.resize_size / 224)
    assert (small.mean, small.interpolation) == (p.mean, p.interpolation)


def test_presets_shapes_randomness_and_flip(photo):
    pre = models.Preprocess(crop_size=64, resize_size=73)
    eval_out = transforms.eval_transform(pre)(photo)
    torch.manual_seed(0)
    assert torch.equal(transforms.train_transform(pre, "none")(photo), eval_out), "none is the eval pipeline"
    for preset in ("light", "standard", "strong"):
        tf = transforms.train_transform(pre, preset)
        torch.manual_seed(1)
        a = tf(photo)
        torch.manual_seed(1)
        b = tf(photo)
        torch.manual_seed(2)
        c = tf(photo)
        assert a.shape == (3, 64, 64) and a.dtype == torch.float32
        assert torch.equal(a, b), f"{preset}: seeded runs must repeat"
        assert not torch.equal(a, c) and not torch.equal(a, eval_out), f"{preset}: must augment"
    # flips: mirrored photos have their horizontal gradient reversed in the red channel
    light = transforms.train_transform(pre, "light")
    slopes = []
    for seed in range(20):
        torch.manual_seed(seed)
        red = light(photo)[0]
        slopes.append(float(red[:, -8:].mean() - red[:, :8].mean()))
    assert any(s > 0 for s in slopes) and any(s < 0 for s in slopes), slopes


def test_strong_erases_and_standard_jitters_colour(photo):
    pre = models.Preprocess(crop_size=64, resize_size=73)
    erasing = transforms.train_transform(pre, "strong").transforms[-1]
    assert type(erasing).__name__ == "RandomErasing" and erasing.p == 0.25
    names = [type(t).__name__ for t in transforms.train_transform(pre, "standard").transforms]
    assert "ColorJitter" in names and "RandomResizedCrop" in names
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        transforms.train_transform(pre, "extreme")

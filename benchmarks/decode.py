"""Image loading speed with and without JPEG draft decoding, side by side.

    python benchmarks/decode.py [FOLDER] [--size 224] [--repeat 2]

FOLDER defaults to ../shared/datasets/hymenoptera_data (or $CNNFT_DATASETS/hymenoptera_data).
For every image: decode + the eval transform of a 224 px model (what a frozen-backbone epoch
pays per image besides the forward pass). Prints images/second for all images and for the
large ones (over 2 megapixels), with draft decoding off and on, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from PIL import Image

from cnnft.data import folders as data
from cnnft.data import transforms
from cnnft.models import Preprocess


def rate(paths: list[str], draft: int | None, tf, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        for p in paths:
            tf(data.open_image(p, draft))
    return len(paths) * repeat / (time.perf_counter() - t0)


def pixels(path: str) -> int:
    with Image.open(path) as img:
        return img.width * img.height


def main() -> None:
    default = Path(os.environ.get("CNNFT_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=str(default / "hymenoptera_data"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    paths = sorted(str(p) for p in Path(a.folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"no JPEG files under {a.folder}")
    large = [p for p in paths if pixels(p) > 2_000_000]
    pre = Preprocess(crop_size=a.size, resize_size=round(a.size / 0.875), mean=(0.5,) * 3, std=(0.5,) * 3,
                     interpolation="bicubic")
    tf = transforms.eval_transform(pre)
    print(f"{a.folder}: {len(paths)} JPEGs, {len(large)} over 2 MP; eval transform at {a.size} px")
    print(f"{'images':<12}{'full decode':>14}{'draft':>10}{'ratio':>8}")
    for name, group in (("all", paths), ("over 2 MP", large)):
        if not group:
            continue
        full = rate(group, None, tf, a.repeat)
        drafted = rate(group, pre.resize_size, tf, a.repeat)
        print(f"{name:<12}{full:>12.1f}/s{drafted:>8.1f}/s{drafted / full:>7.2f}x")
    print("(images/second, one process; ratio = draft / full decode)")


if __name__ == "__main__":
    main()

"""The feature cache's memory is bounded by its budget, not by the data: a store filled as it is
computed (never a second copy), and a store on disk handing its pages back as it goes. Measured
as the peak resident memory of a fresh process while it computes and trains over every view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
MARGIN = 56 * MiB  # the model's activations for a few batches, the page window of a memory map

SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np, torch, torchvision
from PIL import Image
from cnnft.training import cache

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

mode, budget, folder, images = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
paths = sorted(str(p) for p in images.rglob("*.png"))
torch.manual_seed(0); torch.set_num_threads(1)
model = torchvision.models.resnet18(num_classes=2)
for name in ("conv1", "bn1"):  # the stem is frozen: the store holds its 64 x 24 x 24 output per image
    for p in getattr(model, name).parameters():
        p.requires_grad_(False)

def load(i):
    img = Image.open(paths[i]).convert("RGB").resize((96, 96))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

def images(view, batches):
    for b in batches:
        yield torch.stack([load(i) for i in b]), torch.zeros(len(b), dtype=torch.long)

n = len(paths)
sample = torch.stack([load(i) for i in range(16)])
split, why = cache.find_split(model, sample[:2])
with torch.no_grad():
    shape = split.prefix(sample).shape[1:]  # the first batch's working memory, before measuring
views = 2
need = cache.size_of(views, n, shape)
in_memory = need <= budget
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
base = status("VmRSS")
store = cache.Store.allocate(views, n, shape, in_memory=in_memory, disk=None if in_memory else (folder, "k"))
ds = cache.CachedFeatures(store, [0] * n, views, cache.Live(split, images, lambda t: t))
loader = cache.cached_loader(ds, torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(0)), 16)
for epoch in range(3):  # views 0 and 1 computed as their epochs train, view 0 read again
    ds.set_epoch(epoch)
    for x, y in loader:
        pass
print(json.dumps({"peak": status("VmHWM") - base, "need": need, "memory": in_memory,
                  "complete": store.complete(), "files": sorted(p.name for p in folder.glob("*"))}))
'''


def _peak(tmp_path: Path, budget: int) -> dict:
    images = make_image_folder(tmp_path / "images", per_class=300, size=24)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "memory" if budget else "disk", str(budget),
                          str(tmp_path / "cache"), str(images)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("budget_mb", [96, 1])
def test_the_store_takes_no_more_memory_than_its_budget(tmp_path, budget_mb):
    if not Path("/proc/self/clear_refs").exists():
        pytest.fail("needs Linux /proc to measure the peak resident memory")
    got = _peak(tmp_path, budget_mb * MiB)
    assert got["complete"]
    assert got["need"] > 80 * MiB  # 600 images x 2 views x 64x24x24 fp16: more than the margin allows
    assert got["memory"] == (budget_mb == 96)
    if not got["memory"]:
        assert got["files"] == ["k.json", "k.npy"]  # saved under its key once every view was filled
    assert got["peak"] <= budget_mb * MiB + MARGIN, (got["peak"] / MiB, got)

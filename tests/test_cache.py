"""The frozen-prefix cut: found from the model, verified, and trainable from stored activations."""

from __future__ import annotations

import _fixtures
import numpy as np
import pytest
import torch

from cnnft import models
from cnnft.training import cache, freeze

CASES = [("resnet18", 64), ("vgg11", 64), ("efficientnet_b0", 64), ("efficientnet_lite0", 64),
         ("mobilenet_v3_small", 64), ("googlenet", 64), ("densenet121", 64), ("swin_t", 64)]


def _planned(name: str, strategy: str):
    torch.manual_seed(0)
    bb = models.build(name, "none", 3)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, 0.01)
    freeze.apply_plan(bb.model, bb.stages, plan)
    return bb, plan


@pytest.mark.parametrize("strategy", ["head_only", "freeze_most", "freeze_early"])
@pytest.mark.parametrize("name, size", CASES)
def test_rest_of_the_cut_gives_the_models_logits_and_trains_only_trainable_stages(name, size, strategy):
    bb, plan = _planned(name, strategy)
    x = torch.randn(3, 3, size, size)
    split, why = cache.find_split(bb.model, x, models.logits_of)
    assert split is not None, why
    owner = models.param_stage_map(bb.model, bb.stages)
    prefix_params = {n for m in split.modules for n, _ in bb.model.get_submodule(m).named_parameters(prefix=m)}
    assert prefix_params, "the prefix holds the frozen layers"
    assert all(owner[n] in plan.frozen for n in prefix_params)  # nothing trainable is cut off
    bb.model.eval()
    with torch.no_grad():
        full = models.logits_of(bb.model(x))
        via = models.logits_of(split.rest(split.prefix(x)))
    assert torch.allclose(full, via, atol=1e-5)
    # a training step through the rest reaches the trainable parameters of the model itself
    split.rest.train()
    loss = models.logits_of(split.rest(split.prefix(x).detach())).sum()
    loss.backward()
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert any(bb.model.get_parameter(n).grad is not None for n in trainable)
    assert all(p.grad is None for n, p in bb.model.named_parameters() if n in prefix_params)


def test_full_training_has_no_cut():
    bb, _ = _planned("resnet18", "full")
    split, why = cache.find_split(bb.model, torch.randn(2, 3, 32, 32), models.logits_of)
    assert split is None and "no frozen prefix" in why


def test_a_cut_that_the_forward_pass_does_not_allow_is_refused():
    # torchvision's ViT reshapes its input before the first block: no module boundary to cut at
    bb, _ = _planned("vit_b_16", "head_only")
    split, why = cache.find_split(bb.model, torch.randn(1, 3, 224, 224), models.logits_of)
    assert split is None and "cannot start after" in why


def test_stored_activations_on_disk_and_in_memory_agree(tmp_path):
    bb, _ = _planned("resnet18", "freeze_most")
    x = torch.randn(10, 3, 32, 32)
    labels = list(range(10))
    split, _ = cache.find_split(bb.model, x[:2], models.logits_of)
    loaders = [[(x[:6], labels[:6]), (x[6:], labels[6:])]]
    mem = cache.compute(split, loaders, 10, lambda t: t)
    disk = cache.compute(split, loaders, 10, lambda t: t, disk=(tmp_path, "k"), in_memory=False)
    assert isinstance(disk.data, np.ndarray)  # a memory map
    assert (tmp_path / "k.npy").is_file() and (tmp_path / "k.json").is_file()
    idx = [7, 2, 9]
    assert torch.allclose(mem.batch(0, idx), disk.batch(0, idx), atol=1e-6)
    with torch.no_grad():
        bb.model.eval()
        assert torch.allclose(mem.batch(0, idx), split.prefix(x[idx]), atol=1e-5)
    again = cache.load_disk(tmp_path, "k", in_memory=True)
    assert torch.equal(again.batch(0, idx), disk.batch(0, idx))
    assert cache.load_disk(tmp_path, "other", in_memory=True) is None


def test_cache_key_changes_with_any_input(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    base = {"model": "resnet18", "boundary": "layer3", "files": cache.file_identity([str(f)])}
    k = cache.cache_key(base)
    assert cache.cache_key(dict(base)) == k
    assert cache.cache_key({**base, "boundary": "layer2"}) != k
    f.write_bytes(b"xy")  # the file changed
    assert cache.cache_key({**base, "files": cache.file_identity([str(f)])}) != k


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenet_v3_small"])
def test_frozen_batchnorm_is_merged_into_the_convolution_before_it(name):
    bb, _ = _planned(name, "head_only")
    _fixtures.random_batchnorm(bb.model)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    split, why = cache.find_split(bb.model, x, models.logits_of)
    assert split is not None and split.runner is not None, why
    in_prefix = [m for n, m in split.runner.named_modules()
                 if any(n == p or n.startswith(p + ".") for p in split.modules)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in in_prefix)  # every one merged
    unmerged = cache.Split(split.model, split.boundary, split.modules, split.rest)
    bb.model.train()
    with torch.no_grad():
        want, got = unmerged.prefix(x), split.prefix(x)
    assert torch.allclose(want, got, atol=1e-4 * float(want.abs().max()))
    # the model itself is untouched: its BatchNorm modules, values and training mode
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bb.model.modules()) > 0
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
    assert bb.model.training and bb.model.get_submodule(split.boundary).training


class _ConvUsedTwice(torch.nn.Module):
    """BN(conv(x)) + conv(x): the convolution's output is read beside its BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_merge_that_would_change_the_activation_is_not_used():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_ConvUsedTwice(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    _fixtures.random_batchnorm(model)
    for p in model[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    split, why = cache.find_split(model, x, models.logits_of)
    assert split is not None, why
    assert split.runner is None  # the merged prefix was checked against the model and refused
    model.eval()
    with torch.no_grad():
        assert torch.allclose(split.rest(split.prefix(x)), model(x), atol=1e-6)

"""The freeze strategies really freeze: one SGD step leaves frozen stages (weights and
BatchNorm statistics) bit-identical, trains the rest, and uses the planned learning rates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnft import models
from cnnft.errors import ConfigError
from cnnft.training import freeze, strategies

HEAD_LR = 1e-2
BACKBONE_LR = 1e-3
# name -> (input size, batch)
CASES = {"resnet18": (64, 4), "vgg11": (64, 4), "efficientnet_b0": (64, 4), "vit_b_16": (224, 2)}
HAS_BN = {"resnet18", "efficientnet_b0"}


def _bns(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
@pytest.mark.parametrize("name", list(CASES))
def test_one_step_follows_the_plan(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    size, batch = CASES[name]
    bb = models.build(name, "none", 3)
    m, stages = bb.model, bb.stages
    plan = freeze.make_plan(m, stages, strategy, lr=HEAD_LR, backbone_lr_scale=0.1, pretrained=True)
    pinned = freeze.apply_plan(m, stages, plan)
    opt = torch.optim.SGD(freeze.param_groups(m, stages, plan, weight_decay=0.0), momentum=0.9)

    owner = models.param_stage_map(m, stages)
    frozen = set(plan.frozen)
    trainable_stages = {s.name for s in plan.stages} - frozen
    params = dict(m.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    bns = _bns(m)
    bn_stage = {n: models.module_stage(n, stages) for n in bns}
    assert all(st is not None for st in bn_stage.values())
    bn_before = {
        n: (b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone()) for n, b in bns.items()
    }
    assert (len(bns) > 0) == (name in HAS_BN)
    # apply_plan pins exactly the BatchNorm layers of frozen stages
    assert {id(b) for b in pinned} == {id(b) for n, b in bns.items() if bn_stage[n] in frozen}

    m.train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 3, (batch,))
    loss = F.cross_entropy(models.logits_of(m(x)), y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()

    # parameters: frozen stages bit-identical, every trainable stage moved
    changed_by_stage: dict[str, int] = {}
    for n, p in params.items():
        st = owner[n]
        if st in frozen:
            assert not p.requires_grad, n
            assert p.grad is None, n
            assert torch.equal(p.detach(), before[n]), f"frozen {n} ({st}) changed"
        else:
            assert p.requires_grad, n
            if not torch.equal(p.detach(), before[n]):
                changed_by_stage[st] = changed_by_stage.get(st, 0) + 1
    assert set(changed_by_stage) == trainable_stages, (
        f"trainable stages without any updated tensor: {sorted(trainable_stages - set(changed_by_stage))}"
    )

    # BatchNorm running statistics: frozen stages pinned, trainable stages updated
    for n, b in bns.items():
        rm, rv, nbt = bn_before[n]
        if bn_stage[n] in frozen:
            assert not b.training, n
            assert torch.equal(b.running_mean, rm), n
            assert torch.equal(b.running_var, rv), n
            assert torch.equal(b.num_batches_tracked, nbt), n
        else:
            assert b.training, n
            assert int(b.num_batches_tracked) == int(nbt) + 1, n
            assert not (torch.equal(b.running_mean, rm) and torch.equal(b.running_var, rv)), n

    # optimizer groups: head at lr, pretrained backbone at lr x 0.1, frozen params nowhere
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == {id(p) for n, p in params.items() if owner[n] not in frozen}
    head_ids = {id(p) for n, p in params.items() if owner[n] == "head"}
    roles = set()
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if g["name"].startswith("head"):
            assert ids <= head_ids
            assert g["lr"] == pytest.approx(HEAD_LR)
        else:
            assert g["name"].startswith("backbone")
            assert not ids & head_ids
            assert g["lr"] == pytest.approx(BACKBONE_LR)
        assert g["weight_decay"] == 0.0
        roles.add(g["name"].split("_")[0])
    has_backbone = bool(trainable_stages - {"head"})
    assert roles == ({"head", "backbone"} if has_backbone else {"head"})
    for s in plan.stages:
        assert s.lr == (None if s.frozen else pytest.approx(HEAD_LR if s.name == "head" else BACKBONE_LR))


@pytest.mark.parametrize("strategy", ["full", "freeze_early", "freeze_most"])
@pytest.mark.parametrize("name", list(CASES))
def test_random_init_backbone_learns_at_head_lr(name: str, strategy: str) -> None:
    bb = models.build(name, "none", 3, on_meta=True)
    plan = freeze.make_plan(bb.model, bb.stages, strategy, lr=HEAD_LR, backbone_lr_scale=0.1, pretrained=False)
    assert plan.backbone_lr == plan.lr == HEAD_LR
    freeze.apply_plan(bb.model, bb.stages, plan)
    groups = freeze.param_groups(bb.model, bb.stages, plan, weight_decay=0.0)
    assert any(g["name"].startswith("backbone") for g in groups)
    assert all(g["lr"] == HEAD_LR for g in groups)
    assert all(s.lr == HEAD_LR for s in plan.stages if not s.frozen)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_b_16"])
def test_stage_count_limits(name: str) -> None:
    stages = models.build(name, "none", 3, on_meta=True).stages
    k = len(stages) - 2
    body = [s.name for s in stages[1:-1]]

    with pytest.raises(ConfigError) as ei:
        freeze.frozen_stage_names(stages, "freeze_early", frozen_stages=k)
    assert "freeze.frozen_stages" in str(ei.value)
    assert f"0..{k - 1}" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        freeze.frozen_stage_names(stages, "freeze_most", trainable_stages=k + 1)
    assert "freeze.trainable_stages" in str(ei.value)
    assert f"0..{k}" in str(ei.value)
    with pytest.raises(ConfigError, match="freeze.strategy"):
        freeze.frozen_stage_names(stages, "frozen")

    # the boundary values are accepted
    assert freeze.frozen_stage_names(stages, "freeze_early", frozen_stages=k - 1) == {"stem", *body[:-1]}
    assert freeze.frozen_stage_names(stages, "freeze_early", frozen_stages=0) == {"stem"}
    assert freeze.frozen_stage_names(stages, "freeze_most", trainable_stages=k) == {"stem"}
    assert freeze.frozen_stage_names(stages, "freeze_most", trainable_stages=0) == {"stem", *body}


@pytest.mark.parametrize("strategy", ["head_only", "freeze_most"])
@pytest.mark.parametrize("source", ["timm/resnet18", "efficientnet_lite0", "file"])
def test_frozen_batchnorm_is_pinned_for_every_source(tmp_path, source, strategy):
    """BatchNorm ownership by parameters holds where stage prefixes name parameters (timm, the
    packaged Lite weights) as well as modules (torchvision, and a local weights file)."""
    torch.manual_seed(0)
    if source == "file":
        path = tmp_path / "w.pth"
        torch.save(models.build("resnet18", "none", 5).model.state_dict(), path)
        bb = models.build("resnet18", str(path), 3)
    else:
        bb = models.build(source, "none", 3)
    m, stages = bb.model, bb.stages
    plan = freeze.make_plan(m, stages, strategy, lr=HEAD_LR, pretrained=True)
    pinned = freeze.apply_plan(m, stages, plan)
    owner = models.param_stage_map(m, stages)
    bns = _bns(m)
    frozen_bns = {n for n, b in bns.items() if owner[f"{n}.weight"] in plan.frozen}
    assert frozen_bns and {id(bns[n]) for n in frozen_bns} == {id(b) for b in pinned}
    before = {n: [t.clone() for t in (bns[n].running_mean, bns[n].running_var, bns[n].num_batches_tracked)]
              for n in bns}
    opt = torch.optim.SGD(freeze.param_groups(m, stages, plan, weight_decay=0.0), lr=0.1)
    m.train()
    for _ in range(2):  # an "epoch" of two steps in training mode
        loss = F.cross_entropy(models.logits_of(m(torch.randn(4, 3, 64, 64))), torch.randint(0, 3, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, b in bns.items():
        same = all(torch.equal(x, y) for x, y in zip(before[n], (b.running_mean, b.running_var, b.num_batches_tracked)))
        assert same == (n in frozen_bns), n


@pytest.mark.parametrize("batchnorm", ["eval", "train"])
def test_batchnorm_of_trainable_stages_follows_the_plan(batchnorm):
    """freeze.batchnorm eval keeps the pretrained statistics of the stages that train (their
    scale and shift still learn); train lets them follow the batches."""
    torch.manual_seed(0)
    bb = models.build("resnet18", "none", 3)
    m, stages = bb.model, bb.stages
    plan = freeze.make_plan(m, stages, "freeze_most", lr=HEAD_LR, pretrained=True, trainable_stages=2,
                            batchnorm=batchnorm)
    assert plan.to_dict()["batchnorm"] == batchnorm
    pinned = freeze.apply_plan(m, stages, plan)
    owner = models.param_stage_map(m, stages)
    bns = _bns(m)
    trainable = {n for n in bns if owner[f"{n}.weight"] not in plan.frozen}
    assert trainable and ({id(bns[n]) for n in trainable} <= {id(b) for b in pinned}) == (batchnorm == "eval")
    stats = {n: bns[n].running_mean.clone() for n in trainable}
    scale = {n: bns[n].weight.detach().clone() for n in trainable}
    opt = torch.optim.SGD(freeze.param_groups(m, stages, plan, weight_decay=0.0), lr=0.1)
    m.train()
    loss = F.cross_entropy(models.logits_of(m(torch.randn(4, 3, 64, 64))), torch.randint(0, 3, (4,)))
    loss.backward()
    opt.step()
    for n in trainable:
        assert torch.equal(stats[n], bns[n].running_mean) == (batchnorm == "eval"), n
        assert not torch.equal(scale[n], bns[n].weight), n  # the affine parameters learn either way


def test_batchnorm_auto_keeps_statistics_for_small_pretrained_data():
    assert strategies.resolve_batchnorm("auto", "small", pretrained=True) == "eval"
    assert strategies.resolve_batchnorm("auto", "large", pretrained=True) == "train"
    assert strategies.resolve_batchnorm("auto", "small", pretrained=False) == "train"
    assert strategies.resolve_batchnorm("train", "small", pretrained=True) == "train"

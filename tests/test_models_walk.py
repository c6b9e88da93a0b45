"""Every torchvision backbone: new head, a complete stage map, the four freeze plans, and a
real forward pass; plus LeNet-5, timm backbones and the backbone/weights error paths."""

from __future__ import annotations

import re
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnft import models
from cnnft.errors import ConfigError, WeightsUnavailableError
from cnnft.training import freeze, strategies

NUM_CLASSES = 7
MAX_FORWARD_PARAMS = 100_000_000
TV_NAMES = models.torchvision_names()


def _meta(name: str) -> models.Backbone:
    return models.build(name, "none", NUM_CLASSES, on_meta=True)


def _small_names() -> list[str]:
    """Torchvision models under 100M parameters (counted on the meta device: no memory)."""
    return [n for n in TV_NAMES if models.count_params(_meta(n).model) < MAX_FORWARD_PARAMS]


SMALL_NAMES = _small_names()


def _head_width(m: nn.Module) -> int:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    assert isinstance(m, nn.Linear), f"head is a {type(m).__name__}"
    return m.out_features


def _body(stages: list[models.Stage]) -> list[str]:
    return [s.name for s in stages[1:-1]]


def test_walk_covers_the_known_families() -> None:
    # a guard against torchvision_names() silently returning (almost) nothing
    assert len(TV_NAMES) >= 60
    for n in ("resnet18", "vgg11", "vit_b_16", "efficientnet_b0", "googlenet", "inception_v3", "maxvit_t"):
        assert n in TV_NAMES
    assert 0 < len(SMALL_NAMES) < len(TV_NAMES)


@pytest.mark.parametrize("name", TV_NAMES)
def test_meta_heads_stages_and_plans(name: str) -> None:
    bb = _meta(name)
    model = bb.model
    assert all(p.device.type == "meta" for p in model.parameters())
    fam = models.family_of(model)
    assert fam is not None, f"{name}: no FAMILIES entry for {type(model).__name__}"

    # every present head now has NUM_CLASSES outputs; the main head must be present
    present = 0
    for i, path in enumerate(fam.heads):
        try:
            head = model.get_submodule(path)
        except AttributeError:
            assert i > 0, f"{name}: main head {path} missing"
            continue
        assert _head_width(head) == NUM_CLASSES, f"{name}: {path}"
        present += 1
    assert present >= 1
    assert bb.num_classes == NUM_CLASSES
    assert bb.in_features > 0

    # stage names: stem, stage1..stageK, head (K >= 2), and every parameter is in one
    names = [s.name for s in bb.stages]
    k = len(names) - 2
    assert k >= 2, f"{name}: {names}"
    assert names == ["stem", *(f"stage{i}" for i in range(1, k + 1)), "head"]
    owner = models.param_stage_map(model, bb.stages)
    assert set(owner) == {n for n, _ in model.named_parameters()}
    assert set(owner.values()) <= set(names)
    for st in bb.stages:  # no empty stage: each holds parameters
        assert st.name in owner.values(), f"{name}: stage {st.name} has no parameters"
    for path in fam.heads:  # the head layers are in the head stage
        if any(p.startswith(path + ".") for p in owner):
            assert all(owner[p] == "head" for p in owner if p.startswith(path + "."))

    total = models.count_params(model)
    body = _body(bb.stages)
    expected_frozen = {
        "full": set(),
        "head_only": {"stem", *body},
        "freeze_early": {"stem", *body[: k // 2]},
        "freeze_most": {"stem", *body[: k - 1]},
    }
    assert set(expected_frozen) == set(strategies.STRATEGIES)
    for strategy in strategies.STRATEGIES:
        plan = freeze.make_plan(model, bb.stages, strategy, lr=1e-3)
        assert plan.strategy == strategy
        assert [s.name for s in plan.stages] == names
        assert set(plan.frozen) == expected_frozen[strategy], f"{name} {strategy}"
        assert "head" not in plan.frozen
        assert plan.total_params == total
        trainable = sum(p.numel() for n, p in model.named_parameters() if owner[n] not in expected_frozen[strategy])
        assert plan.trainable_params == trainable
        for s in plan.stages:
            assert (s.lr is None) == s.frozen


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_NAMES)
def test_real_forward_small_input(name: str) -> None:
    torch.manual_seed(0)
    bb = models.build(name, "none", NUM_CLASSES)
    model = bb.model.eval()
    assert not bb.pretrained
    size = max(models.min_input(model), 64)
    with torch.inference_mode():
        out = models.logits_of(model(torch.randn(2, 3, size, size)))
    assert out.shape == (2, NUM_CLASSES), f"{name} at {size}px"
    assert torch.isfinite(out).all()


def test_lenet5_forward() -> None:
    bb = models.build("lenet5", "none", 4)
    assert [s.name for s in bb.stages] == ["stem", "stage1", "stage2", "head"]
    models.param_stage_map(bb.model, bb.stages)
    with torch.inference_mode():
        out = bb.model.eval()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()


def _check_timm_stages(bb: models.Backbone) -> list[str]:
    names = [s.name for s in bb.stages]
    k = len(names) - 2
    assert k >= 2
    assert names == ["stem", *(f"stage{i}" for i in range(1, k + 1)), "head"]
    owner = models.param_stage_map(bb.model, bb.stages)
    assert set(owner) == {n for n, _ in bb.model.named_parameters()}
    assert set(owner.values()) == set(names)  # no empty stage
    return names


def test_timm_resnet18() -> None:
    bb = models.build("timm/resnet18", "none", 5)
    names = _check_timm_stages(bb)
    assert names == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    owner = models.param_stage_map(bb.model, bb.stages)
    assert owner["fc.weight"] == "head" and owner["conv1.weight"] == "stem"
    assert all(owner[n] == "stage4" for n in owner if n.startswith("layer4."))
    assert bb.model.fc.out_features == 5 and bb.in_features == 512
    with torch.inference_mode():
        out = bb.model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_timm_vit_blocks_merged_into_four_stages() -> None:
    bb = models.build("timm/vit_tiny_patch16_224", "none", 5)
    names = _check_timm_stages(bb)
    assert names == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    owner = models.param_stage_map(bb.model, bb.stages)
    assert owner["head.weight"] == "head"
    assert owner["patch_embed.proj.weight"] == "stem"
    # 12 blocks -> 4 contiguous stages of 3
    block_stage = {}
    for n, st in owner.items():
        m = re.match(r"blocks\.(\d+)\.", n)
        if m:
            block_stage.setdefault(int(m.group(1)), set()).add(st)
    assert sorted(block_stage) == list(range(12))
    assert all(len(v) == 1 for v in block_stage.values())
    assert [block_stage[i].pop() for i in range(12)] == [f"stage{1 + i // 3}" for i in range(12)]
    assert bb.model.head.out_features == 5
    with torch.inference_mode():
        out = bb.model.eval()(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_unknown_backbone_suggests() -> None:
    with pytest.raises(ConfigError) as ei:
        models.build("resnet19", "none", 3)
    assert "resnet18" in str(ei.value)
    assert "model.backbone" in str(ei.value)


def test_unknown_weights_name_lists_available() -> None:
    with pytest.raises(ConfigError) as ei:
        models.build("resnet18", "IMAGENET1K_V9", 3)
    assert "IMAGENET1K_V1" in str(ei.value)
    assert "model.weights" in str(ei.value)


def _resnet18_cached(hub_dir: str) -> bool:
    return any((Path(hub_dir) / "checkpoints").glob("resnet18-*"))


def test_default_weights_offline_is_a_clear_error(monkeypatch, tmp_path) -> None:
    """Real offline attempt (this machine has no network): a WeightsUnavailableError that
    says where to put the file, quickly."""
    if _resnet18_cached(torch.hub.get_dir()):
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as ei:
        models.build("resnet18", "DEFAULT", 3)
    elapsed = time.monotonic() - t0
    text = str(ei.value)
    assert "checkpoints/resnet18-" in text
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in text
    assert "model.weights=none" in text
    assert elapsed < 30, f"offline failure took {elapsed:.1f}s"


def test_default_weights_download_failure_is_mapped(monkeypatch, tmp_path) -> None:
    """Same mapping with the network failure forced (valid on a machine with network too)."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(WeightsUnavailableError) as ei:
        models.build("resnet18", "DEFAULT", 3)
    assert str(hub / "checkpoints" / "resnet18-") in str(ei.value)
    assert ei.value.exit_code == 2


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "no-suffix"])
def test_local_weights_file_loads_backbone_strictly_and_replaces_head(fmt, tmp_path, monkeypatch) -> None:
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000).state_dict()  # an ImageNet-shaped file
    name = {"pth": "w.pth", "safetensors": "w.safetensors", "no-suffix": "resnet18-finetuned"}[fmt]
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(source, tmp_path / name)
    else:
        torch.save(source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    bb = models.build("resnet18", name, NUM_CLASSES)  # a bare file name in the working folder
    assert bb.pretrained
    got = bb.model.state_dict()
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key
    assert got["fc.weight"].shape == (NUM_CLASSES, 512)


def test_timm_model_without_layer_groups_is_a_config_error() -> None:
    class Plain(nn.Module):  # a timm-style model that does not describe its layer groups
        pretrained_cfg = {"classifier": "head"}

        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    with pytest.raises(ConfigError, match="no group_matcher"):
        models.sources.timm_stages(Plain())


def test_timm_default_weights_unreachable_fail_at_once(monkeypatch, tmp_path) -> None:
    """No minute of download retries: uncached and unreachable weights are refused before timm
    tries, and the hint names the file to fetch and how to pass it."""
    import socket

    import timm

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))

    def unreachable(address, *a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    real_create = timm.create_model

    def create(name, pretrained=False, **kw):
        assert not pretrained, "timm must not be asked to download"
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(WeightsUnavailableError) as ei:
        models.build("timm/resnet18", "DEFAULT", 3)
    err = ei.value
    assert "huggingface.co cannot be reached (Name or service not known)" in err.message
    assert "timm/resnet18.a1_in1k/resolve/main/model.safetensors" in err.hint
    assert "model.weights=path/to/model.safetensors" in err.hint and err.exit_code == 2


def test_timm_weights_file_as_the_hint_says(tmp_path) -> None:
    """The offline route the hint gives: the downloaded file passed as model.weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(source, tmp_path / "model.safetensors")
    bb = models.build("timm/resnet18", str(tmp_path / "model.safetensors"), NUM_CLASSES)
    got = bb.model.state_dict()
    assert bb.pretrained and got["fc.weight"].shape == (NUM_CLASSES, 512)
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_NAMES)
def test_stage_order_follows_the_forward_pass(name: str) -> None:
    """Stages are listed in the order the forward pass runs them: the spatial size of their
    outputs never grows from one stage to the next (4-d feature maps; tokens are skipped)."""
    torch.manual_seed(0)
    bb = models.build(name, "none", NUM_CLASSES)
    model = bb.model.eval()
    size = max(models.min_input(model), 64)
    body = [s for s in bb.stages if s.name != "head"]
    modules = {k: v for k, v in models.stage_modules(model, bb.stages).items() if k != "head"}
    with models.last_stage_outputs(model, modules) as latest, torch.inference_mode():
        model(torch.randn(1, 3, size, size))
        outputs = [latest.get(s.name) for s in body]
    sides = [o.shape[-1] * o.shape[-2] for o in outputs if o is not None and o.dim() == 4]
    assert len(outputs) == len(body) and all(o is not None for o in outputs), name
    assert sides == sorted(sides, reverse=True), f"{name}: stage output areas {sides}"

"""Device choice, mixed-precision policy and the grad-scaler step (decisions tested on a CPU by
pretending to be a CUDA machine where the decision only reads torch's capability queries)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnft.errors import InputError
from cnnft.training import engine, runtime


@pytest.fixture
def fake_cuda(monkeypatch):
    def set_(available: bool, count: int = 1, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return set_


def test_auto_picks_cuda_when_present_else_cpu(fake_cuda, monkeypatch):
    fake_cuda(True)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    fake_cuda(False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("spec, cuda, count, fragment", [
    ("cuda", False, 0, "CUDA is not available"),
    ("cuda:1", True, 1, "has 1 CUDA device(s)"),
    ("mps", False, 0, "Apple MPS is not available"),
])
def test_unavailable_devices_are_input_errors(fake_cuda, monkeypatch, spec, cuda, count, fragment):
    fake_cuda(cuda, count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="train.device: " + spec) as info:
        runtime.resolve_device(spec)
    assert fragment in info.value.message and info.value.hint


def test_mixed_precision_only_on_cuda(fake_cuda):
    fake_cuda(True, bf16=True)
    assert runtime.amp_settings(torch.device("cpu"), True) == (None, False)  # never on a CPU
    assert runtime.amp_settings(torch.device("cuda"), False) == (None, False)
    assert runtime.amp_settings(torch.device("cuda"), True) == (torch.bfloat16, False)
    fake_cuda(True, bf16=False)  # e.g. a T4 or V100: fp16 needs a loss scaler
    assert runtime.amp_settings(torch.device("cuda"), True) == (torch.float16, True)


def _one_epoch(scaler, grad_clip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    r = engine.train_one_epoch(model, batches, opt, None, nn.CrossEntropyLoss(), runtime.Runtime(torch.device("cpu")),
                               epoch=1, scaler=scaler, grad_clip=grad_clip)
    return model.state_dict(), r


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_scaler_step_matches_the_plain_step(grad_clip):
    """The fp16 path scales the loss, unscales before clipping and steps through the scaler: the
    update must equal the plain fp32 one (no overflow here, so no step is skipped)."""
    plain, r_plain = _one_epoch(None, grad_clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled, r_scaled = _one_epoch(scaler, grad_clip)
    assert r_scaled.steps == r_plain.steps == 5
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0 ** 10  # no inf/nan met, no growth yet (growth_interval 2000)


def test_cosine_schedule_with_warmup():
    f = engine.cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    after = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:])), "decays monotonically after warmup"
    assert engine.cosine_with_warmup(50, 0)(0) == 1.0


def test_sgd_smoothing_clipping_and_warmup_in_a_run(tmp_path, tiny_data):
    """The optimisation options reach the run: SGD with momentum, weight decay only where it
    belongs, warmup then cosine in the logged learning rates."""
    import csv

    import yaml

    from cnnft.recipes import train as train_recipe
    from cnnft.run import checkpoint

    cfg = {"name": "opt", "output_dir": str(tmp_path / "runs"), "seed": 0,
           "data": {"train": str(tiny_data), "val_split": 0.34, "image_size": 32, "batch_size": 4,
                    "num_workers": 0, "augment": "none"},
           "model": {"backbone": "resnet18", "weights": "none"}, "freeze": {"strategy": "full"},
           "train": {"epochs": 4, "lr": 0.02, "optimizer": "sgd", "momentum": 0.8, "weight_decay": 0.001,
                     "label_smoothing": 0.1, "grad_clip": 1.0, "warmup_epochs": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = train_recipe.train(tmp_path / "cfg.yaml", [], log=lambda m: None).run_dir
    ck = checkpoint.load(f"{run}/checkpoints/last.pt")
    groups = ck["optimizer"]["param_groups"]
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in groups)
    assert sorted((g["name"], g["weight_decay"]) for g in groups) == [
        ("backbone", 0.001), ("backbone_no_decay", 0.0), ("head", 0.001), ("head_no_decay", 0.0)]
    by_name = {g["name"]: g for g in groups}
    assert len(by_name["head"]["params"]) == len(by_name["head_no_decay"]["params"]) == 1  # fc.weight / fc.bias
    # random init: nothing pretrained to protect, so the backbone learns at the head's rate
    assert by_name["backbone"]["initial_lr"] == by_name["head"]["initial_lr"] == 0.02
    assert any("momentum_buffer" in s for s in ck["optimizer"]["state"].values())
    with open(f"{run}/metrics.csv") as f:
        lrs = [float(r["lr_head"]) for r in csv.DictReader(f)]
    # 8 train images / batch 4 = 2 steps an epoch; each row holds the rate of its epoch's first
    # step: warmup (step 0: half the rate), then the cosine from the full rate over steps 2..8
    assert lrs == pytest.approx([0.01, 0.02, 0.015, 0.005])
    # label smoothing shapes the training loss only: the logged val loss is plain cross-entropy,
    # the figure `cnnft evaluate` gives for the same checkpoint
    from cnnft.recipes import evaluate

    res = evaluate.evaluate(run, device="cpu", log=lambda m: None).to_dict()
    with open(f"{run}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_acc"]))  # first of equals, as best.pt
    assert res["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-5)


def test_label_smoothing_and_grad_clip_reach_the_loss_and_the_step(tmp_path, tiny_data, monkeypatch):
    """train.label_smoothing is the training criterion's; train.grad_clip bounds each step's
    gradient norm before the optimizer steps."""
    from cnnft.recipes import train as train_recipe
    from cnnft.training import engine as engine_mod

    clipped, losses = [], []
    real_clip = nn.utils.clip_grad_norm_
    monkeypatch.setattr(engine_mod.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, **kw: clipped.append(max_norm) or real_clip(params, max_norm, **kw))
    real_forward = nn.CrossEntropyLoss.forward
    monkeypatch.setattr(nn.CrossEntropyLoss, "forward",
                        lambda self, x, y: losses.append(self.label_smoothing) or real_forward(self, x, y))
    train_recipe.train(None, [f"data.train={tiny_data}", "data.val_split=0.34", "model.backbone=resnet18",
                              "model.weights=none", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                              "train.epochs=1", "train.label_smoothing=0.2", "train.grad_clip=0.5",
                              f"output_dir={tmp_path / 'runs'}", f"train.cache_dir={tmp_path / 'cache'}"],
                       log=lambda m: None)
    assert clipped and set(clipped) == {0.5}
    assert 0.2 in losses  # the training loss; validation stays plain cross-entropy (0.0)


def test_grad_clip_bounds_the_update():
    torch.manual_seed(0)
    rt = runtime.make_runtime("cpu", amp=False, channels_last=False)
    for clip, bounded in ((0.1, True), (None, False)):
        model = nn.Linear(4, 2)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        batch = [(torch.randn(8, 4) * 100, torch.randint(0, 2, (8,)))]
        engine.train_one_epoch(model, batch, opt, None, nn.CrossEntropyLoss(), rt, epoch=1, grad_clip=clip)
        step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
        assert (float(step) <= 0.1 + 1e-5) == bounded, (clip, float(step))


def test_time_waiting_for_the_loader_is_counted_apart():
    import time

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def slow_batches():
        for _ in range(4):
            time.sleep(0.05)  # a loader still decoding
            yield torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))

    r = engine.train_one_epoch(model, slow_batches(), opt, None, nn.CrossEntropyLoss(),
                               runtime.Runtime(torch.device("cpu")), epoch=1)
    assert r.steps == 4 and 0.2 <= r.data_seconds <= r.seconds
    # resumed sums from a checkpoint written before the field existed start it at 0
    old = {k: v for k, v in engine.Running(1.0, 1, 8, 1, 0.5).__dict__.items() if k != "data_seconds"}
    assert engine.Running(**old).data_seconds == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_cpu_optimizers_take_the_fused_update(name):
    from cnnft.config import TrainConfig

    model = nn.Linear(4, 2)
    opt = engine.build_optimizer([{"params": list(model.parameters())}], TrainConfig(optimizer=name))
    assert opt.defaults.get("fused") is True

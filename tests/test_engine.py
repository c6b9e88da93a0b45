"""Device choice, mixed-precision policy and the grad-scaler step (decisions tested on a CPU by
pretending to be a CUDA machine where the decision only reads torch's capability queries)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnft import engine
from cnnft.errors import InputError


@pytest.fixture
def fake_cuda(monkeypatch):
    def set_(available: bool, count: int = 1, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return set_


def test_auto_picks_cuda_when_present_else_cpu(fake_cuda, monkeypatch):
    fake_cuda(True)
    assert engine.resolve_device("auto") == torch.device("cuda")
    fake_cuda(False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert engine.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert engine.resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("spec, cuda, count, fragment", [
    ("cuda", False, 0, "CUDA is not available"),
    ("cuda:1", True, 1, "has 1 CUDA device(s)"),
    ("mps", False, 0, "Apple MPS is not available"),
])
def test_unavailable_devices_are_input_errors(fake_cuda, monkeypatch, spec, cuda, count, fragment):
    fake_cuda(cuda, count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="train.device: " + spec) as info:
        engine.resolve_device(spec)
    assert fragment in info.value.message and info.value.hint


def test_mixed_precision_only_on_cuda(fake_cuda):
    fake_cuda(True, bf16=True)
    assert engine.amp_settings(torch.device("cpu"), True) == (None, False)  # never on a CPU
    assert engine.amp_settings(torch.device("cuda"), False) == (None, False)
    assert engine.amp_settings(torch.device("cuda"), True) == (torch.bfloat16, False)
    fake_cuda(True, bf16=False)  # e.g. a T4 or V100: fp16 needs a loss scaler
    assert engine.amp_settings(torch.device("cuda"), True) == (torch.float16, True)


def _one_epoch(scaler, grad_clip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    r = engine.train_one_epoch(model, batches, opt, None, nn.CrossEntropyLoss(), torch.device("cpu"),
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

"""BatchNorm merged into the convolution before it where nothing learns: same outputs, fewer layers."""

from __future__ import annotations

from pathlib import Path

import _fixtures
import pytest
import torch

from cnnft import models
from cnnft.training import fold


def _batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenet_v3_small", "densenet121"])
def test_inference_model_gives_the_same_logits_with_batchnorm_merged(name):
    torch.manual_seed(0)
    model = models.build(name, "none", 3).model.eval()
    _fixtures.random_batchnorm(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    fast = fold.for_inference(model, x, models.logits_of)
    assert fast is not model and _batchnorms(fast) < _batchnorms(model)
    other = torch.randn(4, 3, 64, 64)  # not the sample the merge was checked on
    with torch.no_grad():
        want, got = models.logits_of(model(other)), models.logits_of(fast(other))
    assert torch.allclose(want, got, atol=1e-4 * float(want.abs().max()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is as it was
    assert _batchnorms(model) == sum(1 for k in before if k.endswith("running_var"))


def test_a_network_without_conv_batchnorm_pairs_is_returned_as_it_is():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert fold.for_inference(model, torch.randn(2, 3, 8, 8)) is model


def test_a_checkpoint_evaluates_and_predicts_with_the_merged_model(tmp_path, tiny_data):
    from cnnft.data import folders, transforms
    from cnnft.recipes import predict
    from cnnft.recipes import train as train_recipe
    from cnnft.run import checkpoint

    run = Path(train_recipe.train(None, [f"data.train={tiny_data}", "data.image_size=32", "data.num_workers=0",
                                         "model.backbone=resnet18", "model.weights=none", "train.epochs=1",
                                         "train.device=cpu", f"output_dir={tmp_path / 'runs'}"],
                                  log=lambda m: None).run_dir)
    lm = checkpoint.load_model(run)
    trained = lm.model
    fast, _ = lm.inference("cpu")
    assert _batchnorms(trained) == 20 and _batchnorms(fast) == 0 and lm.model is trained
    images = sorted(p for p in tiny_data.rglob("*") if p.is_file())[:4]
    x = torch.stack([transforms.eval_transform(lm.preprocess)(folders.open_image(p)) for p in images])
    with torch.no_grad():
        assert torch.allclose(trained(x), fast(x), atol=1e-4)
    # the commands on top give the unmerged model's answers
    res = predict.predict(run, images, device="cpu", log=lambda m: None, uncalibrated=True)  # raw softmax, as below
    with torch.no_grad():
        probs = torch.softmax(trained(x), 1)
    for row, p in zip(res.predictions, probs):
        assert row["prob"] == pytest.approx(float(p.max()), abs=1e-4)


def test_pairs_are_found_from_the_data_flow_not_from_reused_ids():
    """DenseNet: a BatchNorm after each convolution (norm0, norm2) and after each concatenation
    (norm1, transitions, norm5): only the first kind are pairs. Many tensors are freed during
    the pass, and a new one may take a freed one's id: an id alone would pair wrongly."""
    model = models.build("densenet121", "none", 3).model.eval()
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):  # the pairs are the same however the allocator reuses memory
        pairs = fold.conv_bn_pairs(model, lambda m: m(x), frozen_only=False)
        assert len(pairs) == 1 + 58 and {b.rsplit(".", 1)[1] for _, b in pairs} == {"norm0", "norm2"}
        assert all(c.rsplit(".", 1)[1] in ("conv0", "conv1") for c, _ in pairs)
        garbage = [torch.randn(2, 64, 16, 16) for _ in range(50)]
        del garbage

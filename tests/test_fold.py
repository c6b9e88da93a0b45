"""BatchNorm merged into the convolution before it where nothing learns: same outputs, fewer layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnft import fold, models


def _random_batchnorm(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)


def _batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "mobilenet_v3_small", "densenet121"])
def test_inference_model_gives_the_same_logits_with_batchnorm_merged(name):
    torch.manual_seed(0)
    model = models.build(name, "none", 3).model.eval()
    _random_batchnorm(model)
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
    from cnnft import checkpoint
    from cnnft.recipes import evaluate, predict
    from cnnft.recipes import train as train_recipe

    run = Path(train_recipe.train(None, [f"data.train={tiny_data}", "data.image_size=32", "data.num_workers=0",
                                         "model.backbone=resnet18", "model.weights=none", "train.epochs=1",
                                         "train.device=cpu", f"output_dir={tmp_path / 'runs'}"],
                                  log=lambda m: None).run_dir)
    lm = checkpoint.load_model(run)
    trained = lm.model
    fast, _ = lm.inference("cpu")
    assert _batchnorms(trained) == 20 and _batchnorms(fast) == 0 and lm.model is trained
    images = sorted(p for p in tiny_data.rglob("*") if p.is_file())[:4]
    x = torch.stack([evaluate.transforms.eval_transform(lm.preprocess)(evaluate.data.open_image(p)) for p in images])
    with torch.no_grad():
        assert torch.allclose(trained(x), fast(x), atol=1e-4)
    # the commands on top give the unmerged model's answers
    res = predict.predict(run, images, device="cpu", log=lambda m: None)
    with torch.no_grad():
        probs = torch.softmax(trained(x), 1)
    for row, p in zip(res.predictions, probs):
        assert row["prob"] == pytest.approx(float(p.max()), abs=1e-4)

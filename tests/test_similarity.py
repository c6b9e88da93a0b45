"""Measured similarity to ImageNet: per-stage features, the decision rule on probe curves,
`cnnft freeze-plan --data`, `freeze.similar: auto` in training, and the real answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from typer.testing import CliRunner

from cnnft import models
from cnnft import cli
from cnnft.errors import DataError
from cnnft.recipes import freeze_plan as plan_recipe
from cnnft.recipes import inspect as inspect_recipe
from cnnft.recipes import train as train_recipe
from cnnft.training import similarity, strategies
from cnnft.training.strategies import StageProbe

runner = CliRunner()


def _curve(*points: tuple[float, float]) -> list[StageProbe]:
    names = ["stem"] + [f"stage{i}" for i in range(1, len(points))]
    return [StageProbe(n, 8, m, s, 0.0) for n, (m, s) in zip(names, points)]


# ------------------------------------------------------------------------ the decision rule

def test_a_monotone_curve_is_similar():
    d = strategies.decide(_curve((0.5, 0.02), (0.6, 0.02), (0.7, 0.02), (0.8, 0.02), (0.9, 0.02)), "small")
    assert (d.similar, d.strategy, d.trainable_stages, d.peak) == (True, "head_only", 0, "stage4")
    assert d.frozen_stages == ["stem", "stage1", "stage2", "stage3", "stage4"]
    d = strategies.decide(_curve((0.5, 0.02), (0.6, 0.02), (0.7, 0.02), (0.8, 0.02), (0.9, 0.02)), "large")
    assert (d.similar, d.strategy, d.frozen_stages, d.trainable_stages) == (True, "freeze_early",
                                                                            ["stem", "stage1", "stage2"], 2)


def test_a_peak_at_a_middle_stage_trains_from_the_first_stage_beyond_the_stem():
    # the curve rises from stage1 on: only the stem's generic features stay frozen
    d = strategies.decide(_curve((0.5, 0.01), (0.7, 0.01), (0.9, 0.01), (0.8, 0.01), (0.7, 0.01)), "small")
    assert (d.similar, d.strategy, d.peak, d.trainable_stages) == (False, "freeze_most", "stage2", 4)
    assert d.frozen_stages == ["stem"]
    # stages no better than the stem (within the margin) are generic too and stay frozen
    d = strategies.decide(_curve((0.7, 0.01), (0.68, 0.01), (0.71, 0.01), (0.9, 0.01), (0.8, 0.01)), "small")
    assert (d.peak, d.frozen_stages, d.trainable_stages) == ("stage3", ["stem", "stage1", "stage2"], 2)
    assert "from stage3 on adapt" in d.reason
    assert strategies.decide(_curve((0.5, 0.01), (0.9, 0.01), (0.7, 0.01)), "large").strategy == "full"


def test_a_peak_at_the_stem_trains_everything():
    d = strategies.decide(_curve((0.9, 0.01), (0.8, 0.01), (0.7, 0.01), (0.6, 0.01)), "small")
    assert (d.similar, d.strategy, d.peak, d.frozen_stages, d.trainable_stages) == (False, "full", "stem", [], 3)


def test_noisy_ties_are_similar():
    d = strategies.decide(_curve((0.6, 0.05), (0.8, 0.05), (0.92, 0.04), (0.9, 0.05)), "small")
    assert d.similar and d.strategy == "head_only"  # 0.02 below the best: within the deepest's spread
    d = strategies.decide(_curve((0.6, 0.01), (0.8, 0.01), (0.915, 0.01), (0.9, 0.01)), "small")
    assert d.similar  # within the tolerance
    assert not strategies.decide(_curve((0.6, 0.01), (0.8, 0.01), (0.95, 0.01), (0.9, 0.01)), "small").similar


def test_a_decision_survives_its_json_form():
    d = strategies.decide(_curve((0.5, 0.01), (0.9, 0.01), (0.7, 0.01)), "small")
    assert strategies.Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d


# ------------------------------------------------------------------ features at stage outputs

def _tiny_source(tmp_path: Path, per_class: int = 4, size: int = 40):
    from cnnft.data import folders as data
    from cnnft.data import samples

    classes, paths, labels = samples.scan_folder(make_image_folder(tmp_path / "d", per_class=per_class, size=size), "d")
    return data._folder_source(paths, labels)


@pytest.mark.parametrize("name,size,widths", [
    ("resnet18", 64, [64, 64, 128, 256, 512]),
    ("efficientnet_lite0", 64, [32, 16, 24, 40, 80, 112, 192, 1280]),
])
def test_stage_features_are_the_stage_outputs(tmp_path, name, size, widths):
    bb = models.build(name, "none", 2)
    pre = bb.preprocess.with_size(size)
    feats, labels = similarity.stage_features(bb.model, bb.stages, _tiny_source(tmp_path), pre, torch.device("cpu"),
                                              batch_size=3)
    assert list(feats) == [s.name for s in bb.stages if s.name != "head"]
    assert [f.shape for f in feats.values()] == [(8, w) for w in widths]
    shown = inspect_recipe.inspect_model(name, image_size=size)["stages"]  # traced apart, on the meta device
    assert [r["output_shape"][1] for r in shown if r["name"] != "head"] == widths
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4


def test_the_pooled_features_are_the_mean_of_the_stage_output(tmp_path):
    bb = models.build("lenet5", "none", 2)
    src = _tiny_source(tmp_path, per_class=2)
    feats, _ = similarity.stage_features(bb.model, bb.stages, src, bb.preprocess, torch.device("cpu"), batch_size=4)
    from cnnft.data import transforms

    x = torch.stack([transforms.eval_transform(bb.preprocess)(src.load(i)) for i in range(len(src))])
    with torch.no_grad():
        conv2 = bb.model.conv2(bb.model.conv1(x))
    assert np.allclose(feats["stage1"], conv2.mean((2, 3)).numpy(), atol=1e-5)


def test_the_sample_is_bounded_stratified_and_seeded():
    labels = [0] * 30 + [1] * 5 + [2] * 12
    idx = similarity.sample_indices(labels, 10, seed=3)
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [10, 5, 10]
    assert idx == similarity.sample_indices(labels, 10, seed=3) != similarity.sample_indices(labels, 10, seed=4)


# ------------------------------------------------------------------------------ the command

@pytest.mark.parametrize("model", ["lenet5", "resnet18"])
def test_freeze_plan_data_json(tmp_path, model):
    root = make_image_folder(tmp_path / "pets" / "train", per_class=6, size=40).parent
    res = runner.invoke(cli.app, ["freeze-plan", "--data", str(root), "--model", model, "--weights", "none",
                                  "--image-size", "40", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {"similar", "size", "strategy", "frozen_stages", "trainable_stages", "stages"} <= set(d)
    assert [s["name"] for s in d["stages"]] == [s.name for s in models.build(model, "none", 2).stages][:-1]
    assert all(0 <= s["acc_mean"] <= 1 and s["width"] > 0 for s in d["stages"])
    # random weights: the curve is shown, the data is not called similar, nothing stays frozen
    assert (d["similar"], d["size"], d["strategy"], d["frozen_stages"]) == (False, "small", "full", [])
    assert d["sample"]["images"] == 12 and d["sample"]["per_class"] == similarity.PER_CLASS


def test_many_classes_get_a_smaller_sample_each(tmp_path):
    from cnnft.data.samples import Source

    labels = [c for c in range(25) for _ in range(40)]
    picked: list[int] = []
    src = Source([str(i) for i in range(len(labels))], labels, lambda i, draft=None: picked.append(i))
    bb = models.build("lenet5", "none", 25)
    with pytest.raises(DataError):  # no image decodes (load gives None), but the sample is drawn
        similarity.measure(bb.model, bb.stages, src, bb.preprocess)
    assert len(picked) == 25 * (similarity.MAX_IMAGES // 25)


def test_freeze_plan_data_says_when_similar_disagrees(tmp_path):
    root = make_image_folder(tmp_path / "pets", per_class=6, size=40)
    res = runner.invoke(cli.app, ["freeze-plan", "--data", str(root), "--model", "lenet5", "--similar", "yes"])
    assert res.exit_code == 0, res.output
    assert "disagrees with the measurement" in res.output and "head_only" in res.output
    assert "linear probe per stage" in res.output
    res = runner.invoke(cli.app, ["freeze-plan", "--data", str(root)])
    assert res.exit_code == 2 and "--model" in res.output


def test_train_with_similar_auto_writes_the_measurement(tmp_path):
    weights = tmp_path / "lenet.pt"  # a weights file makes the backbone pretrained: auto measures
    torch.save(models.build("lenet5", "none", 10).model.state_dict(), weights)
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=8, size=32)
    s = train_recipe.train(None, [f"data.train={data}", "model.backbone=lenet5", f"model.weights={weights}",
                                  "train.epochs=1", "train.head_phase=false", f"output_dir={tmp_path / 'runs'}"],
                           log=lambda m: None)
    plan = json.loads((Path(s.run_dir) / "freeze_plan.json").read_text())
    m = plan["similarity"]
    assert [r["name"] for r in m["stages"]] == ["stem", "stage1", "stage2"]
    assert plan["strategy"] == m["strategy"] == s.strategy and "measured" in plan["auto"]
    frozen = set(plan["frozen_stages"])
    assert frozen == set(m["frozen_stages"])
    cfg = (Path(s.run_dir) / "config.yaml").read_text()
    assert "similar: auto" in cfg and "trainable_stages: auto" in cfg


def test_an_unmeasured_auto_without_weights_is_different(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=5, size=32)
    s = train_recipe.train(None, [f"data.train={data}", "model.backbone=lenet5", "train.epochs=1",
                                  f"output_dir={tmp_path / 'runs'}"], log=lambda m: None)
    plan = json.loads((Path(s.run_dir) / "freeze_plan.json").read_text())
    assert plan["similarity"] is None and plan["strategy"] == "full"
    assert "augment: mild" in (Path(s.run_dir) / "config.yaml").read_text()


# --------------------------------------------------------------------------- the real answers

@pytest.mark.slow
@pytest.mark.real
def test_hymenoptera_is_similar_digits_is_not(hymenoptera):
    bees = plan_recipe.measured_plan(model="efficientnet_lite0", data_dir=str(hymenoptera))
    assert (bees.measured.similar, bees.strategy) == (True, "head_only"), bees.measured.reason
    digits = plan_recipe.measured_plan(model="efficientnet_lite0", dataset="digits", image_size=96)
    assert digits.measured.similar is False, digits.measured.reason
    assert digits.strategy in ("freeze_most", "full") and digits.to_dict()["trainable_stages"] >= 1
    assert "stage7" not in digits.plan.frozen


def test_a_stage_with_non_finite_features_probes_at_zero():
    from cnnft.training import similarity

    feats = np.ones((20, 4))
    feats[3, 1] = np.inf
    assert similarity.probe(feats, np.arange(20) % 2, 2, 0) == (0.0, 0.0)

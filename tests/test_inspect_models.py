"""cnnft inspect / models / init: stage tables with shapes traced on the meta device,
the backbone list, and starter configs that validate."""

from __future__ import annotations

import json

import pytest
import yaml
from _fixtures import run_cli

from cnnft import config as config_mod
from cnnft.errors import ConfigError, InputError
from cnnft.recipes import init as starter
from cnnft.recipes import inspect as modelinfo

# one model per entry of models.FAMILIES, plus the timm-based packaged backbone
ONE_PER_FAMILY = ["resnet18", "vgg11", "alexnet", "squeezenet1_0", "googlenet", "inception_v3", "densenet121",
                  "shufflenet_v2_x0_5", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0",
                  "regnet_y_400mf", "convnext_tiny", "swin_t", "maxvit_t", "vit_b_16", "lenet5",
                  "efficientnet_lite0"]


def test_inspect_resnet50_freeze_early(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "inspect", "resnet50", "--strategy", "freeze_early", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert {"model", "strategy", "image_size", "stages", "total_params", "trainable_params"} <= set(res)
    assert res["model"] == "resnet50" and res["strategy"] == "freeze_early" and res["image_size"] == 224
    stages = {s["name"]: s for s in res["stages"]}
    assert list(stages) == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert sum(s["params"] for s in res["stages"]) == res["total_params"] == 25_557_032
    assert stages["stem"]["output_shape"] == [1, 64, 112, 112]
    assert stages["stage1"]["output_shape"] == [1, 256, 56, 56]
    assert stages["stage4"]["output_shape"] == [1, 2048, 7, 7]
    assert stages["head"]["output_shape"] == [1, 1000]
    assert [s["frozen"] for s in res["stages"]] == [True, True, True, False, False, False]
    assert stages["stem"]["lr"] is None and stages["head"]["lr"] == config_mod.TrainConfig().lr
    assert stages["stage3"]["lr"] == pytest.approx(config_mod.TrainConfig().lr * config_mod.TrainConfig().backbone_lr_scale)
    assert res["trainable_params"] == sum(s["params"] for s in res["stages"] if not s["frozen"])

    code, out, _ = run_cli(monkeypatch, capsys, "inspect", "resnet50", "--strategy", "freeze_early")
    assert code == 0 and "2048x7x7" in out and "25,557,032" in out


def test_inspect_without_strategy_shows_structure_only(monkeypatch, capsys):
    """inspect shows the structure; which stages train is freeze-plan's (or --strategy's) answer."""
    code, out, err = run_cli(monkeypatch, capsys, "inspect", "resnet50", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["strategy"] is None and "trainable_params" not in res
    assert all(set(s) == {"name", "modules", "output_shape", "params"} for s in res["stages"])
    assert res["total_params"] == 25_557_032
    code, out, _ = run_cli(monkeypatch, capsys, "inspect", "resnet50")
    assert code == 0 and "2048x7x7" in out
    assert "frozen" not in out and "trainable" not in out and "strategy" not in out.splitlines()[0]


def test_inspect_follows_image_size_and_classes():
    res = modelinfo.inspect_model("efficientnet_lite0", strategy="head_only", image_size=160, classes=3)
    stages = {s["name"]: s for s in res["stages"]}
    assert stages["stage7"]["output_shape"] == [1, 1280, 5, 5]
    assert stages["head"]["output_shape"] == [1, 3]
    assert res["trainable_params"] == stages["head"]["params"] == 1280 * 3 + 3


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_inspect_every_family_traces_every_stage(name):
    res = modelinfo.inspect_model(name, classes=5)
    assert sum(s["params"] for s in res["stages"]) == res["total_params"]
    for s in res["stages"]:
        if name == "vit_b_16" and s["name"] == "stem":
            assert s["output_shape"] == [1, 768, 14, 14]
        assert s["output_shape"] is not None and s["output_shape"][0] == 1, s
    assert res["stages"][-1]["output_shape"][1] == 5


def test_inspect_rejects_too_small_inputs_and_unknown_models(monkeypatch, capsys):
    with pytest.raises(InputError, match="at least 32"):
        modelinfo.inspect_model("lenet5", image_size=16)
    code, _, err = run_cli(monkeypatch, capsys, "inspect", "resnet5O")
    assert code == 2 and "resnet50" in err  # a did-you-mean suggestion


def test_models_lists_resnet18_with_its_parameter_count(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "models", "--filter", "resnet", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["resnet18"]["params"] == 11_689_512
    assert rows["resnet18"]["default_weights"] == "IMAGENET1K_V1" and rows["resnet18"]["input_size"] == 224
    assert rows["resnet50"]["params"] == 25_557_032
    assert all("resnet" in n for n in rows)

    code, out, _ = run_cli(monkeypatch, capsys, "models", "--filter", "LITE")
    assert code == 0 and "efficientnet_lite0" in out and "timm/<name>" in out


def test_init_writes_a_config_that_validates(tmp_path, monkeypatch, capsys):
    path = tmp_path / "exp.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "init", "--out", path, "--model", "efficientnet_lite0")
    assert code == 0, err
    text = path.read_text()
    assert text.splitlines()[0] == f"# cnnft train {path}"
    code, out, err = run_cli(monkeypatch, capsys, "validate", path, "--json")
    assert code == 0, err
    resolved = json.loads(out)["config"]  # --json is the pre-flight report; the resolved config is in it
    assert resolved["model"]["backbone"] == "efficientnet_lite0" and resolved["data"]["dataset"] == "digits"

    before = path.read_text()
    code, _, err = run_cli(monkeypatch, capsys, "init", "--out", path)
    assert code == 2 and "already exists" in err and path.read_text() == before


@pytest.mark.real
def test_init_without_arguments_trains_offline_as_written(tmp_path, monkeypatch, capsys):
    """The starter config needs no download (packaged digits and Lite0 weights) and the run's
    measurement picks the quadrant that suits digits (small, not like ImageNet photos: freeze_most)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))  # nothing cached to lean on
    code, _, err = run_cli(monkeypatch, capsys, "init")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "validate", "experiment.yaml", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["weights"]["offline"] and not any("download" in n for n in report["notes"])
    cfg = report["config"]
    assert (cfg["data"]["dataset"], cfg["model"]["backbone"], cfg["freeze"]["similar"]) == \
        ("digits", "efficientnet_lite0", "auto")
    assert cfg["data"]["image_size"] <= 64 and cfg["train"]["epochs"] <= 5
    code, out, err = run_cli(monkeypatch, capsys, "train", "experiment.yaml", "train.epochs=1",
                             "data.num_workers=0", "train.device=cpu", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["epochs_completed"] == 1
    plan = json.loads((tmp_path / "runs" / "digits" / "freeze_plan.json").read_text())
    assert plan["strategy"] == "freeze_most" and plan["similarity"]["similar"] is False


@pytest.mark.real
def test_init_with_a_data_folder(hymenoptera, tmp_path):
    path = starter.init(tmp_path / "hym.yaml", data_dir=str(hymenoptera))
    cfg = config_mod.load(path)
    assert cfg.data.train == str(hymenoptera / "train") and cfg.data.val == str(hymenoptera / "val")
    assert cfg.name == "hymenoptera_data"
    # given the train folder itself, its sibling val folder is found too
    same = config_mod.load(starter.init(tmp_path / "hym2.yaml", data_dir=str(hymenoptera / "train")))
    assert (same.data.train, same.data.val, same.name) == (cfg.data.train, cfg.data.val, cfg.name)
    with pytest.raises(ConfigError, match="resnet50"):
        starter.init(tmp_path / "x.yaml", model="resnet5O")
    assert not (tmp_path / "x.yaml").exists()


def test_starter_config_explains_every_schema_key():
    text = starter.starter_config("exp.yaml")
    lines = text.splitlines()
    assert yaml.safe_load(text) is not None
    sections = {name: f.default_factory for name, f in config_mod.Config.model_fields.items()
                if isinstance(f.default_factory, type)}
    for name, f in config_mod.Config.model_fields.items():
        if name in sections:
            keys = [(f"  {k}:", k) for k in sections[name].model_fields]
        else:
            keys = [(f"{name}:", name)]
        for start, key in keys:
            line = next((ln for ln in lines if ln.startswith(start)), None)
            assert line is not None and "  # " in line and line.split("  # ", 1)[1].strip(), key


def test_inspect_table_compacts_numbered_blocks():
    from cnnft.results.tables import compact_names as _compact_names

    assert _compact_names(["encoder.layers.encoder_layer_9", "encoder.layers.encoder_layer_10",
                           "encoder.layers.encoder_layer_11", "encoder.ln"]) == \
        ["encoder.layers.encoder_layer_9..11", "encoder.ln"]
    assert _compact_names(["features.0", "features.2", "features.3", "layer4"]) == \
        ["features.0", "features.2..3", "layer4"]


def test_shown_paths_are_relative_to_the_current_folder_when_inside_it(tmp_path, monkeypatch):
    from cnnft.results.tables import _images_root, shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "runs" / "x") == "runs/x"
    assert shown_path("/elsewhere/runs/x") == "/elsewhere/runs/x"
    paths = [str(tmp_path / "val" / c / f"{i}.jpg") for c in ("ants", "bees") for i in range(2)]
    root = _images_root(paths)
    assert root == str(tmp_path / "val") and shown_path(paths[0], root) == "ants/0.jpg"


def test_models_shows_accuracy_gflops_and_offline(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "models", "--filter", "convnext_t", "--json")
    assert code == 0, err
    tiny = {r["name"]: r for r in json.loads(out)}["convnext_tiny"]
    # torchvision's weights metadata for IMAGENET1K_V1: acc@1 82.52, 4.456 GFLOPs
    assert tiny["imagenet_acc1"] == 82.52 and tiny["gflops"] == 4.456 and isinstance(tiny["offline"], bool)
    code, out, _ = run_cli(monkeypatch, capsys, "models", "--filter", "lite", "--json")
    assert {r["name"]: r for r in json.loads(out)}["efficientnet_lite0"]["offline"] is True  # packaged weights
    code, out, _ = run_cli(monkeypatch, capsys, "models", "--filter", "convnext_t")
    assert code == 0 and "82.5" in out and "4.46" in out and "offline" in out

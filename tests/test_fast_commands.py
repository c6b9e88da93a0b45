"""The quick commands (validate, freeze-plan without --model, models, init, --help) answer
without importing torch, and the backbone catalog they read agrees with the live registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _fixtures import run_cli
from conftest import REPO, make_image_folder

from cnnft.errors import ConfigError
from cnnft.models import catalog
from cnnft.recipes import backbones, validate

# runs one command in a fresh interpreter, then reports what it imported
_WRAPPER = textwrap.dedent("""
    import json, sys
    from cnnft import cli
    try:
        cli.main(json.loads(sys.argv[1]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    sys.stdout.flush()
    heavy = sorted(m for m in ("torch", "torchvision", "timm", "sklearn") if m in sys.modules)
    sys.stderr.write("\\nIMPORTED " + json.dumps(heavy) + "\\n")
    sys.exit(code)
""")


def _run(cwd: Path, *argv: str) -> tuple[int, str, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(list(argv))], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    marker = p.stderr.rpartition("IMPORTED ")[2]
    return p.returncode, p.stdout, json.loads(marker) if marker.strip() else ["(no report)", p.stderr]


def test_validate_a_real_config_without_torch(tmp_path):
    make_image_folder(tmp_path / "photos", classes=("cats", "dogs", "owls"), per_class=3)
    make_image_folder(tmp_path / "photos_val", classes=("cats", "dogs", "owls"), per_class=2)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: pets\ndata:\n  train: photos\n  val: photos_val\nmodel:\n  backbone: resnet18\n"
                   "train:\n  device: auto\n")
    code, out, imported = _run(tmp_path, "validate", str(cfg), "--json")
    assert code == 0 and imported == [], imported
    res = json.loads(out)
    assert res["classes"]["train"] == {"cats": 3, "dogs": 3, "owls": 3}
    assert res["weights"]["status"] in ("download", "cached") and res["weights"]["url"].endswith("resnet18-f37072fd.pth")
    assert (res["image_size"], res["min_image_size"], res["device"]) == (224, 32, "auto")

    code, _, imported = _run(tmp_path, "validate", str(cfg), "train.device=cpu", "model.backbone=resnet5O")
    assert code == 2 and imported == []  # an unknown name is answered from the catalog too


def test_validate_digits_without_torch(tmp_path):
    code, out, imported = _run(tmp_path, "validate", "data.dataset=digits", "model.backbone=efficientnet_lite0",
                               "data.image_size=64", "--json")
    assert code == 0 and imported == [], imported
    res = json.loads(out)
    assert sum(res["classes"]["train"].values()) + sum(res["classes"]["val"].values()) == 1797
    assert res["weights"]["status"] == "packaged"


def test_digits_read_without_scikit_learn_are_load_digits():
    from sklearn.datasets import load_digits

    from cnnft.data.packaged import digits_arrays

    images, target = digits_arrays()
    d = load_digits()
    assert (images == d.images).all() and (target == d.target).all() and images.dtype == d.images.dtype


def test_validate_probes_cuda_only_when_asked(tmp_path):
    make_image_folder(tmp_path / "d", per_class=2)
    _, _, imported = _run(tmp_path, "validate", "data.train=d", "model.backbone=lenet5", "train.device=cuda", "--json")
    assert "torch" in imported  # cuda/mps are looked for; auto and cpu are not (above)


@pytest.mark.parametrize("argv", [
    ("freeze-plan", "--size", "small", "--similar", "yes"),
    ("freeze-plan", "--images", "5000", "--classes", "3", "--similar", "no", "--json"),
    ("models",),
    ("models", "--json"),
    ("init", "--out", "a.yaml"),
    ("init", "--out", "b.yaml", "--model", "resnet18", "--data", "d"),
    ("--help",),
    ("validate", "--help"),
], ids=lambda a: "-".join(a[:2]))
def test_quick_commands_do_not_import_torch(tmp_path, argv):
    make_image_folder(tmp_path / "d", per_class=2)
    code, out, imported = _run(tmp_path, *argv)
    assert code == 0 and imported == [], (imported, out)


def test_models_from_the_catalog_match_the_live_rows(monkeypatch, capsys):
    rows = {r["name"]: r for r in backbones.list_models("resnet1")}
    monkeypatch.setattr(catalog, "installed_versions", lambda: {"torchvision": "0.0", "timm": "0.0"})
    assert catalog.load() is None  # made for other versions: not used
    live = {r["name"]: r for r in backbones.list_models("resnet1")}
    assert rows == live and rows["resnet18"]["params"] == 11_689_512


def test_models_filter_searches_timm_names_too(tmp_path):
    code, out, imported = _run(tmp_path, "models", "--filter", "convnext_t", "--json")
    assert code == 0 and "timm" in imported, (imported, out)  # timm loads only for a filtered search
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["convnext_tiny"]["source"] == "torchvision"
    assert rows["timm/convnext_tiny"]["source"] == "timm" and rows["timm/convnext_tiny"]["params"] == 28_589_128
    assert rows["timm/convnext_tiny_hnf"]["default_weights"] == "convnext_tiny_hnf.a2h_in1k"
    assert all("convnext_t" in n for n in rows)

    code, out, imported = _run(tmp_path, "models", "--filter", "convnext_atto")
    assert code == 0 and "timm/convnext_atto_ols" in out and "timm's names searched too: 3 match" in out, out
    code, out, imported = _run(tmp_path, "models", "--json")
    assert code == 0 and imported == [] and not [r for r in json.loads(out) if r["source"] == "timm"]
    code, out, imported = _run(tmp_path, "models")
    assert code == 0 and "timm's models are not listed: --filter TEXT searches their names too" in out, out


def test_models_timm_prefix_lists_timm_alone(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "models", "--filter", "timm/resnet18d", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["timm/resnet18d"]["source"] == "timm" and rows["timm/resnet18d"]["params"] == 11_708_744
    assert all(r["source"] == "timm" for r in rows.values())
    # too many matches to build each: all listed, parameters left uncounted, the note says how to narrow
    many = backbones.list_models("timm/resnet")
    assert len(many) > backbones.TIMM_LIMIT and all(r["params"] is None for r in many)
    assert "timm/resnet18" in {r["name"] for r in many}
    assert "narrow the filter (e.g. --filter timm/resnet" in backbones.note("timm/resnet", many)
    # a headless timm model (num_classes 0: CLIP's image towers) is listed with its parameters too
    headless = {r["name"]: r for r in backbones.list_models("timm/resnet50_clip_gap")}
    assert headless["timm/resnet50_clip_gap"]["params"] > 0


@pytest.mark.parametrize("name,weights", [
    ("resnet18", "DEFAULT"), ("resnet50", "IMAGENET1K_V1"), ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),
    ("inception_v3", "DEFAULT"), ("resnet18", "none"), ("resnet18", "w/missing.pth"),
    ("efficientnet_lite1", "DEFAULT"), ("efficientnet_lite0", "none"), ("lenet5", "DEFAULT"),
])
def test_catalog_facts_equal_the_built_models(name, weights):
    assert catalog.facts(catalog.resolve(name), weights) == validate._live_facts(name, weights, None)


@pytest.mark.parametrize("name,weights", [
    ("resnet5O", "DEFAULT"), ("resnet18", "IMAGENET1K_V9"), ("lenet5", "IMAGENET1K_V1"),
    ("efficientnet_lite0", "IMAGENET1K_V1"),
])
def test_catalog_errors_equal_the_registry_errors(name, weights):
    with pytest.raises(ConfigError) as from_catalog:
        catalog.facts(catalog.resolve(name), weights)
    with pytest.raises(ConfigError) as from_registry:
        validate._live_facts(name, weights, None)
    assert from_catalog.value.problems == from_registry.value.problems


def test_hub_dir_is_torch_hub_dir(tmp_path, monkeypatch):
    import torch

    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delitem(sys.modules, "torch")  # the path computed without torch
        try:
            assert catalog.hub_dir() == Path(torch.hub.get_dir())
        finally:
            sys.modules["torch"] = torch


@pytest.mark.slow
def test_catalog_file_is_what_the_registry_gives_now():
    """Regenerate the catalog live; if this fails, run `python -m cnnft.models.catalog`."""
    on_disk = json.loads(catalog.CATALOG_FILE.read_text())
    assert on_disk == catalog.generate(), "stale: run `python -m cnnft.models.catalog` and commit catalog.json"
    assert catalog.load() is not None  # and it is the one in use with these packages

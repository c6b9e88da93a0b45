"""Bad numbers, table-driven: every number the config or a command-line option takes is
finite and in a range that makes sense, refused with exit 2 by a message that names the key
or option and says the range (one declaration per number: cnnft/ranges.py).

Rows reuse the set-up and checks of ``tests/test_bad_inputs.py``; the tests after the table
walk the schema and the CLI, so a number added later without a range fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _robust import run_inprocess
from _robust import one_thread  # noqa: F401 - autouse: one torch thread per module
from test_bad_inputs import Case, _check, _setup, prior_run

LR_RANGE = "a finite number > 0 and <= 10"
BATCH_RANGE = "a whole number from 1 to 1,000,000"
CLASSES_RANGE = "a whole number from 2 to 1,000,000"
WEIGHT_RANGE = "a finite number > 0 and <= 1,000,000"
MIX_RANGE = "a finite number from 0.01 to 100 (or 0: off)"
BIG = "99999999999999999999"




def cfg_row(id: str, override: str, key: str, *says: str) -> Case:
    """`cnnft train cfg.yaml KEY=VALUE` refused before anything runs."""
    return Case(id, 2, (f"{key}:", *says), ov=(override,))


def cli_row(id: str, argv: tuple[str, ...], option: str, rng: str, prep=()) -> Case:
    return Case(id, 2, (f"Invalid value for '{option}'", f"must be {rng}"), argv=argv, prep=prep)


LENET = ("model.backbone=lenet5",)
RUN = (prior_run(),)

CASES = [
    # --- config keys: the examples
    cfg_row("weight-decay-1e308", "train.weight_decay=1e308", "train.weight_decay", "less than or equal to 10;",
            "allowed: a finite number from 0 to 10"),
    cfg_row("class-weight-negative", "train.class_weights={a: -1, b: 1}", "train.class_weights.a",
            "greater than 0", f"allowed: {WEIGHT_RANGE}"),
    cfg_row("class-weight-zero", "train.class_weights={a: 0, b: 1}", "train.class_weights.a", "greater than 0"),
    cfg_row("class-weight-1e308", "train.class_weights={a: 1, b: 1e308}", "train.class_weights.b",
            f"allowed: {WEIGHT_RANGE}"),
    cfg_row("class-weight-nan", "train.class_weights={a: .nan, b: 1}", "train.class_weights.a",
            "Input should be a finite number", f"allowed: {WEIGHT_RANGE}"),
    cfg_row("mixup-subnormal", "train.mixup=1e-320", "train.mixup", f"allowed: {MIX_RANGE}"),
    cfg_row("cutmix-tiny", "train.cutmix=1e-46", "train.cutmix", f"allowed: {MIX_RANGE}"),
    # --- config keys: more of the same gap
    cfg_row("class-weight-inf", "train.class_weights={a: .inf, b: 1}", "train.class_weights.a", "finite number"),
    cfg_row("class-weight-bool", "train.class_weights={a: true, b: 1}", "train.class_weights.a", "valid number"),
    cfg_row("class-weight-two-bad", "train.class_weights={a: -2, b: .nan}", "train.class_weights.b", "train.class_weights.a:"),
    cfg_row("weight-decay-negative", "train.weight_decay=-0.1", "train.weight_decay", "allowed: a finite number from 0 to 10"),
    cfg_row("mixup-0.001", "train.mixup=0.001", "train.mixup", f"allowed: {MIX_RANGE}"),
    cfg_row("mixup-huge", "train.mixup=1e308", "train.mixup", f"allowed: {MIX_RANGE}"),
    cfg_row("cutmix-negative", "train.cutmix=-1", "train.cutmix", f"allowed: {MIX_RANGE}"),
    cfg_row("grad-clip-1e308", "train.grad_clip=1e308", "train.grad_clip", "a finite number > 0 and <= 1,000,000"),
    cfg_row("warmup-1e308", "train.warmup_epochs=1e308", "train.warmup_epochs", "a finite number from 0 to 100,000"),
    cfg_row("warmup-nan-says-range", "train.warmup_epochs=.nan", "train.warmup_epochs", "finite number",
            "a finite number from 0 to 100,000"),
    cfg_row("lr-inf-says-range", "train.lr=.inf", "train.lr", "finite number", LR_RANGE),
    cfg_row("lr-above-10-says-range", "train.lr=11", "train.lr", LR_RANGE),
    cfg_row("label-smoothing-one", "train.label_smoothing=1", "train.label_smoothing", "a finite number >= 0 and < 1"),
    cfg_row("momentum-1.5", "train.momentum=1.5", "train.momentum", "a finite number >= 0 and < 1"),
    cfg_row("ema-one", "train.ema=1", "train.ema", "a finite number > 0 and < 1"),
    cfg_row("backbone-lr-scale-zero", "train.backbone_lr_scale=0", "train.backbone_lr_scale", "a finite number > 0 and <= 1"),
    cfg_row("layer-decay-1.5", "train.layer_decay=1.5", "train.layer_decay", "a finite number > 0 and <= 1"),
    cfg_row("epochs-huge-int", f"train.epochs={BIG}", "train.epochs", "a whole number from 1 to 100,000"),
    cfg_row("patience-huge-int", f"train.patience={BIG}", "train.patience", "a whole number from 1 to 100,000"),
    cfg_row("batch-size-huge-int", f"data.batch_size={BIG}", "data.batch_size", BATCH_RANGE),
    cfg_row("limit-per-class-huge-int", f"data.limit_per_class={BIG}", "data.limit_per_class",
            "a whole number from 1 to 1,000,000,000"),
    cfg_row("num-classes-1e12", "model.num_classes=1000000000000", "model.num_classes", CLASSES_RANGE),
    cfg_row("num-classes-one-says-range", "model.num_classes=1", "model.num_classes", CLASSES_RANGE),
    cfg_row("frozen-stages-huge-int", f"freeze.frozen_stages={BIG}", "freeze.frozen_stages",
            "a whole number from 0 to 1,000"),
    cfg_row("trainable-stages-huge-int", f"freeze.trainable_stages={BIG}", "freeze.trainable_stages",
            "a whole number from 0 to 1,000"),
    cfg_row("cache-views-zero-says-range", "train.cache_views=0", "train.cache_views", "a whole number from 1 to 1,000"),
    cfg_row("cache-budget-huge-int", f"train.cache_budget_mb={BIG}", "train.cache_budget_mb",
            "a whole number from 0 to 100,000,000"),
    cfg_row("seed-negative-says-range", "seed=-1", "seed", "a whole number from 0 to 4,294,967,295"),
    cfg_row("image-size-8-says-range", "data.image_size=8", "data.image_size", "a whole number from 16 to 1,024"),
    cfg_row("val-split-nan-says-range", "data.val_split=.nan", "data.val_split", "a finite number > 0 and < 1"),
    cfg_row("workers-huge-int", f"data.num_workers={BIG}", "data.num_workers", "a whole number from 0 to 1,024"),
    Case("validate-weight-decay-1e308", 2, ("train.weight_decay:", "allowed: a finite number from 0 to 10"),
         argv=("validate", "cfg.yaml", "train.weight_decay=1e308")),
    Case("class-weight-nan-no-internals", 2, ("train.class_weights.a: Input should be a finite number",),
         ov=("train.class_weights={a: .nan, b: 1}",),
         check=lambda tmp, res: (_no_pydantic_internals(res.err))),
    # --- command-line options: the examples
    cli_row("predict-batch-size-huge", ("predict", "runs/t", "data", "--batch-size", BIG), "--batch-size", BATCH_RANGE, RUN),
    cli_row("evaluate-batch-size-huge", ("evaluate", "runs/t", "--batch-size", BIG, "--device", "cpu"), "--batch-size",
            BATCH_RANGE, RUN),
    cli_row("extract-batch-size-huge", ("extract", "runs/t", "--data", "data", "--out", "f.npz", "--batch-size", BIG),
            "--batch-size", BATCH_RANGE, RUN),
    cli_row("inspect-classes-huge", ("inspect", "lenet5", "--classes", "100000000000000000000"), "--classes", CLASSES_RANGE),
    cli_row("inspect-classes-1e20", ("inspect", "lenet5", "--classes", "1e20"), "--classes", CLASSES_RANGE),
    cli_row("inspect-lr-nan", ("inspect", "lenet5", "--lr", "nan", "--json"), "--lr", LR_RANGE),
    cli_row("inspect-lr-inf", ("inspect", "lenet5", "--lr", "inf", "--json"), "--lr", LR_RANGE),
    cli_row("inspect-lr-negative", ("inspect", "lenet5", "--lr", "-5", "--json"), "--lr", LR_RANGE),
    cli_row("freeze-plan-lr-nan", ("freeze-plan", "--size", "small", "--similar", "yes", "--lr", "nan", "--json"),
            "--lr", LR_RANGE),
    cli_row("freeze-plan-lr-inf", ("freeze-plan", "--size", "small", "--similar", "yes", "--lr", "inf", "--json"),
            "--lr", LR_RANGE),
    cli_row("freeze-plan-one-class", ("freeze-plan", "--images", "100", "--classes", "1", "--similar", "yes"),
            "--classes", CLASSES_RANGE),
    # --- command-line options: more of the same gap
    cli_row("freeze-plan-lr-above-10", ("freeze-plan", "--size", "small", "--similar", "yes", "--lr", "50"), "--lr", LR_RANGE),
    cli_row("freeze-plan-lr-zero", ("freeze-plan", "--size", "small", "--similar", "yes", "--lr", "0"), "--lr", LR_RANGE),
    cli_row("freeze-plan-layer-decay-nan", ("freeze-plan", "--size", "small", "--similar", "yes", "--layer-decay", "nan"),
            "--layer-decay", "a finite number > 0 and <= 1"),
    cli_row("freeze-plan-layer-decay-2", ("freeze-plan", "--size", "small", "--similar", "yes", "--layer-decay", "2"),
            "--layer-decay", "a finite number > 0 and <= 1"),
    cli_row("freeze-plan-images-huge", ("freeze-plan", "--images", "1" + "0" * 30, "--classes", "5", "--similar", "yes"),
            "--images", "a whole number from 1 to 1,000,000,000,000"),
    cli_row("freeze-plan-frozen-stages-huge", ("freeze-plan", "--size", "small", "--similar", "yes", "--model", "lenet5",
                                               "--strategy", "freeze_early", "--frozen-stages", BIG),
            "--frozen-stages", "a whole number from 0 to 1,000"),
    cli_row("freeze-plan-classes-huge", ("freeze-plan", "--size", "small", "--similar", "yes", "--model", "lenet5",
                                         "--classes", BIG), "--classes", CLASSES_RANGE),
    cli_row("inspect-classes-one", ("inspect", "lenet5", "--classes", "1"), "--classes", CLASSES_RANGE),
    cli_row("inspect-lr-above-10", ("inspect", "lenet5", "--lr", "1e308", "--json"), "--lr", LR_RANGE),
    cli_row("predict-top-k-huge", ("predict", "runs/t", "data", "--top-k", BIG), "--top-k",
            "a whole number from 1 to 1,000,000", RUN),
    cli_row("predict-workers-huge", ("predict", "runs/t", "data", "--workers", BIG), "--workers",
            "a whole number from 0 to 1,024", RUN),
    cli_row("extract-workers-huge", ("extract", "runs/t", "--data", "data", "--out", "f.npz", "--workers", BIG),
            "--workers", "a whole number from 0 to 1,024", RUN),
    cli_row("evaluate-batch-size-zero", ("evaluate", "runs/t", "--batch-size", "0", "--device", "cpu"), "--batch-size",
            BATCH_RANGE, RUN),
    cli_row("lr-find-steps-huge", ("lr-find", "cfg.yaml", "--steps", BIG), "--steps", "a whole number from 10 to 100,000"),
]


def _no_pydantic_internals(err: str) -> None:
    for internal in ("dict[str", "function-after", "function-before", "constrained-float"):
        assert internal not in err, err


def _params():
    return [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_number(case: Case, tmp_path: Path, monkeypatch, capfd) -> None:
    argv, before = _setup(case, tmp_path)
    res = run_inprocess(argv, monkeypatch, capfd, tmp_path)
    _check(case, tmp_path, res, before)
    assert "internal error" not in res.err


def test_table_is_distinct() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 60


def _unranged(annotation, ranged: bool = False) -> list:
    """The int/float leaves of a (nested, union) annotation that no Range checks."""
    import typing

    from pydantic import AfterValidator

    from cnnft.ranges import Range

    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        checked = any(isinstance(m, AfterValidator) and isinstance(getattr(m.func, "__self__", None), Range)
                      for m in meta)
        return _unranged(base, ranged or checked)
    if annotation in (int, float):
        return [] if ranged else [annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return []
    return [x for a in typing.get_args(annotation) for x in _unranged(a, ranged)]


def test_every_number_in_the_schema_has_a_range() -> None:
    """A numeric key declared without a Range (finite, bounded, a message with the range)
    would take 1e308 or 10**20; this walks every field of every section."""
    from cnnft import config

    missing = [f"{section}.{name}".lstrip(".") for section, schema in config._SECTIONS.items()
               for name, field in schema.model_fields.items() if _unranged(field.rebuild_annotation())]
    assert missing == []
    assert _unranged(int) == [int]  # the walker does see a bare number


def test_every_numeric_option_has_a_range() -> None:
    """Every int/float option of every command goes through a Range (cli/base.py number())."""
    import typing

    import typer

    from cnnft.cli.base import app

    group = typer.main.get_command(app)
    plain, seen = [], 0
    for name, cmd in group.commands.items():
        for p in cmd.params:
            td = getattr(p, "type_descriptor", None)
            if td is None or not ({int, float} & {td.annotation, *typing.get_args(td.annotation)}):
                continue
            seen += 1
            parser = td.parameter_info.parser
            if not getattr(parser, "__qualname__", "").startswith("number."):
                plain.append(f"{name} {p.opts[0]}")
    assert seen >= 15  # the walk does reach the numeric options
    assert plain == []


@pytest.mark.parametrize("text, ok", [("0", True), ("0.2", True), ("100", True), ("1e-320", False),
                                      ("0.009", False), ("nan", False), ("-0.5", False), ("101", False)])
def test_mix_alpha_range(text: str, ok: bool) -> None:
    from cnnft import ranges

    if ok:
        assert ranges.MIX_ALPHA.parse(text) == float(text)
    else:
        with pytest.raises(ValueError, match="from 0.01 to 100"):
            ranges.MIX_ALPHA.parse(text)


def test_edges_are_taken() -> None:
    """The bounds are inclusive where they say so: weight_decay 10 and mixup 100 are taken."""
    from cnnft import config

    cfg = config.load(None, ["data.train=x", "train.weight_decay=10", "train.mixup=100", "train.cutmix=0",
                             "train.class_weights={a: 1000000, b: 0.5}", f"seed={2**32 - 1}"])
    assert cfg.train.weight_decay == 10 and cfg.train.mixup == 100 and cfg.train.class_weights["a"] == 1e6

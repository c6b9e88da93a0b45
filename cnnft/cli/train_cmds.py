"""Commands that plan and run training: validate, freeze-plan, train, lr-find."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .. import ranges as R
from ..errors import ConfigError
from ..results import tables
from . import exits
from .base import (
    Size,
    StrategyChoice,
    YesNo,
    _config_and_overrides,
    _log,
    _print_json,
    app,
    err,
    number,
    out,
)
from .helpformat import Command as _Command


@app.command(cls=_Command)
def validate(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file; leave it out to start from the defaults."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides."),
    json_out: bool = typer.Option(False, "--json", help="Print the pre-flight report as JSON (ok, problems, config, classes...)."),
) -> None:
    """Pre-flight check of a config: schema, data folders and classes, backbone, weights, device, output folder.

    Every problem is listed at once (exit code 2); with none, the resolved config is printed
    (every default filled in). Nothing is downloaded, trained or written.
    """
    from ..recipes import validate as validate_recipe
    config, overrides = _config_and_overrides(config, overrides)
    res = validate_recipe.preflight(config, overrides)
    if json_out:
        _print_json(res.to_dict())
    if not res.ok:
        if not json_out and res.config is not None:
            for line in tables.preflight(res):
                err.print(line, highlight=False)
        raise ConfigError(res.problems, source=res.source)
    if not json_out:
        import yaml

        out.print(yaml.safe_dump(res.config, sort_keys=False).rstrip(), markup=False, highlight=False)
        for line in tables.preflight(res):
            err.print(line, highlight=False)
        err.print(f"[green]config OK[/green]: {escape(res.source or '')}: ready to train")


@app.command("freeze-plan", cls=_Command)
def freeze_plan(
    size: Optional[Size] = typer.Option(None, "--size", help="Dataset size class."),
    similar: Optional[YesNo] = typer.Option(None, "--similar", help="Is the data similar to ImageNet?"),
    images: Optional[int] = number(R.IMAGES, None, "--images", help="Training images (derives --size)."),
    classes: Optional[int] = number(R.CLASSES, None, "--classes", help="Number of classes (derives --size; sizes the head; default 2)."),
    model: Optional[str] = typer.Option(None, "--model", help="Show the per-stage plan for this backbone."),
    strategy: Optional[StrategyChoice] = typer.Option(None, "--strategy", help="Use this strategy instead of the recommendation."),
    lr: Optional[float] = number(R.LR, None, "--lr", help="Head learning rate (default: the config default)."),
    frozen_stages: Optional[int] = number(R.STAGES, None, "--frozen-stages", help="freeze_early: stages after the stem to freeze."),
    trainable_stages: Optional[int] = number(R.STAGES, None, "--trainable-stages", help="freeze_most: last stages that train."),
    data: Optional[str] = typer.Option(None, "--data", help="Measure size and similarity on these images: class "
                                       "folders, or a dataset root with train/ (needs --model)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Measure on a packaged dataset instead (digits)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights of --model for the measurement."),
    image_size: Optional[int] = number(R.IMAGE_SIZE, None, "--image-size", help="Input size for the measurement; "
                                             "default: the weights' own."),
    layer_decay: Optional[float] = number(R.LR_SCALE, None, "--layer-decay", help="train.layer_decay: each trainable stage below the deepest learns this many times slower."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Recommend a freeze strategy from dataset size x similarity.

    With --model, show exactly which stages are frozen, their parameter counts and learning rates.
    With --data (or --dataset) and --model, measure both instead of asking: the size from the
    image count, the similarity from a linear probe on each stage's features of a sample.

    Size: "large" means at least 1000 training images per class on average (--images/--classes).
    """
    from ..recipes import freeze_plan as plan_recipe
    if data is not None or dataset is not None:
        if model is None:
            raise typer.BadParameter("the measurement runs a backbone: add --model NAME (e.g. efficientnet_lite0)",
                                     param_hint="--data")
        advice = plan_recipe.measured_plan(
            model=model, data_dir=data, dataset=dataset, weights=weights, image_size=image_size,
            similar=None if similar is None else similar == YesNo.yes, strategy=strategy.value if strategy else None,
            lr=lr, frozen_stages=frozen_stages, trainable_stages=trainable_stages, layer_decay=layer_decay,
            show_progress=err.is_terminal and not json_out, log=None if err.is_terminal or json_out else _log)
    else:
        advice = plan_recipe.freeze_plan(
            size=size.value if size else None,
            similar=None if similar is None else similar == YesNo.yes,
            images=images,
            classes=classes,
            model=model,
            strategy=strategy.value if strategy else None,
            lr=lr,
            frozen_stages=frozen_stages,
            trainable_stages=trainable_stages,
            layer_decay=layer_decay,
        )
    if json_out:
        _print_json(advice.to_dict())
        return
    quadrant = f"{advice.size or '?'} dataset, {'similar to' if advice.similar else 'different from'} ImageNet" \
        if advice.similar is not None else f"{advice.size or '?'} dataset"
    out.print(f"[bold]{quadrant}[/bold] -> strategy [bold cyan]{advice.strategy}[/bold cyan]")
    out.print(advice.rationale)
    if advice.size_rule:
        out.print(f"[dim]{escape(advice.size_rule)}[/dim]")
    if advice.measured is not None:
        out.print(tables.similarity(advice))
        out.print(escape(advice.measured.reason))
    if advice.note:
        err.print(f"[yellow]{escape(advice.note)}[/yellow]")
    if advice.plan is not None:
        out.print(tables.freeze_plan(advice))
        out.print("[dim]BatchNorm in frozen stages stays in eval mode (running statistics unchanged)"
                  + ("; in the trainable stages too (freeze.batchnorm: small dataset, pretrained statistics "
                     "kept, scale and shift learn)." if advice.plan.batchnorm == "eval" else
                     "; in the trainable stages it normalises with each batch (freeze.batchnorm).") + "[/dim]")


@app.command(cls=_Command)
def train(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file (optional with --resume, or with overrides alone)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=0.01"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder (may extend train.epochs)."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar: one plain line per epoch."),
    nproc: Optional[int] = number(R.PROCESSES, None, "--nproc", help="Train in N processes on this machine "
                                        "(torchrun; one per GPU): data.batch_size is per process."),
) -> None:
    """Fine-tune a pretrained backbone on your images and write a run folder.

    The run folder holds the resolved config, the freeze plan, metrics.csv, summary.json and
    checkpoints/best.pt and last.pt; --resume RUN_DIR continues an interrupted run.
    """
    # `cnnft train --resume RUN train.epochs=5`, `cnnft train data.dataset=digits model.backbone=lenet5`
    config, overrides = _config_and_overrides(config, overrides)
    if config is None and resume is None and not overrides:
        raise typer.BadParameter("give a CONFIG file, or --resume RUN_DIR (or key.sub=value overrides to start "
                                 "from the defaults)", param_hint="CONFIG")
    if config is not None and resume is not None:
        raise typer.BadParameter("give either CONFIG or --resume RUN_DIR (the run keeps its own config)")
    if nproc is not None:
        _launch_train(nproc, config, overrides, resume, json_out, quiet)
    from ..recipes import train as train_recipe
    summary = train_recipe.train(config, overrides, resume=resume, log=lambda m: err.print(m, highlight=False, markup=False),
                                 progress_bar=err.is_terminal and not quiet and not json_out,
                                 epoch_lines=not err.is_terminal and not quiet)
    if exits.other_rank():  # rank 0 of a torchrun launch reports the run
        return
    if json_out:
        _print_json(summary.to_dict())
    else:
        final = "none" if summary.final_val_acc is None else f"{summary.final_val_acc:.4f}"
        out.print(f"[bold]best val acc {summary.best_val_acc:.4f}[/bold] (epoch {summary.best_epoch}), "
                  f"final {final}, {summary.wall_seconds:.0f}s -> {tables.shown_path(summary.run_dir)}")
        if summary.stopped_by:
            err.print(f"ended by {summary.stopped_by} after {summary.epochs_completed} epoch(s); "
                      f"to go on: cnnft train --resume {tables.shown_path(summary.run_dir)} train.time_budget=...",
                      highlight=False, markup=False)
        if summary.test_acc is not None:
            out.print(f"test acc {summary.test_acc:.4f} on {summary.test_images} images (best.pt; data.test)")
        run = tables.shown_path(summary.run_dir)
        err.print(f"next: cnnft evaluate {run} | cnnft report {run} | cnnft predict {run} IMAGES...",
                  highlight=False, markup=False)


@app.command("lr-find", cls=_Command)
def lr_find_cmd(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file (optional with overrides alone)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. freeze.strategy=freeze_most"),
    out_file: Path = typer.Option(Path("lr_find.png"), "--out", help="The plot to write (PNG)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    steps: int = number(R.SWEEP_STEPS, 100, "--steps", help="Batches in the sweep (the loader is cycled when shorter)."),
    json_out: bool = typer.Option(False, "--json", help="Print suggested_lr, lrs, losses, plot (and reason, diverged) as JSON."),
) -> None:
    """Find a learning rate: a range test (as fastai's lr_find) of the run a config describes.

    The rate grows from 1e-7 to 10 over --steps batches of the run's own data, model, frozen stages
    and optimizer; the smoothed loss is plotted against it and a rate suggested (fastai's
    valley rule). Nothing is trained or saved but the plot; train.lr=auto does the same at
    the start of `cnnft train`.
    """
    config, overrides = _config_and_overrides(config, overrides)
    if config is None and not overrides:
        raise typer.BadParameter("give a CONFIG file (or key.sub=value overrides to start from the defaults)",
                                 param_hint="CONFIG")
    from ..recipes import lr_find as lr_find_recipe
    res = lr_find_recipe.lr_find(config, overrides, out=out_file, steps=steps, log=_log, force=force)
    if json_out:
        _print_json(res.to_dict())
        return
    out.print(f"[bold]suggested lr {res.suggested_lr:.3g}[/bold] ({escape(res.reason)}); "
              f"plot: {escape(tables.shown_path(res.plot))}", highlight=False)
    rerun = ["cnnft", "train", *([config] if config else []), *overrides, f"train.lr={res.suggested_lr:.3g}"]
    err.print(f"next: {shlex.join(rerun)}", highlight=False, markup=False)


def _launch_train(nproc: int, config: str | None, overrides: list[str], resume: Path | None,
                  json_out: bool, quiet: bool) -> None:
    """`cnnft train --nproc N ...`: the same command in N torchrun processes; exits with their code."""
    if "LOCAL_RANK" in os.environ:
        raise typer.BadParameter("--nproc inside a torchrun process; leave it out (torchrun already "
                                 "started the processes)", param_hint="--nproc")
    from ..run import lock
    from ..training import distributed

    if resume is not None and (resume / "config.yaml").is_file():
        lock.check_free(resume, "train")  # refused here, before torchrun starts N processes
    args = ["train", *([config] if config is not None else []), *overrides,
            *(["--resume", str(resume)] if resume is not None else []),
            *(["--json"] if json_out else []), *(["--quiet"] if quiet else [])]
    raise typer.Exit(distributed.launch(nproc, args))

"""The `cnnft` command line: parse arguments, call one library function, print.

Errors are mapped to a message and an exit code in one place (:func:`main`): 0 success,
2 bad input, 1 anything else, 130/143 after SIGINT/SIGTERM with a resumable checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__, exits, tables
from .strategies import STRATEGIES

from .helpformat import Command as _Command, Group as _Group
from .errors import ConfigError

app = typer.Typer(
    name="cnnft",
    help="Transfer learning for image classifiers: pretrained backbone, new head, "
    "a freeze strategy by dataset size x similarity, one command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=_Group,
)
out = Console(soft_wrap=True)  # results (stdout)
err = Console(stderr=True, soft_wrap=True)  # messages (stderr)


@dataclass
class Settings:
    """Options of the root command, kept on Typer's context (``ctx.obj``)."""

    debug: bool = False


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        out.print(f"cnnft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug and isinstance(ctx.obj, Settings):
        ctx.obj.debug = True


class Size(str, Enum):
    small = "small"
    large = "large"


class YesNo(str, Enum):
    yes = "yes"
    no = "no"


StrategyChoice = Enum("StrategyChoice", {s: s for s in STRATEGIES}, type=str)  # type: ignore[misc]


def _config_and_overrides(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """CONFIG may be left out: a first argument with `=` that is no file is an override, and
    the config is built from the defaults and the overrides alone."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, overrides


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
    from .recipes import validate as validate_recipe
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
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Training images (derives --size)."),
    classes: Optional[int] = typer.Option(None, "--classes", min=1, help="Number of classes (derives --size; sizes the head; default 2)."),
    model: Optional[str] = typer.Option(None, "--model", help="Show the per-stage plan for this backbone."),
    strategy: Optional[StrategyChoice] = typer.Option(None, "--strategy", help="Use this strategy instead of the recommendation."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Head learning rate (default: the config default)."),
    frozen_stages: Optional[int] = typer.Option(None, "--frozen-stages", min=0, help="freeze_early: stages after the stem to freeze."),
    trainable_stages: Optional[int] = typer.Option(None, "--trainable-stages", min=0, help="freeze_most: last stages that train."),
    data: Optional[str] = typer.Option(None, "--data", help="Measure size and similarity on these images: class "
                                       "folders, or a dataset root with train/ (needs --model)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Measure on a packaged dataset instead (digits)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights of --model for the measurement."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=16, help="Input size for the measurement; "
                                             "default: the weights' own."),
    layer_decay: Optional[float] = typer.Option(None, "--layer-decay", help="train.layer_decay: each trainable stage below the deepest learns this many times slower."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Recommend a freeze strategy from dataset size x similarity.

    With --model, show exactly which stages are frozen, their parameter counts and learning rates.
    With --data (or --dataset) and --model, measure both instead of asking: the size from the
    image count, the similarity from a linear probe on each stage's features of a sample.

    Size: "large" means at least 1000 training images per class on average (--images/--classes).
    """
    from .recipes import freeze_plan as plan_recipe
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
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train in N processes on this machine "
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
    from .recipes import train as train_recipe
    summary = train_recipe.train(config, overrides, resume=resume, log=lambda m: err.print(m, highlight=False, markup=False),
                                 progress_bar=err.is_terminal and not quiet and not json_out)
    if exits.other_rank():  # rank 0 of a torchrun launch reports the run
        return
    if json_out:
        _print_json(summary.to_dict())
    else:
        out.print(f"[bold]best val acc {summary.best_val_acc:.4f}[/bold] (epoch {summary.best_epoch}), "
                  f"final {summary.final_val_acc:.4f}, {summary.wall_seconds:.0f}s -> {tables.shown_path(summary.run_dir)}")
        if summary.test_acc is not None:
            out.print(f"test acc {summary.test_acc:.4f} on {summary.test_images} images (best.pt; data.test)")
        run = tables.shown_path(summary.run_dir)
        err.print(f"next: cnnft evaluate {run} | cnnft report {run} | cnnft predict {run} IMAGES...",
                  highlight=False, markup=False)


@app.command("lr-find", cls=_Command)
def lr_find_cmd(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file (optional with overrides alone)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. freeze.strategy=freeze_most"),
    out_file: Path = typer.Option(Path("lr_find.png"), "--out", help="The plot to write (PNG; replaced if it exists)."),
    steps: int = typer.Option(100, "--steps", min=10, max=100_000, help="Batches in the sweep (the loader is cycled when shorter)."),
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
    from .recipes import lr_find as lr_find_recipe
    res = lr_find_recipe.lr_find(config, overrides, out=out_file, steps=steps, log=_log)
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
    from . import distributed

    args = ["train", *([config] if config is not None else []), *overrides,
            *(["--resume", str(resume)] if resume is not None else []),
            *(["--json"] if json_out else []), *(["--quiet"] if quiet else [])]
    raise typer.Exit(distributed.launch(nproc, args))


# ------------------------------------------------------------------ using a trained model

def _log(message: str) -> None:
    err.print(message, highlight=False, markup=False)


@app.command("evaluate", cls=_Command)
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (run/checkpoints/best.pt) or a run folder (uses its best.pt)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with one sub-folder per class; default: the run's own --split."),
    split: str = typer.Option("val", "--split", help="The run's own data: val (picked best.pt) or test (data.test)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Results folder; default: RUN/eval/<data name>."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: the run's batch size."),
    tta: bool = typer.Option(False, "--tta", help="Average each image's prediction with its mirror's (runs trained with flips)."),
    json_out: bool = typer.Option(False, "--json", help="Print all results as JSON."),
) -> None:
    """Evaluate a trained model: accuracy, loss, per-class F1, confusion matrix, worst errors.

    Everything comes from the checkpoint (no config needed); results go to RUN/eval/<data>/.
    """
    from .recipes import evaluate as evaluate_recipe
    if data is not None and split != "val":
        raise typer.BadParameter("choose one of --data and --split test")
    res = evaluate_recipe.evaluate(checkpoint, data_dir=data, split=split, out_dir=out_dir, device=device, batch_size=batch_size, tta=tta,
                                   log=_log, show_progress=err.is_terminal and not json_out)
    if json_out:
        _print_json(res.to_dict())
        return
    for renderable in tables.evaluation(res):
        out.print(renderable, highlight=False)


@app.command("predict", cls=_Command)
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint, a run folder, or an exported model.onnx / model.pt "
                                      "(with the FILE.json export wrote beside it)."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (walked recursively)."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes shown per image."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    csv_out: bool = typer.Option(False, "--csv", help="Print CSV (path, class, prob, class_2, prob_2, ..., error)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes decoding images."),
    tta: bool = typer.Option(False, "--tta", help="Average each image's prediction with its mirror's (runs trained with flips)."),
) -> None:
    """Predict the classes of image files and folders.

    Unreadable files are reported (stderr and an error field) but not fatal; the exit code
    is 2 only when no file could be read.
    """
    from .recipes import predict as predict_recipe
    if json_out and csv_out:
        raise typer.BadParameter("choose one of --json and --csv")
    res = predict_recipe.predict(checkpoint, [str(p) for p in images], top_k=top_k, batch_size=batch_size, tta=tta,
                                 device=device, num_workers=workers, log=_log,
                                 show_progress=err.is_terminal and not (json_out or csv_out))
    if json_out:
        _print_json(res.to_dict())
    elif csv_out:
        tables.predictions_csv(res, sys.stdout)
    else:
        out.print(tables.predictions(res))
    if res.failed:
        err.print(f"[yellow]{res.failed} of {res.images} file(s) could not be read[/yellow]")


@app.command("report", cls=_Command)
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    device: str = typer.Option("auto", "--device", help="Device for evaluating the best checkpoint if needed."),
    json_out: bool = typer.Option(False, "--json", help="Print the key figures as JSON."),
) -> None:
    """Write RUN/report/: report.html (one file) and report.md with curves, confusion matrices and the worst errors."""
    from .recipes import report as report_recipe
    res = report_recipe.write_report(run_dir, device=device, log=_log)
    if json_out:
        _print_json(res.to_dict())
        return
    out.print(f"best val acc {tables.pct(res.best_val_acc)} (epoch {res.best_epoch}), final {tables.pct(res.final_val_acc)}, "
              f"{res.epochs} epochs, strategy {res.strategy}")
    out.print(f"report: {tables.shown_path(res.files['report.html'])} (open in a browser), {tables.shown_path(res.files['report.md'])}", highlight=False)
    if res.eval_error:
        err.print(f"[yellow]no evaluation in the report: {res.eval_error}[/yellow]", highlight=False)


@app.command("inspect", cls=_Command)
def inspect_cmd(
    model: str = typer.Argument(..., help="Backbone name (resnet50, efficientnet_lite0, timm/<name>...)."),
    strategy: Optional[StrategyChoice] = typer.Option(None, "--strategy", help="Also show what this freeze strategy trains (see freeze-plan)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=16, help="Input size; default: the weights' own."),
    classes: Optional[int] = typer.Option(None, "--classes", min=2, help="Classes of a new head; default: the original head."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Head learning rate (default: the config default)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a backbone's structure: its stages, their modules, output shapes and parameters.

    With --strategy, also which stages are frozen and their learning rates (which strategy to
    pick: cnnft freeze-plan). Built on the meta device: nothing is downloaded or allocated.
    """
    from .recipes import inspect as modelinfo
    res = modelinfo.inspect_model(model, strategy=strategy.value if strategy else None, image_size=image_size,
                                  classes=classes, lr=lr)
    if json_out:
        _print_json(res)
        return
    out.print(tables.stages(res))


@app.command("extract", cls=_Command)
def extract_cmd(
    source: str = typer.Argument(..., help="A checkpoint/run folder, or a backbone name (its pretrained weights)."),
    data: Path = typer.Option(..., "--data", help="Folder of images: one sub-folder per class, or the images directly (unlabelled)."),
    out_file: Path = typer.Option(..., "--out", help="Output .npz file."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes decoding images."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Extract penultimate-layer features of a folder of images into an .npz file.

    The npz holds features (the classifier's input), labels, classes and paths, ready for
    scikit-learn. Images directly in the folder have no class: their label is -1.
    """
    from .recipes import extract as extract_recipe
    res = extract_recipe.extract(source, data, out_file, batch_size=batch_size, device=device, num_workers=workers,
                                 log=_log, show_progress=err.is_terminal and not json_out)
    if json_out:
        _print_json(res.to_dict())
        return
    labels = f"{len(res.classes)} classes" if res.classes else "unlabelled"
    out.print(f"{res.images} images x {res.feature_dim} features ({res.model}, {labels}) -> {res.out}", highlight=False)


class ExportFormat(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"


@app.command("export", cls=_Command)
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint or a run folder."),
    fmt: ExportFormat = typer.Option(..., "--format", help="torchscript or onnx (needs pip install 'cnnft\\[onnx]')."),
    out_file: Path = typer.Option(..., "--out", help="Output file (.pt for TorchScript, .onnx); FILE.json is written beside it."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (never the checkpoint itself)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
) -> None:
    """Export a checkpoint to TorchScript or ONNX, checked against the checkpoint's logits.

    The batch size stays dynamic; the max abs logit difference must be <= 1e-4; classes and
    preprocessing are written to FILE.json beside the export.
    """
    from .recipes import export as export_recipe
    res = export_recipe.export(checkpoint, fmt.value, out_file, force=force)
    if json_out:
        _print_json(res.to_dict())
        return
    out.print(f"wrote {res.out} ({res.export_format}); max abs logit diff vs checkpoint "
              f"{res.max_abs_diff:.2e}; metadata {res.metadata_path}", highlight=False)


@app.command("models", cls=_Command)
def models_cmd(
    filter_text: Optional[str] = typer.Option(
        None, "--filter", help="Only names containing this text, timm's included (loads timm); timm/TEXT: timm's alone."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List backbones with parameter counts, default weights and input size.

    Without --filter, timm's models are not listed (answered without importing torch). A
    filter also searches timm's architecture names, shown as timm/<name>, which loads timm
    and takes a few seconds; --filter timm/convnext lists timm's matches alone.
    """
    from .recipes import backbones
    rows = backbones.list_models(filter_text)
    if json_out:
        _print_json(rows)
        return
    out.print(tables.backbones(rows))
    out.print(f"[dim]{escape(backbones.note(filter_text, rows))}[/dim]")


@app.command("init", cls=_Command)
def init_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Backbone (default: the config default)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of class folders, or one with train/ and val/ inside."),
    out_file: Path = typer.Option(Path("experiment.yaml"), "--out", help="Config file to write (never overwritten)."),
) -> None:
    """Write an annotated starter config (every key explained); never overwrites a file."""
    from .recipes import init as starter
    path = starter.init(out_file, model=model, data_dir=data)
    out.print(f"wrote {path}; check it with `cnnft validate {path}`, run it with `cnnft train {path}`", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn errors into a message and an exit code."""
    settings = Settings(debug=bool(os.environ.get("CNNFT_DEBUG")))
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with command.make_context("cnnft", args, obj=settings) as ctx:
            command.invoke(ctx)
    except (Exception, KeyboardInterrupt) as exc:
        # the command is over; a further Ctrl-C must not cut its last message short
        with exits.ctrl_c_ignored():
            code = exits.report(exc, settings.debug, exits.command_name(command, args))
        sys.exit(code)



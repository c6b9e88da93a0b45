"""Commands that use a trained model: evaluate, predict, report, inspect, extract, export."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .. import ranges as R
from ..results import tables
from .base import StrategyChoice, _log, _print_json, app, err, number, out
from .helpformat import Command as _Command


class ExportFormat(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"
    hf = "hf"


@app.command("evaluate", cls=_Command)
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (run/checkpoints/best.pt) or a run folder (uses its best.pt)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with one sub-folder per class; default: the run's own --split."),
    split: str = typer.Option("val", "--split", help="The run's own data: val (picked best.pt) or test (data.test)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Results folder; default: RUN/eval/<data name>."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: Optional[int] = number(R.BATCH_SIZE, None, "--batch-size", help="Default: the run's batch size."),
    tta: bool = typer.Option(False, "--tta", help="Average each image's prediction with its mirror's (runs trained with flips)."),
    uncalibrated: bool = typer.Option(False, "--uncalibrated", help="Show raw softmax probabilities instead of the calibrated ones."),
    json_out: bool = typer.Option(False, "--json", help="Print all results as JSON."),
) -> None:
    """Evaluate a trained model: accuracy, loss, per-class F1, confusion matrix, worst errors.

    Everything comes from the checkpoint (no config needed); results go to RUN/eval/<data>/.
    """
    from ..recipes import evaluate as evaluate_recipe
    if data is not None and split != "val":
        raise typer.BadParameter("choose one of --data and --split test")
    res = evaluate_recipe.evaluate(checkpoint, data_dir=data, split=split, out_dir=out_dir, device=device, batch_size=batch_size, tta=tta,
                                   uncalibrated=uncalibrated, log=_log, show_progress=err.is_terminal and not json_out)
    if json_out:
        _print_json(res.to_dict())
        return
    for renderable in tables.evaluation(res):
        out.print(renderable, highlight=False)


@app.command("predict", cls=_Command)
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint, a run folder, an exported model.onnx / model.pt "
                                      "(with the FILE.json export wrote beside it), or a timm model folder (--format hf)."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (walked recursively)."),
    top_k: int = number(R.TOP_K, 5, "--top-k", help="Classes shown per image."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    csv_out: bool = typer.Option(False, "--csv", help="Print CSV (path, class, prob, class_2, prob_2, ..., error)."),
    batch_size: int = number(R.BATCH_SIZE, 32, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    workers: int = number(R.WORKERS, 0, "--workers", help="Processes decoding images."),
    tta: bool = typer.Option(False, "--tta", help="Average each image's prediction with its mirror's (runs trained with flips)."),
    uncalibrated: bool = typer.Option(False, "--uncalibrated", help="Show raw softmax probabilities instead of the calibrated ones."),
) -> None:
    """Predict the classes of image files and folders.

    Unreadable files are reported (stderr and an error field) but not fatal; the exit code
    is 2 only when no file could be read.
    """
    from ..recipes import predict as predict_recipe
    if json_out and csv_out:
        raise typer.BadParameter("choose one of --json and --csv")
    res = predict_recipe.predict(checkpoint, [str(p) for p in images], top_k=top_k, batch_size=batch_size, tta=tta,
                                 uncalibrated=uncalibrated, device=device, num_workers=workers, log=_log,
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
    run_dir: Path = typer.Argument(..., help="A run folder, or a tune folder (NAME-tune: the search and its winner)."),
    device: str = typer.Option("auto", "--device", help="Device for evaluating the best checkpoint if needed."),
    json_out: bool = typer.Option(False, "--json", help="Print the key figures as JSON."),
) -> None:
    """Write RUN/report/: report.html (one file) and report.md with curves, confusion matrices and the worst errors."""
    from ..recipes import report as report_recipe
    res = report_recipe.write_report(run_dir, device=device, log=_log)
    if json_out:
        _print_json(res.to_dict())
        return
    if res.tune:
        t = res.tune
        test = f", test acc {tables.pct(t['test_accuracy'])}" if t["test_accuracy"] is not None else ""
        out.print(f"search {t['folder']}: {t['trials_run']} trials ({t['trials_pruned']} pruned); winner trial "
                  f"{t['winner']}, {t['objective']} {t['winner_value']:.4f}{test}", highlight=False)
    out.print(f"best val acc {tables.pct(res.best_val_acc)} (epoch {res.best_epoch}), final {tables.pct(res.final_val_acc)}, "
              f"{res.epochs} epochs, strategy {res.strategy}")
    out.print(f"report: {tables.shown_path(res.files['report.html'])} (open in a browser), {tables.shown_path(res.files['report.md'])}", highlight=False)
    if res.eval_error:
        err.print(f"[yellow]no evaluation in the report: {res.eval_error}[/yellow]", highlight=False)


@app.command("inspect", cls=_Command)
def inspect_cmd(
    model: str = typer.Argument(..., help="Backbone name (resnet50, efficientnet_lite0, timm/<name>...)."),
    strategy: Optional[StrategyChoice] = typer.Option(None, "--strategy", help="Also show what this freeze strategy trains (see freeze-plan)."),
    image_size: Optional[int] = number(R.IMAGE_SIZE, None, "--image-size", help="Input size; default: the weights' own."),
    classes: Optional[int] = number(R.CLASSES, None, "--classes", help="Classes of a new head; default: the original head."),
    lr: Optional[float] = number(R.LR, None, "--lr", help="Head learning rate (default: the config default)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a backbone's structure: its stages, their modules, output shapes and parameters.

    With --strategy, also which stages are frozen and their learning rates (which strategy to
    pick: cnnft freeze-plan). Built on the meta device: nothing is downloaded or allocated.
    """
    from ..recipes import inspect as modelinfo
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
    batch_size: int = number(R.BATCH_SIZE, 32, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    workers: int = number(R.WORKERS, 0, "--workers", help="Processes decoding images."),
    uncalibrated: bool = typer.Option(False, "--uncalibrated", help="Store raw softmax probabilities instead of the calibrated ones."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (never a file it reads)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Extract penultimate-layer features of a folder of images into an .npz file.

    The npz holds features (the classifier's input), labels, classes and paths, ready for
    scikit-learn; from a checkpoint also the calibrated class probabilities (probs). Images directly in the folder have no class: their label is -1.
    """
    from ..recipes import extract as extract_recipe
    res = extract_recipe.extract(source, data, out_file, batch_size=batch_size, device=device, num_workers=workers,
                                 uncalibrated=uncalibrated, log=_log, show_progress=err.is_terminal and not json_out, force=force)
    if json_out:
        _print_json(res.to_dict())
        return
    labels = f"{len(res.classes)} classes" if res.classes else "unlabelled"
    out.print(f"{res.images} images x {res.feature_dim} features ({res.model}, {labels}) -> {res.out}", highlight=False)


@app.command("export", cls=_Command)
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint or a run folder."),
    fmt: ExportFormat = typer.Option(..., "--format", help="torchscript, onnx (needs pip install 'cnnft\\[onnx]') or hf "
                                     "(a timm / Hugging Face model folder)."),
    out_file: Path = typer.Option(..., "--out", help="Output file (.pt for TorchScript, .onnx; FILE.json is written beside it), "
                                  "or a folder for hf."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output (never the checkpoint itself)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
) -> None:
    """Export a checkpoint to TorchScript, ONNX or a timm / Hugging Face folder, checked against the checkpoint's logits.

    The batch size stays dynamic; the max abs logit difference must be <= 1e-4; classes and
    preprocessing are written to FILE.json beside the export. --format hf writes timm's Hub
    layout (config.json, model.safetensors): timm.create_model("local-dir:DIR", pretrained=True) loads it.
    """
    from ..recipes import export as export_recipe
    res = export_recipe.export(checkpoint, fmt.value, out_file, force=force, log=_log)
    if json_out:
        _print_json(res.to_dict())
        return
    out.print(f"wrote {res.out} ({res.export_format}); max abs logit diff vs checkpoint "
              f"{res.max_abs_diff:.2e}; metadata {res.metadata_path}", highlight=False)
    if res.export_format == "hf":
        out.print(f'load it with timm.create_model("local-dir:{res.out}", pretrained=True)', highlight=False)

"""The `cnnft` command line: parse arguments, call one library function, print.

Errors are mapped to a message and an exit code in one place (:func:`main`): 0 success,
2 bad input, 1 anything else, 130/143 after SIGINT/SIGTERM with a resumable checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, api
from .errors import CnnftError

app = typer.Typer(
    name="cnnft",
    help="Transfer learning for image classifiers: pretrained backbone, new head, "
    "a freeze strategy by dataset size x similarity, one command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console(soft_wrap=True)  # results (stdout)
err = Console(stderr=True)  # messages (stderr)
_state = {"debug": bool(os.environ.get("CNNFT_DEBUG"))}


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        out.print(f"cnnft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        _state["debug"] = True


class Size(str, Enum):
    small = "small"
    large = "large"


class YesNo(str, Enum):
    yes = "yes"
    no = "no"


class StrategyChoice(str, Enum):
    full = "full"
    freeze_early = "freeze_early"
    freeze_most = "freeze_most"
    head_only = "head_only"


@app.command()
def validate(
    config: Path = typer.Argument(..., help="Experiment YAML file."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides."),
    json_out: bool = typer.Option(False, "--json", help="Print the resolved config as JSON."),
) -> None:
    """Check a config and print it fully resolved (defaults filled in), or every error in it."""
    resolved = api.resolve_config(config, overrides or [])
    if json_out:
        _print_json(resolved)
    else:
        import yaml

        out.print(yaml.safe_dump(resolved, sort_keys=False).rstrip(), markup=False, highlight=False)
        err.print(f"[green]config OK[/green]: {config}")


@app.command("freeze-plan")
def freeze_plan(
    size: Optional[Size] = typer.Option(None, "--size", help="Dataset size class."),
    similar: Optional[YesNo] = typer.Option(None, "--similar", help="Is the data similar to ImageNet?"),
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Training images (derives --size)."),
    classes: Optional[int] = typer.Option(None, "--classes", min=1, help="Number of classes (derives --size; sizes the head)."),
    model: Optional[str] = typer.Option(None, "--model", help="Show the per-stage plan for this backbone."),
    strategy: Optional[StrategyChoice] = typer.Option(None, "--strategy", help="Use this strategy instead of the recommendation."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Head learning rate (default: the config default)."),
    frozen_stages: Optional[int] = typer.Option(None, "--frozen-stages", min=0, help="freeze_early: stages after the stem to freeze."),
    trainable_stages: Optional[int] = typer.Option(None, "--trainable-stages", min=0, help="freeze_most: last stages that train."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Recommend a freeze strategy from dataset size x similarity; with --model, show exactly
    which stages are frozen, their parameter counts and learning rates.

    Size: "large" means at least 1000 training images per class on average (--images/--classes).
    """
    plan = api.freeze_plan(
        size=size.value if size else None,
        similar=None if similar is None else similar == YesNo.yes,
        images=images,
        classes=classes,
        model=model,
        strategy=strategy.value if strategy else None,
        lr=lr,
        frozen_stages=frozen_stages,
        trainable_stages=trainable_stages,
    )
    if json_out:
        _print_json(plan)
        return
    quadrant = f"{plan['size'] or '?'} dataset, {'similar to' if plan['similar'] else 'different from'} ImageNet" \
        if plan["similar"] is not None else f"{plan['size'] or '?'} dataset"
    out.print(f"[bold]{quadrant}[/bold] -> strategy [bold cyan]{plan['strategy']}[/bold cyan]")
    out.print(plan["rationale"])
    if plan.get("size_rule"):
        out.print(f"[dim]{plan['size_rule']}[/dim]")
    if "stages" in plan:
        t = Table(title=f"{plan['model']} ({plan['num_classes']} classes)")
        t.add_column("stage")
        t.add_column("state")
        t.add_column("params", justify="right")
        t.add_column("lr", justify="right")
        for s in plan["stages"]:
            t.add_row(s["name"], "[blue]frozen[/blue]" if s["frozen"] else "[green]trainable[/green]",
                      f"{s['params']:,}", "-" if s["lr"] is None else f"{s['lr']:.2g}")
        t.add_section()
        t.add_row("total", f"{plan['trainable_params']:,} trainable", f"{plan['total_params']:,}", "")
        out.print(t)
        out.print("[dim]BatchNorm in frozen stages stays in eval mode (running statistics unchanged).[/dim]")


@app.command()
def train(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file (optional with --resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. train.lr=0.01"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder (may extend train.epochs)."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar: one plain line per epoch."),
) -> None:
    """Fine-tune a pretrained backbone on your images and write a run folder
    (config, freeze plan, metrics.csv, summary.json, checkpoints/best.pt and last.pt)."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `cnnft train --resume RUN train.epochs=5`
        config = None
    if config is None and resume is None:
        raise typer.BadParameter("give a CONFIG file, or --resume RUN_DIR", param_hint="CONFIG")
    if config is not None and resume is not None:
        raise typer.BadParameter("give either CONFIG or --resume RUN_DIR (the run keeps its own config)")
    summary = api.train(config, overrides, resume=resume, log=lambda m: err.print(m, highlight=False, markup=False),
                        progress_bar=err.is_terminal and not quiet and not json_out)
    if json_out:
        _print_json(summary)
    else:
        out.print(f"[bold]best val acc {summary['best_val_acc']:.4f}[/bold] (epoch {summary['best_epoch']}), "
                  f"final {summary['final_val_acc']:.4f}, {summary['wall_seconds']:.0f}s -> {summary['run_dir']}")


def main() -> None:
    """Entry point: run the app and turn errors into a message and an exit code."""
    try:
        app(standalone_mode=True)
    except CnnftError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        err.print(Text.assemble(("error: ", "bold red"), exc.message), highlight=False)
        if exc.hint:
            err.print(Text.assemble(("hint: ", "yellow"), exc.hint), highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: a message, not a traceback
        if _state["debug"]:
            raise
        err.print(Text.assemble(("internal error: ", "bold red"), f"{type(exc).__name__}: {exc}"), highlight=False)
        err.print("[dim]run again with --debug for the traceback, and please report it[/dim]")
        sys.exit(1)


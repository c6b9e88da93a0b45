"""Tables and CSV for results shown at a terminal (rich), one renderer per result type."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import IO

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def shown_path(path: str | Path, base: str | Path | None = None) -> str:
    """``path`` relative to ``base`` (default: the current folder) when it lies inside it, else as
    given: a run folder under ./runs reads runs/x, not /home/.../runs/x. JSON keeps full paths."""
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path(base if base is not None else Path.cwd()).resolve())
    except (ValueError, OSError):
        return str(path)
    return str(rel) if str(rel) != "." else str(path)


def _images_root(paths: list[str]) -> str | None:
    """The folder that holds the class folders of ``paths`` (their common grand-parent), if any."""
    try:
        root = os.path.commonpath([str(Path(p).parent.parent) for p in paths])
    except ValueError:  # relative and absolute mixed, or none
        return None
    return root if root not in ("", os.sep) else None


def evaluation(res) -> list:
    """Headline, per-class table, confusion matrix (up to 12 classes) and the worst errors."""
    shown: list = [
        Text.from_markup(f"[bold]{escape(res.model)}[/bold] {escape(shown_path(res.checkpoint))} (epoch {res.epoch}) "
                         f"on {escape(shown_path(res.data))}: {res.images} images"),
        Text.from_markup(f"accuracy [bold]{pct(res.accuracy)}[/bold]"
                         + (f"   top-5 {pct(res.top5_accuracy)}" if res.top5_accuracy is not None else "")
                         + f"   loss {res.loss:.4f}"),
    ]
    if res.calibration:
        shown.append(Text(calibration_line(res.calibration)))
    t = Table(title="per class")
    for col in res.PER_CLASS_COLUMNS:
        t.add_column(col, justify="left" if col == "class" else "right")
    per_class, averages = res.per_class_table()
    for name, *cells in per_class:
        t.add_row(escape(name), *cells)
    t.add_section()
    for row in averages:
        t.add_row(*row)
    shown.append(t)
    classes = res.classes
    if len(classes) <= 12:
        cm = Table(title="confusion matrix (rows: true, columns: predicted)")
        cm.add_column("")
        for c in classes:
            cm.add_column(escape(c), justify="right")
        for i, (c, row) in enumerate(zip(classes, res.confusion_matrix)):
            cm.add_row(escape(c), *(f"[bold]{v}[/bold]" if i == j else str(v) for j, v in enumerate(row)))
        shown.append(cm)
    if res.confident_errors:
        worst = res.confident_errors[:10]
        root = _images_root([r["path"] for r in worst])
        e = Table(title="most confidently wrong" + (f" (in {escape(shown_path(root))})" if root else ""))
        for col in ("image", "true", "predicted", "prob"):
            e.add_column(col, justify="right" if col == "prob" else "left", overflow="fold")
        for r in worst:
            e.add_row(escape(shown_path(r["path"], root)), escape(r["true"]), escape(r["pred"]), f"{r['prob']:.3f}")
        shown.append(e)
    shown.append(Text(f"results: {shown_path(res.out_dir)}"))
    return shown


def calibration_line(c: dict) -> str:
    """One line on calibration: the temperature, ECE and NLL before and after it, which one is shown."""
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    shown = "calibrated" if c.get("applied", True) else "uncalibrated (--uncalibrated)"
    return (f"calibration: temperature {c['temperature']:.3f}   ECE {f(c['ece_before'])} -> {f(c['ece_after'])}   "
            f"NLL {f(c['nll_before'])} -> {f(c['nll_after'])}   probabilities shown: {shown}")


def predictions_csv(res, stream: IO[str]) -> None:
    """path, class, prob, class_2, prob_2, ..., error: one row per image."""
    rows, k = res.predictions, res.top_k
    w = csv.writer(stream, lineterminator="\n")
    w.writerow(["path", "class", "prob"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("class", "prob")] + ["error"])
    for r in rows:
        cells = [r["path"]]
        for i in range(k):
            top = r["top_k"][i] if i < len(r["top_k"]) else None
            cells += [top["class"], f"{top['prob']:.6f}"] if top else ["", ""]
        w.writerow(cells + [r["error"] or ""])


def predictions(res) -> Table:
    """One row per image: the top class, its probability and the next ones (or the error)."""
    rows, k = res.predictions, res.top_k
    t = Table(title=f"{res.model}: top {k}")
    t.add_column("image", overflow="fold")
    t.add_column("prediction")
    t.add_column("prob", justify="right")
    if k > 1:
        t.add_column("next")
    for r in rows:
        if r["error"]:
            t.add_row(escape(r["path"]), f"[red]error: {escape(r['error'])}[/red]", "", *([""] if k > 1 else []))
            continue
        rest = escape(", ".join(f"{p['class']} {p['prob']:.3f}" for p in r["top_k"][1:]))
        t.add_row(escape(r["path"]), escape(r["class"]), f"{r['prob']:.3f}", *([rest] if k > 1 else []))
    return t


def stages(res: dict) -> Table:
    """A backbone's stages: modules, output shape, parameters; with a strategy, also frozen
    or trainable and the learning rate."""
    planned = res["strategy"] is not None
    title = f"{res['model']} at {res['image_size']}x{res['image_size']}"
    t = Table(title=title + (f", strategy {res['strategy']}" if planned else ""),
              caption=None if planned else "--strategy S shows what a freeze strategy trains")
    t.add_column("stage")
    t.add_column("modules", overflow="fold")
    t.add_column("output shape", no_wrap=True)
    t.add_column("params", justify="right", no_wrap=True)
    if planned:
        t.add_column("state", no_wrap=True)
        t.add_column("lr", justify="right")
    for s in res["stages"]:
        runs = compact_names(s["modules"])
        shown = ", ".join(runs[:3]) + (f" +{len(runs) - 3}" if len(runs) > 3 else "")
        cells = [s["name"], shown, "-" if s["output_shape"] is None else "x".join(map(str, s["output_shape"])),
                 f"{s['params']:,}"]
        if planned:
            cells += ["[blue]frozen[/blue]" if s["frozen"] else "[green]trainable[/green]",
                      "-" if s["lr"] is None else f"{s['lr']:.2g}"]
        t.add_row(*cells)
    t.add_section()
    t.add_row("total", "", "", f"{res['total_params']:,}", *([f"{res['trainable_params']:,} train", ""] if planned else []))
    return t


def compact_names(names: list[str]) -> list[str]:
    """Runs of numbered siblings shown as one: blocks.0, blocks.1, blocks.2 -> blocks.0..2."""
    runs: list[list] = []  # [prefix, first, last] or [name, None, None]
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if m and runs and runs[-1][0] == m.group(1) and runs[-1][2] == int(m.group(2)) - 1:
            runs[-1][2] = int(m.group(2))
        elif m:
            runs.append([m.group(1), int(m.group(2)), int(m.group(2))])
        else:
            runs.append([name, None, None])
    return [p if a is None else f"{p}{a}" if a == b else f"{p}{a}..{b}" for p, a, b in runs]


def preflight(res) -> list[Text]:
    """What ``validate`` found, one line per check: classes per split, weights, input size,
    device, run folder, then the notes."""
    lines = []
    for split, counts in res.classes.items():
        shown = ", ".join(f"{c} {n}" for c, n in list(counts.items())[:12]) + (" ..." if len(counts) > 12 else "")
        lines.append(Text(f"{split}: {len(counts)} classes, {sum(counts.values()):,} images ({shown})"))
    if res.weights is not None:
        w = res.weights
        where = f" {w['path']}" if w["path"] else ""
        lines.append(Text(f"model: {res.model}, weights {w['status']}: {w['detail']}{where}"))
    if res.image_size is not None:
        lines.append(Text(f"input: {res.image_size} px (the model accepts from {res.min_image_size} px)"))
    if res.device is not None:
        auto = " (CUDA when present, else Apple MPS, else CPU: picked when the run starts)" if res.device == "auto" else ""
        lines.append(Text(f"device: {res.device}{auto}"))
    if res.run_dir is not None:
        lines.append(Text(f"run folder: {res.run_dir}"))
    lines += [Text.assemble(("note: ", "yellow"), n) for n in res.notes]
    return lines


def models(rows: list[dict], note: str | None = None) -> Table:
    """The backbone list: parameters, default weights, input size, ImageNet-1K top-1, GFLOPs
    and whether the weights are here without network (packaged or cached). The source is in
    the name (timm/...) and in --json."""
    t = Table(title="backbones", caption=note, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "params", "default weights", "px", "top-1", "GFLOPs", "offline"):
        t.add_column(col, justify="right" if col in ("params", "px", "top-1", "GFLOPs") else "left",
                     no_wrap=col != "default weights", overflow="fold", min_width=13 if col == "default weights" else None)
    for r in rows:
        t.add_row(escape(r["name"]), "-" if r["params"] is None else f"{r['params']:,}",
                  escape(r["default_weights"]), str(r["input_size"]),
                  "-" if r["imagenet_acc1"] is None else f"{r['imagenet_acc1']:.1f}",
                  "-" if r["gflops"] is None else f"{r['gflops']:.2f}",
                  "[green]yes[/green]" if r["offline"] else "no")
    return t


def freeze_plan(advice) -> Table:
    """The plan per stage: frozen or trainable, parameters, learning rate."""
    n = f"{advice.num_classes} classes" + (" (default; --classes N)" if advice.classes_defaulted else "")
    t = Table(title=f"{escape(advice.model)}: {n}")
    t.add_column("stage")
    t.add_column("state")
    t.add_column("params", justify="right")
    t.add_column("lr", justify="right")
    for s in advice.plan.stages:
        t.add_row(s.name, "[blue]frozen[/blue]" if s.frozen else "[green]trainable[/green]",
                  f"{s.params:,}", "-" if s.lr is None else f"{s.lr:.2g}")
    t.add_section()
    t.add_row("total", f"{advice.plan.trainable_params:,} trainable", f"{advice.plan.total_params:,}", "")
    return t


def similarity(advice) -> Table:
    """The evidence of a measured similarity: the linear probe's accuracy per stage."""
    m, sample = advice.measured, advice.sample
    t = Table(title=f"linear probe per stage: {sample['images']} images (at most {sample['per_class']} per class, "
              f"seed {sample['seed']}), {sample['folds']}-fold, {sample['image_size']} px",
              caption=f"{sample['forward_seconds']:.0f}s forward, {sample['seconds']:.0f}s in all")
    for col in ("stage", "width", "accuracy", "+-", "seconds"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in m.stages:
        name = f"[bold]{s.name}[/bold] (peak)" if s.name == m.peak else s.name
        t.add_row(name, str(s.width), f"{s.acc_mean:.3f}", f"{s.acc_std:.3f}", f"{s.seconds:.1f}")
    return t


def backbones(rows: list[dict]) -> Table:
    """``cnnft models``: name, parameters, default weights, input size, ImageNet-1K top-1 and
    GFLOPs of the default weights, and whether they are at hand offline."""
    t = Table(title="backbones", caption="top-1: ImageNet-1K accuracy of the default weights (%); "
              "offline: packaged or in the cache, no download needed")
    for col in ("name", "params", "default weights", "input", "top-1", "GFLOPs", "offline"):
        t.add_column(col, justify="left" if col in ("name", "default weights") else "right", no_wrap=col == "name")
    for r in rows:
        params = r.get("params")
        acc, gf, off = r.get("imagenet_acc1"), r.get("gflops"), r.get("offline")
        t.add_row(r["name"], "-" if params is None else f"{params:,}", str(r["default_weights"]),
                  "-" if r["input_size"] is None else str(r["input_size"]),
                  "-" if acc is None else f"{acc:.1f}", "-" if gf is None else f"{gf:.2f}",
                  "-" if off is None else ("yes" if off else "no"))
    return t


def check_summary(res: dict) -> list[str]:
    """``cnnft check``'s terminal summary: one line per kind of finding, the worst examples, where the files are."""
    s, classes = res["summary"], res["classes"]
    lines = [f"{res['data']}: {s['images']} images ({', '.join(f'{k} {v}' for k, v in res['splits'].items())}), "
             f"{len(classes)} classes; features {res['model']} at {res['image_size']} px; {res['seconds']:.1f}s"]
    lines.append(f"leaks across splits: {s['leaks']}" + "".join(
        f"\n  {lk['kind']}: " + " = ".join(f"{m['path']} [{m['split']}]" for m in lk["images"][:3])
        for lk in res["leaks"][:5]))
    lines.append(f"exact duplicate groups: {s['exact_duplicate_groups']}   near-duplicate pairs "
                 f"(similarity >= {res['near_threshold']}): {s['near_duplicate_pairs']}")
    lines.append(f"likely label errors: {s['label_issues']}" + "".join(
        f"\n  {r['path']}: given {r['given_label']}, suggested {r['suggested_label']} (score {r['score']:.3f})"
        for r in res["label_issues"][:10]))
    b = res["balance"]
    lines.append(f"classes: largest/smallest {b['ratio']}" + (f"; few images: {', '.join(b['small_classes'][:10])}"
                                                               if b["small_classes"] else ""))
    lines.append(f"unreadable: {s['unreadable']}   smaller than {res['image_size']} px: {s['small_images']}   "
                 f"colour modes: {', '.join(f'{m} {n}' for m, n in res['colour_modes'].items())}")
    if res.get("files"):
        lines.append(f"details: {res['files']['check.html']} (open in a browser), {res['files']['check.json']}")
    return lines

"""The report's two renderings of one content: ``report.md`` (links the PNGs beside it) and
``report.html`` (a single file with the pictures embedded, to open in a browser or send)."""

from __future__ import annotations

import base64
import html as _html
from pathlib import Path

from .evaluation import PER_CLASS_COLUMNS, Evaluation
from . import tune_report as tr
from .report_data import Report
from .tune_report import TuneSection

FIGURES = (  # (file stem, section it belongs to, alt text)
    ("loss", "curves", "loss"),
    ("accuracy", "curves", "accuracy"),
    ("learning_rate", "curves", "learning rate per parameter group"),
    ("confusion_matrices", "eval", "confusion matrix, row-normalised and counts"),
    ("reliability", "eval", "reliability diagram: accuracy against confidence, before and after calibration"),
    ("top_errors", "errors", "most confidently wrong validation images"),
    ("confused_pairs", "pairs", "most confused class pairs"),
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _figures(rep: "Report", section: str) -> list[tuple[str, str]]:
    return [(f"{stem}.png", alt) for stem, sec, alt in FIGURES if sec == section and f"{stem}.png" in rep.files]


def _key_figures(rep: "Report") -> list[tuple[str, str]]:
    rows = [("status", rep.status + (f": {rep.error}" if rep.error else "")),
            ("best val accuracy", f"{_pct(rep.best_val_acc)} (epoch {rep.best_epoch})"),
            ("final val accuracy", _pct(rep.final_val_acc))]
    if rep.eval_accuracy is not None:
        rows.append(("macro F1 (best checkpoint)", f"{rep.macro_f1:.4f}"))
    if rep.eval_error:
        rows.append(("evaluation", f"not available: {rep.eval_error}"))
    return rows


def _eval_line(ev: Evaluation) -> str:
    return (f"Accuracy {_pct(ev.accuracy)}"
            + (f", top-5 {_pct(ev.top5_accuracy)}" if ev.top5_accuracy is not None else "")
            + f", loss {ev.loss:.4f}, macro F1 {ev.macro_avg['f1']:.4f} over {ev.images} images "
            f"({Path(ev.checkpoint).name}, epoch {ev.epoch}, on {ev.data})." + _calibration_line(ev))


def _calibration_line(ev: Evaluation) -> str:
    c = ev.calibration
    if not c or c.get("ece_before") is None:
        return ""
    return (f" Calibration: temperature {c['temperature']:.3f}, expected calibration error {c['ece_before']:.4f} "
            f"-> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}.")


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


def _title(rep: "Report", tune: TuneSection | None) -> str:
    return f"Tune report: {tune.folder}" if tune else f"Run report: {rep.run}"


def _md_cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _tune_markdown(t: TuneSection) -> list[str]:
    lines = ["## Search", "", "| | |", "|---|---|", *(f"| {k} | {_md_cell(v)} |" for k, v in tr.key_rows(t)), "",
             tr.HONEST, "", "| " + " | ".join(tr.TRIAL_COLUMNS) + " |", "|---:|---|---:|---:|---:|---|",
             *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in tr.trial_rows(t)), ""]
    alts = dict(tr.PLOTS)
    lines += [f"![{alts[n]}]({n})\n" for n in t.plots]
    return lines + [f"## The winner: trial {t.winner} ({Path(t.winner_run).name})", ""]


def markdown(rep: "Report", ev: Evaluation | None, errors: list[dict], tune: TuneSection | None = None) -> str:
    """report.md: the search (a tune folder's report), key figures, hyperparameters, curves,
    evaluation, image grids."""
    def table(rows: list[tuple[str, str]]) -> list[str]:
        return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]

    lines = [f"# {_title(rep, tune)}", "", *(_tune_markdown(tune) if tune else []), *table(_key_figures(rep)),
             "## Hyperparameters", "", *table(list(rep.hyperparameters.items()))]
    if rep.class_counts:
        lines += ["| class | train | val |", "|---|---:|---:|",
                  *(f"| {c['class']} | {_num(c['train'])} | {_num(c['val'])} |" for c in rep.class_counts), ""]
    lines += ["## Training curves", ""]
    lines += [f"![{alt}]({name})\n" for name, alt in _figures(rep, "curves")]
    if ev is not None:
        lines += ["## Validation", "", _eval_line(ev), "",
                  "| " + " | ".join(PER_CLASS_COLUMNS) + " |", "|---|---:|---:|---:|---:|"]
        per_class, averages = ev.per_class_table()
        lines += ["| " + " | ".join(cells) + " |" for cells in per_class]
        lines += ["| " + " | ".join([f"*{name}*", *rest]) + " |" for name, *rest in averages]
        lines += ["", *(f"![{alt}]({name})\n" for name, alt in _figures(rep, "eval"))]
        lines += ["Separate files: [counts](confusion_matrix.png), "
                  "[row-normalised](confusion_matrix_normalized.png).", ""]
        if errors:
            lines += ["### Most confidently wrong", "", *(f"![{alt}]({n})\n" for n, alt in _figures(rep, "errors")),
                      "| image | true | predicted | probability |", "|---|---|---|---:|"]
            lines += [f"| {e['path']} | {e['true']} | {e['pred']} | {e['prob']:.3f} |" for e in errors]
            lines.append("")
        if rep.confused_pairs:
            lines += ["### Most confused pairs", "", *(f"![{alt}]({n})\n" for n, alt in _figures(rep, "pairs")),
                      "| true | predicted as | images |", "|---|---|---:|"]
            lines += [f"| {p['true']} | {p['pred']} | {p['count']} |" for p in rep.confused_pairs]
            lines.append("")
        lines.append(f"Full results: `{ev.out_dir}` (metrics.json, predictions.csv, per_class.csv).")
    return "\n".join(lines) + "\n"


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2330; background: #fff; margin: 0 auto;
       max-width: 1180px; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #dde3ee; }
.status { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600;
          background: #d9f2e0; color: #17603a; }
.status.failed, .status.interrupted { background: #fde2e1; color: #8a1c1c; }
table { border-collapse: collapse; margin: 12px 0; } td, th { padding: 4px 12px; border-bottom: 1px solid #e6e9f0; }
th { text-align: left; background: #f3f5fa; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; } .grid figure { margin: 0; }
img { max-width: 100%; border: 1px solid #e6e9f0; border-radius: 4px; }
figcaption { font-size: 13px; color: #5a6477; }
"""


def _esc(v: object) -> str:
    return _html.escape(str(v))


def _table(head: list[str] | None, rows: list[list[str]], numeric_from: int = 99) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{_esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return "\n".join(out + ["</table>"])


def _img(out: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(alt)}</figcaption></figure>")


def _tune_html(t: TuneSection, out: Path) -> list[str]:
    alts = dict(tr.PLOTS)
    return ["<h2>Search</h2>", _table(None, [[k, v] for k, v in tr.key_rows(t)]), f"<p>{_esc(tr.HONEST)}</p>",
            _table(tr.TRIAL_COLUMNS, tr.trial_rows(t)),
            '<div class="grid">' + "".join(_img(out, n, alts[n]) for n in t.plots) + "</div>",
            f"<h2>The winner: trial {t.winner} ({_esc(Path(t.winner_run).name)})</h2>"]


def html(rep: "Report", ev: Evaluation | None, errors: list[dict], out: Path, tune: TuneSection | None = None) -> str:
    """report.html: the same content as report.md in one file, every picture embedded as base64."""
    def figs(section: str) -> str:
        return '<div class="grid">' + "".join(_img(out, n, a) for n, a in _figures(rep, section)) + "</div>"

    body = [f"<h1>{_esc(_title(rep, tune))}</h1>", *(_tune_html(tune, out) if tune else []),
            f'<p><span class="status {_esc(rep.status)}">{_esc(rep.status)}</span> '
            f"{_esc(rep.model)} · {_esc(rep.strategy)} · best val accuracy {_esc(_pct(rep.best_val_acc))} "
            f"(epoch {rep.best_epoch})</p>",
            _table(None, [[k, v] for k, v in _key_figures(rep)]),
            "<h2>Hyperparameters</h2>", _table(None, [[k, v] for k, v in rep.hyperparameters.items()])]
    if rep.class_counts:
        body.append(_table(["class", "train", "val"],
                           [[c["class"], _num(c["train"]), _num(c["val"])] for c in rep.class_counts], 1))
    body += ["<h2>Training curves</h2>", figs("curves")]
    if ev is not None:
        per_class, averages = ev.per_class_table()
        body += ["<h2>Validation</h2>", f"<p>{_esc(_eval_line(ev))}</p>",
                 _table(list(PER_CLASS_COLUMNS), per_class + averages, 1), figs("eval")]
        if errors:
            body += ["<h2>Most confidently wrong</h2>", figs("errors"),
                     _table(["image", "true", "predicted", "probability"],
                            [[e["path"], e["true"], e["pred"], f"{e['prob']:.3f}"] for e in errors], 3)]
        if rep.confused_pairs:
            body += ["<h2>Most confused pairs</h2>", figs("pairs"),
                     _table(["true", "predicted as", "images"],
                            [[p["true"], p["pred"], str(p["count"])] for p in rep.confused_pairs], 2)]
        body.append(f"<p>Full results: <code>{_esc(ev.out_dir)}</code> (metrics.json, predictions.csv, "
                    "per_class.csv).</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>cnnft report: {_esc(tune.folder if tune else rep.run)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")

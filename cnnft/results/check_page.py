"""``check.html``: what ``cnnft check`` found, as one self-contained page (thumbnails embedded as
base64 JPEG), every name and path escaped."""

from __future__ import annotations

import base64
import html as _html
import io
from typing import Callable

from PIL import Image

from .report_page import CSS

SHOWN = 40  # pairs / groups / suspects drawn with thumbnails per section
THUMB = 112  # thumbnail side in pixels

Thumb = Callable[[str], "Image.Image | None"]  # a path -> its image (None: cannot be shown)

PAGE_CSS = CSS + """
.pair { display: flex; gap: 10px; align-items: flex-start; margin: 10px 0; padding: 8px;
        border: 1px solid #e6e9f0; border-radius: 6px; flex-wrap: wrap; }
.pair figure { margin: 0; width: 150px; } .pair img { width: 112px; height: 112px; object-fit: contain; }
.pair .why { font-size: 13px; color: #5a6477; min-width: 180px; }
.leak { border-color: #e0a3a1; background: #fff7f6; } .none { color: #17603a; }
figcaption { word-break: break-all; }
"""


def _esc(v: object) -> str:
    return _html.escape(str(v))


def _thumb_tag(path: str, thumb: Thumb) -> str:
    try:
        img = thumb(path)
    except Exception:  # noqa: BLE001 - an unreadable image is shown as text only
        img = None
    if img is None:
        return '<div class="why">(no preview)</div>'
    img = img.convert("RGB")
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(path)}" src="data:image/jpeg;base64,{data}">'


def _figure(image: dict, caption: str, thumb: Thumb) -> str:
    return f"<figure>{_thumb_tag(image['path'], thumb)}<figcaption>{_esc(caption)}</figcaption></figure>"


def _short(path: str) -> str:
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _images_row(images: list[dict], classes: list[str], why: str, thumb: Thumb, leak: bool) -> str:
    figs = "".join(_figure(m, f"[{m['split']}] {classes[m['label']]}: {_short(m['path'])}", thumb) for m in images)
    return f'<div class="pair{" leak" if leak else ""}">{figs}<div class="why">{_esc(why)}</div></div>'


def _table(head: list[str], rows: list[list[object]]) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _section(title: str, count: int, rows: list[str], empty: str, listed: int | None = None) -> list[str]:
    """A section's heading with its count and its first rows; ``listed``: how many check.json holds."""
    where = "all in check.json" if listed is None or listed >= count else f"the {listed:,} most similar in check.json"
    more = f" (first {SHOWN} shown; {where})" if count > SHOWN else ""
    return [f"<h2>{_esc(title)}: {count}</h2>",
            *(rows or [f'<p class="none">{_esc(empty)}</p>']), *([f"<p>{_esc(more)}</p>"] if more else [])]


def html(res: dict, thumb: Thumb) -> str:
    """check.html from ``check.json``'s content; ``thumb`` opens an image for its thumbnail."""
    classes, s = res["classes"], res["summary"]
    body = [f"<h1>Data check: {_esc(res['data'])}</h1>",
            f"<p>{s['images']} images in {_esc(', '.join(f'{k} {v}' for k, v in res['splits'].items()))}; "
            f"features: {_esc(res['model'])} at {res['image_size']} px; {res['seconds']:.1f}s</p>",
            _table(["finding", "count"], [[k.replace("_", " "), v] for k, v in s.items()])]
    leaks = [_images_row(lk["images"], classes, f"{lk['kind']} copy across splits"
                         + (f", similarity {lk['similarity']:.3f}" if "similarity" in lk else ""), thumb, True)
             for lk in res["leaks"][:SHOWN]]
    body += _section("Leaks (the same image in more than one split)", s["leaks"], leaks, "no leaks found",
                     len(res["leaks"]))
    exact = [_images_row(g["images"], classes, f"{len(g['images'])} identical images", thumb, g["leak"])
             for g in res["exact_duplicates"][:SHOWN]]
    body += _section("Exact duplicates (identical pixels)", len(res["exact_duplicates"]), exact, "none found")
    near = [_images_row([p["a"], p["b"]], classes, f"cosine similarity {p['similarity']:.3f}", thumb, p["leak"])
            for p in res["near_duplicates"][:SHOWN]]
    body += _section(f"Near-duplicates (similarity >= {res['near_threshold']})", res["near_duplicate_pairs"], near,
                     "none found", len(res["near_duplicates"]))
    labels = [_images_row([{"split": r["split"], "path": r["path"], "label": r["given"]}], classes,
                          f"given: {r['given_label']} / suggested: {r['suggested_label']} "
                          f"(score {r['score']:.3f})", thumb, False) for r in res["label_issues"][:SHOWN]]
    body += _section("Likely label errors (confident learning, out-of-fold)", len(res["label_issues"]), labels,
                     "none found")
    body += _details(res)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>cnnft check: {_esc(res['data'])}</title><style>{PAGE_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _details(res: dict) -> list[str]:
    classes = res["classes"]
    counts = res["class_counts"]
    rows = [[c, *(counts[sp][c] for sp in counts), res["balance"]["counts"][c]] for c in classes]
    out = ["<h2>Classes</h2>", _table(["class", *counts, "all"], rows),
           f"<p>largest / smallest class: {_esc(res['balance']['ratio'])}</p>",
           "<h2>Colour modes</h2>", _table(["mode", "images"], [[m, n] for m, n in res["colour_modes"].items()])]
    if res["small_images"]:
        out += [f"<h2>Smaller than the model's input ({res['image_size']} px): {len(res['small_images'])}</h2>",
                _table(["split", "image", "size", "below the model's minimum"],
                       [[r["split"], r["path"], f"{r['width']}x{r['height']}", r["below_model_minimum"]]
                        for r in res["small_images"][:200]])]
    if res["unreadable"]:
        out += [f"<h2>Unreadable: {len(res['unreadable'])}</h2>",
                _table(["split", "file", "reason"], [[r["split"], r["path"], r["reason"]] for r in res["unreadable"]])]
    return out

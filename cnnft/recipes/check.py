"""``cnnft check``: look at a data set before training on it.

resolve the data (a folder of class folders, a train/val/test layout, or a config's data
section) -> decode every image once (exact duplicates by pixel hash, sizes, colour modes,
unreadable files) -> the frozen backbone's pooled features, through the feature cache
(near-duplicates by cosine similarity; cross-split pairs are leaks) -> out-of-fold linear heads
on those features (likely label errors by confident learning) -> check.json and check.html.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import config as config_mod
from .. import files, models
from ..config import Config
from ..data import duplicates
from ..data import folders as data
from ..errors import DataError, InputError
from ..results import check_page, datacheck
from ..run import build, cached, phases
from ..training import runtime

Log = Callable[[str], None]
FINDINGS = ("leak", "duplicates", "labels")  # what --fail-on can name
FOLDS = 5  # out-of-fold heads for the label check
LABEL_L2 = 1e-2  # the heads' L2 strength (mean-loss scale) on standardised features
DEFAULT_MODEL = "efficientnet_lite0"  # its ImageNet weights ship with cnnft: no download
SPLIT_NAMES = ("train", "val", "test")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found; ``to_dict()`` is ``check.json`` and ``--json``."""

    data: str
    model: str
    image_size: int
    classes: list[str]
    splits: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    balance: dict
    unreadable: list[dict]
    small_images: list[dict]
    colour_modes: dict[str, int]
    exact_duplicates: list[dict]
    near_duplicates: list[dict]
    near_duplicate_pairs: int
    near_threshold: float
    leaks: list[dict]
    label_issues: list[dict]
    summary: dict[str, int]
    seconds: float
    out_dir: str | None = None
    files: dict[str, str] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def failed(self, fail_on: list[str]) -> list[str]:
        """The finding kinds among ``fail_on`` that were found."""
        found = {"leak": self.summary["leaks"], "duplicates": self.summary["exact_duplicate_groups"]
                 + self.summary["near_duplicate_pairs"], "labels": self.summary["label_issues"]}
        return [k for k in fail_on if found[k]]


def parse_fail_on(text: str | None) -> list[str]:
    """``--fail-on leak,duplicates,labels`` as a list; an unknown name is an InputError."""
    if not text:
        return []
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FINDINGS]
    if bad:
        raise InputError(f"--fail-on: unknown finding {bad[0]!r}; use a comma-separated list of {', '.join(FINDINGS)}")
    return kinds


def check(target: str | Path, *, model: str | None = None, image_size: int | None = None,
          out_dir: str | Path | None = None, device: str = "auto", near_threshold: float | None = None,
          log: Log = _stderr, show_progress: bool = False) -> CheckResult:
    """Check a data set for leaks, duplicates, likely label errors and other problems; write
    ``check.json`` and ``check.html`` into ``out_dir`` (default ``check/<name>``)."""
    t0 = time.perf_counter()
    thr = datacheck.NEAR_DUPLICATE_THRESHOLD if near_threshold is None else near_threshold
    if not 0 < thr <= 1:
        raise InputError(f"--near-threshold must be in (0, 1] (got {thr})")
    cfg, name, classes, splits, skipped = _resolve(Path(target).expanduser(), model, image_size)
    out = Path(out_dir).expanduser() if out_dir is not None else Path("check") / name
    infos = duplicates.scan(splits)
    unreadable = skipped + [{"split": s, "path": splits[s].ids[i], "reason": info.error}
                            for s in splits for i, info in enumerate(infos[s]) if info.error]
    exact = duplicates.exact_groups(splits, infos)
    readable = {s: src.subset([i for i, info in enumerate(infos[s]) if info.error is None]) for s, src in splits.items()}
    bb = build.setup_backbone(cfg, len(classes))
    rt = runtime.make_runtime(device, cfg.train.amp, cfg.train.channels_last, "--device")
    rt.prepare(bb.model)
    feats = {s: cached.pooled_features(cfg, bb, src, rt, log, show_progress) for s, src in readable.items() if len(src)}
    index = [(s, i) for s in feats for i in range(len(readable[s]))]
    x = torch.cat(list(feats.values())) if feats else torch.zeros(0, 0)
    near = _near(x, index, readable, exact, thr)
    labels = _label_issues(x, index, readable, classes, cfg.seed, log)
    result = _result(cfg, name, classes, splits, infos, bb, unreadable, exact, near, thr, labels, t0)
    return _write(result, out, readable, classes)


def _resolve(target: Path, model: str | None, image_size: int | None) -> tuple[Config, str, list[str], dict, list]:
    """(config, name, classes, splits, files the config's data left out as unreadable) for a config
    file, a train/val/test layout or a class-folder tree."""
    if target.is_file():
        cfg = config_mod.load(target)
        if model is not None:
            cfg.model.backbone, cfg.model.weights = model, "DEFAULT"
        if image_size is not None:
            cfg.data.image_size = image_size
        cfg.data.on_bad_image = "skip"  # an unreadable file is a finding here, not a stop
        bundle = data.build_data(cfg.data, cfg.seed)
        skipped = [{"split": "", "path": p, "reason": r} for p, r in bundle.skipped + bundle.test_skipped]
        return cfg, target.stem, bundle.classes, duplicates.bundle_splits(bundle), skipped
    if not target.is_dir():
        raise InputError(f"{target}: not a folder or a config file",
                         hint="pass a folder of class folders, a folder with train/ val/ (test/), or a config .yaml")
    raw = {"data": {"image_size": image_size}, "model": {"backbone": model or DEFAULT_MODEL}}
    cfg = config_mod.validate(raw, source=str(target))
    layout = [s for s in SPLIT_NAMES if (target / s).is_dir()]
    if "train" not in layout:
        layout = []
    roots = {s: target / s for s in layout} or {"all": target}
    classes: list[str] | None = None
    splits = {}
    for s, root in roots.items():
        found, paths, ys = data.scan_folder(root, str(root))
        if classes is None:
            classes = found
        index = {c: k for k, c in enumerate(classes)}
        missing = [c for c in found if c not in index]
        if missing:
            raise DataError(f"{root}: class folder(s) {', '.join(missing[:5])} are not in {roots[layout[0]]}",
                            hint="every split needs the same class folders")
        paths_s = [str(p) for p in paths]
        splits[s] = data.Source(paths_s, [index[found[y]] for y in ys],
                                lambda i, draft=None, ps=paths_s: data.open_image(ps[i], draft))
    return cfg, target.resolve().name, list(classes or []), splits, []


@dataclass
class _NearPairs:
    """Near-duplicate pairs (exact copies left out): the most similar listed, all counted."""

    listed: list[dict]  # the PAIRS_LISTED most similar pairs
    count: int
    leaks: list[dict]  # the PAIRS_LISTED most similar pairs across splits
    leak_count: int


def _near(x: torch.Tensor, index: list[tuple[str, int]], readable: dict, exact: list[dict], thr: float) -> _NearPairs:
    """Near-duplicate pairs above ``thr`` that are not already exact copies."""
    if len(x) < 2:
        return _NearPairs([], 0, [], 0)
    position = {(s, readable[s].ids[i]): k for k, (s, i) in enumerate(index)}
    group = np.full(len(index), -1, dtype=np.int64)  # each image's exact-copy group, if any
    for g, found in enumerate(exact):
        for m in found["images"]:
            if (m["split"], m["path"]) in position:
                group[position[(m["split"], m["path"])]] = g
    split_codes = {s: k for k, s in enumerate(dict.fromkeys(s for s, _ in index))}
    split = np.array([split_codes[s] for s, _ in index])
    a, b, sim = datacheck.similar_pairs(x.numpy(), thr)
    keep = ~((group[a] == group[b]) & (group[a] >= 0))
    a, b, sim = a[keep], b[keep], sim[keep]
    leak = split[a] != split[b]

    def pair(k: int) -> dict:
        (sa, ia), (sb, ib) = index[a[k]], index[b[k]]
        return {"a": {"split": sa, "path": readable[sa].ids[ia], "label": readable[sa].labels[ia]},
                "b": {"split": sb, "path": readable[sb].ids[ib], "label": readable[sb].labels[ib]},
                "similarity": round(float(sim[k]), 4), "leak": bool(leak[k])}

    return _NearPairs([pair(k) for k in range(min(len(a), datacheck.PAIRS_LISTED))], int(len(a)),
                      [pair(k) for k in np.flatnonzero(leak)[:datacheck.PAIRS_LISTED]], int(leak.sum()))


def _label_issues(x: torch.Tensor, index: list[tuple[str, int]], readable: dict, classes: list[str], seed: int,
                  log: Log) -> list[dict]:
    """Likely label errors: confident learning on out-of-fold linear-head probabilities."""
    y = np.array([readable[s].labels[i] for s, i in index], dtype=np.int64)
    if len(y) < 2 * FOLDS or len(np.unique(y)) < 2:
        log(f"label check: skipped (needs at least {2 * FOLDS} readable images of 2 or more classes)")
        return []
    folds = datacheck.stratified_folds(y, FOLDS, seed)
    probs = phases.out_of_fold_probs(x.double(), torch.from_numpy(y), len(classes), folds, LABEL_L2).numpy()
    issues = datacheck.confident_learning(probs, y)
    for r in issues:
        s, i = index[r["index"]]
        r.update(split=s, path=readable[s].ids[i], given_label=classes[r["given"]],
                 suggested_label=classes[r["suggested"]])
    return issues


def _result(cfg: Config, name: str, classes: list[str], splits: dict, infos: dict, bb: models.Backbone,
            unreadable: list[dict], exact: list[dict], near: _NearPairs, thr: float, labels: list[dict],
            t0: float) -> CheckResult:
    counts = {s: {c: 0 for c in classes} for s in splits}
    for s, src in splits.items():
        for y in src.labels:
            counts[s][classes[y]] += 1
    total = Counter()
    for s in counts:
        total.update(counts[s])
    crop = bb.preprocess.crop_size
    smallest = models.min_input(bb.model)
    small = [{"split": s, "path": splits[s].ids[i], "width": inf.width, "height": inf.height,
              "below_model_minimum": min(inf.width, inf.height) < smallest}
             for s in splits for i, inf in enumerate(infos[s]) if inf.error is None and min(inf.width, inf.height) < crop]
    modes = Counter(inf.mode for s in infos for inf in infos[s] if inf.error is None)
    leaks = [{"kind": "exact", "images": g["images"]} for g in exact if g["leak"]]
    exact_leaks = len(leaks)
    leaks += [{"kind": "near", "images": [p["a"], p["b"]], "similarity": p["similarity"]} for p in near.leaks]
    summary = {"images": sum(len(s) for s in splits.values()), "unreadable": len(unreadable),
               "exact_duplicate_groups": len(exact), "near_duplicate_pairs": near.count,
               "leaks": exact_leaks + near.leak_count,
               "label_issues": len(labels), "small_images": len(small), "colour_modes": len(modes)}
    return CheckResult(
        data=name, model=bb.name, image_size=crop, classes=classes, splits={s: len(v) for s, v in splits.items()},
        class_counts=counts, balance=datacheck.balance({c: total[c] for c in classes}), unreadable=unreadable,
        small_images=small, colour_modes=dict(modes), exact_duplicates=exact,
        near_duplicates=near.listed, near_duplicate_pairs=near.count, near_threshold=thr,
        leaks=leaks, label_issues=labels, summary=summary, seconds=round(time.perf_counter() - t0, 3))


def _write(result: CheckResult, out: Path, readable: dict, classes: list[str]) -> CheckResult:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out}: {exc.strerror or exc}",
                         hint="pass --out DIR with a writable folder") from None
    paths = {"check.json": out / "check.json", "check.html": out / "check.html"}
    result = dataclasses.replace(result, out_dir=str(out), files={k: str(v) for k, v in paths.items()})
    where = {src.ids[i]: (src, i) for src in readable.values() for i in range(len(src))}

    def thumb(path: str):
        return where[path][0].load(where[path][1], check_page.THUMB * 2) if path in where else None

    files.atomic_write_text(paths["check.html"], check_page.html(result.to_dict(), thumb))
    files.atomic_write_json(paths["check.json"], result.to_dict())
    return result

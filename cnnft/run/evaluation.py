"""Evaluate a checkpoint: accuracy, top-5, loss, per-class results, confusion matrix and the
most confidently wrong images.

It needs nothing but the checkpoint, which carries the run's resolved config, so the exact
validation split can be rebuilt. :func:`evaluate` computes an :class:`Evaluation` and
:func:`write_evaluation` writes its files (under ``RUN/eval/<data>`` by default).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from .. import files, progress
from ..config import Config
from ..data import folders as data
from ..data import transforms
from ..errors import DataError, InputError
from ..results import metrics
from ..results.evaluation import Evaluation, row_normalise, write_evaluation
from ..results.rundir import RunDir
from ..run import calibrate, checkpoint
from ..training import engine
from ..training.tta import with_tta

Log = Callable[[str], None]
CONFIDENT_ERRORS = 20  # most confidently wrong images listed by evaluate
SPLITS = ("val", "test")  # the run's own evaluation sets: val picked best.pt, test never took part


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def evaluate(
    source: str | Path,
    *,
    data_dir: str | Path | None = None,
    split: str = "val",
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    log: Log = _stderr,
    show_progress: bool = False,
    tta: bool = False,
    uncalibrated: bool = False,
) -> Evaluation:
    """Evaluate a checkpoint on the run's validation data, its ``data.test`` folder (``split="test"``) or
    a folder of class folders (``data_dir``): accuracy, top-5, loss, per-class precision/recall/F1, confusion
    matrix (CSV + PNG), the most confidently wrong images, every prediction (probabilities at the checkpoint's
    temperature, raw with ``uncalibrated``) and ECE/NLL before and after it, written under the run folder.

    load checkpoint -> rebuild model -> build data -> evaluate -> write results.
    """
    if split not in SPLITS:
        raise InputError(f"--split: unknown split {split!r}; use {' or '.join(SPLITS)}")
    lm = checkpoint.load_model(source)
    d = lm.config.data
    if data_dir is None and split == "test" and d.test is None:
        raise InputError("--split test: the run has no test set (data.test was not set when it was trained)",
                         hint="pass --data DIR (a folder with one sub-folder per class) to evaluate on other images")
    inference_model, rt = lm.inference(device)
    note = None
    if data_dir is not None:
        src, data_name, described, skipped = _folder_data(data_dir, lm.classes)
    else:
        src, data_name, described, skipped = _run_data(lm.config, lm.classes, split)
        if split == "val" and d.limit_per_class is not None:
            note = (f"the run was trained with data.limit_per_class={d.limit_per_class}: this is its limited "
                    f"validation set ({len(src)} images), as in training; --data DIR evaluates a whole folder")
            log(f"note: {note}")
    if skipped:
        log(f"skipping {len(skipped)} unreadable image(s):")
        for p, why in skipped:
            log(f"  {p}: {why}")
    model = with_tta(inference_model, tta, lm.config.data.hflip is True)
    out = _eval_dir(lm.path, data_name + ("-tta" if tta else ""), out_dir, forbidden=(data_dir, d.train, d.val, d.test))

    ds = data.ImageDataset(src, transforms.eval_transform(lm.preprocess), lm.preprocess.resize_size)
    loader = data.make_loader(ds, batch_size or d.batch_size, d.num_workers if num_workers is None else num_workers,
                              pin_memory=rt.pin_memory)
    batches = progress.track(loader, "evaluate", len(ds), show_progress, log, size=lambda b: len(b[1]))
    ev = engine.evaluate(model, batches, rt, criterion=nn.CrossEntropyLoss())  # plain CE: the run's val loss

    classes = lm.classes
    y = ev.labels.numpy()
    probs, fit = calibrate.calibrated(ev.probs.numpy().astype(np.float64), y,
                                      checkpoint.temperature_of(lm.checkpoint, log), uncalibrated)
    cm = metrics.confusion_matrix(y, probs.argmax(1), len(classes))
    pc = metrics.per_class(cm, classes)
    rows, wrong = _prediction_rows(src.ids, classes, probs, y)
    result = Evaluation(
        checkpoint=str(lm.path), model=lm.name, epoch=lm.checkpoint["epoch"], data=described, data_name=data_name,
        images=int(len(y)), skipped=[{"path": p, "reason": r} for p, r in skipped], accuracy=ev.acc,
        top5_accuracy=metrics.topk_accuracy(probs, y, 5) if len(classes) > 5 else None, loss=ev.loss,
        classes=classes, per_class=pc["per_class"], macro_avg=pc["macro"], weighted_avg=pc["weighted"],
        confusion_matrix=cm.tolist(),
        confusion_matrix_normalized=[[round(float(v), 6) for v in r] for r in row_normalise(cm)],
        confident_errors=wrong, seconds=round(ev.seconds, 3), device=str(rt.device), predictions=rows,
        split=None if data_dir is not None else split, note=note, calibration=fit,
    )
    return write_evaluation(result, out)


def _prediction_rows(ids: list[str], classes: list[str], probs: np.ndarray, y: np.ndarray) -> tuple[list[dict], list[dict]]:
    """predictions.csv's rows, and the most confidently wrong of them."""
    pred = probs.argmax(1)
    conf = probs[np.arange(len(y)), pred]
    rows = [{"path": ids[i], "true": classes[y[i]], "pred": classes[pred[i]], "prob": round(float(conf[i]), 6),
             "prob_true": round(float(probs[i, y[i]]), 6), "correct": int(pred[i] == y[i])} for i in range(len(y))]
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["prob"])[:CONFIDENT_ERRORS]
    return rows, wrong


def _run_data(cfg: Config, classes: list[str], split: str) -> tuple[data.Source, str, str, list]:
    """The run's own validation set (the same folders, split and seed as in training) or its
    ``data.test`` folder."""
    d = cfg.data
    try:
        bundle = data.build_data(d, cfg.seed)
    except DataError as exc:
        raise DataError(f"the run's {'validation' if split == 'val' else 'test'} data cannot be loaded: {exc.message}",
                        hint="pass --data DIR (a folder with one sub-folder per class) to evaluate on other images") from None
    if bundle.classes != classes:
        raise DataError(
            f"the run's data now has classes {bundle.classes[:10]}, the checkpoint {classes[:10]}",
            hint="the data folders changed since training; pass --data DIR to evaluate on a folder")
    if split == "test":
        return bundle.test, "test", str(d.test), bundle.test_skipped
    if d.val is not None:
        described = str(d.val)
    elif d.dataset is not None:
        described = f"{d.dataset} validation split"
    else:
        described = f"{d.train} (validation split {d.val_split}, seed {cfg.seed})"
    skipped = bundle.skipped  # with a split, a skipped file may have belonged to either side
    if d.val is not None:
        val_root = str(Path(d.val).expanduser())
        skipped = [(p, r) for p, r in skipped if p.startswith(val_root)]
    return bundle.val, "val", described, skipped


def _folder_data(root: str | Path, classes: list[str]) -> tuple[data.Source, str, str, list]:
    """A folder of class folders named as classes of the checkpoint (some, even one, of them:
    a model is evaluated on what there is)."""
    f_classes, paths, labels = data.scan_folder(root, "--data", min_classes=1)
    if not set(f_classes) <= set(classes):
        only_d = sorted(set(f_classes) - set(classes))
        only_c = sorted(set(classes) - set(f_classes))
        raise DataError(
            f"--data: the class folders in {root} do not match the checkpoint's classes"
            + (f"; not known to the model: {', '.join(only_d[:10])}" if only_d else "")
            + (f"; missing: {', '.join(only_c[:10])}" if only_c else ""),
            hint=f"give --data one sub-folder per class the model knows: {', '.join(classes[:20])}",
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[f_classes[y]] for y in labels]
    bad = data.verify_images(paths, "skip", "--data")
    bad_set = {p for p, _ in bad}
    kept = [(p, y) for p, y in zip(paths, labels) if p not in bad_set]
    if not kept:
        raise DataError(f"--data: none of the {len(paths)} image(s) in {root} could be read")
    ps, ys = [p for p, _ in kept], [y for _, y in kept]
    src = data.Source(ps, ys, lambda i, draft=None: data.open_image(ps[i], draft))
    return src, Path(root).expanduser().resolve().name, str(root), bad


def _eval_dir(ckpt_path: Path, data_name: str, out_dir: str | Path | None, forbidden: tuple = ()) -> Path:
    """``RUN/eval/<data>`` for a run's best checkpoint (``<data>-<stem>`` for any other);
    a checkpoint outside a run folder gets ``eval/`` beside it. ``--out`` may not lie in the
    ``forbidden`` folders (the images read) nor in the run's checkpoints."""
    if out_dir is not None:
        run = RunDir.of_checkpoint(ckpt_path)
        out = files.check_output_folder(out_dir, "--out", forbidden=(*forbidden, run.checkpoints if run else None))
    else:
        run = RunDir.of_checkpoint(ckpt_path) or RunDir(ckpt_path.parent)
        out = run.eval_dir(data_name if ckpt_path.stem == "best" else f"{data_name}-{ckpt_path.stem}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out}: {exc.strerror or exc}",
                         hint="pass --out DIR with a writable folder") from None
    return out

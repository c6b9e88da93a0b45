"""Recipes that use a trained model: evaluate, predict, extract features, export.

Each needs nothing but the checkpoint: it names the model, the classes and the
preprocessing, holds the weights, and carries the run's resolved config (so ``evaluate``
can rebuild the exact validation split). A recipe reads top to bottom:
load the checkpoint -> rebuild the model -> build the data -> run -> write results.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import __version__, checkpoint, data, engine, metrics, models, plots, progress, runtime, transforms
from . import config as config_mod
from .errors import CheckpointError, CnnftError, DataError, InputError

Log = Callable[[str], None]
CONFIDENT_ERRORS = 20  # most confidently wrong images listed by evaluate
EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_TOLERANCE = 1e-4  # max abs logit difference accepted between export and checkpoint
ONNX_OPSET = 17


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------ loading a model

@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on the CPU."""

    model: nn.Module
    name: str
    classes: list[str]
    preprocess: models.Preprocess
    checkpoint: dict

    @property
    def path(self) -> Path:
        return Path(self.checkpoint["path"])


def checkpoint_preprocess(ckpt: dict) -> models.Preprocess:
    """The eval preprocessing the run used: the weights' pipeline at the run's image size."""
    pre = models.Preprocess.from_dict(ckpt["preprocess"])
    return pre.with_size(ckpt["config"]["data"]["image_size"])


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model a checkpoint (or run folder) describes and load its weights strictly."""
    ckpt = checkpoint.load(path)
    bb = models.build(ckpt["model_name"], "none", ckpt["num_classes"])
    try:
        bb.model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise CheckpointError(
            f"{ckpt['path']}: the saved weights do not fit {ckpt['model_name']}: {first}",
            hint="was the checkpoint written with a different torchvision/timm version?",
        ) from None
    return LoadedModel(bb.model.eval(), ckpt["model_name"], list(ckpt["classes"]), checkpoint_preprocess(ckpt), ckpt)


def _run_runtime(lm: LoadedModel, device: str) -> runtime.Runtime:
    """The runtime training used (memory format, precision) on ``device``, with the model on it."""
    t = lm.checkpoint["config"]["train"]
    rt = runtime.make_runtime(device, t["amp"], t["channels_last"])
    rt.prepare(lm.model)
    return rt


# ------------------------------------------------------------------- files -> batches

class _Files(Dataset):
    """Image files -> (index, tensor or None, reason or None): a bad file is a result, not a crash."""

    def __init__(self, paths: list[str], transform, draft: int | None) -> None:
        self.paths, self.transform, self.draft = paths, transform, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            return i, self.transform(data.open_image(path, self.draft)), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file unusable
            if not os.path.exists(path):
                return i, None, "file not found"
            return i, None, data.check_image(path) or f"cannot decode: {type(exc).__name__}: {exc}"[:200]


def _as_list(batch):
    return batch


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process computes on the cores


@torch.inference_mode()
def _forward_files(model: nn.Module, paths: list[str], pre: models.Preprocess, rt: runtime.Runtime, batch_size: int,
                   num_workers: int, show: str | None = None) -> Iterable[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
    """Yield (indices, logits, errors) per batch of files; unreadable files only appear in errors."""
    model.eval()
    ds = _Files(paths, transforms.eval_transform(pre), pre.resize_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list,
                        worker_init_fn=_one_thread if num_workers else None)
    for batch in progress.bar(loader, show or "", show is not None):
        errors = {i: why for i, _, why in batch if why is not None}
        good = [(i, x) for i, x, why in batch if why is None]
        if not good:
            yield [], None, errors
            continue
        x = rt.images(torch.stack([x for _, x in good]))
        with rt.autocast():
            logits = models.logits_of(model(x)).float()
        yield [i for i, _ in good], logits.cpu(), errors


def collect_images(inputs: Iterable[str | Path], log: Log = _stderr) -> list[str]:
    """Files as given, and image files found by walking folders recursively (sorted, no
    hidden files); a path that does not exist is kept so that it is reported per file."""
    seen: dict[str, None] = {}
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in data.IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                log(f"{p}: no image files in this folder (looked for {', '.join(sorted(data.IMAGE_EXTENSIONS))})")
            seen.update(dict.fromkeys(found))
        else:
            seen[str(p)] = None
    return list(seen)


# --------------------------------------------------------------------------- evaluate

def evaluate(
    source: str | Path,
    *,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    log: Log = _stderr,
    show_progress: bool = False,
) -> dict:
    """Evaluate a checkpoint on the run's validation data (or a folder of class folders):
    accuracy, top-5, loss, per-class precision/recall/F1, confusion matrix (CSV + PNG),
    the most confidently wrong images, and every prediction, written under the run folder.

    load checkpoint -> rebuild model -> build data -> evaluate -> write results.
    """
    lm = load_model(source)
    cfg = lm.checkpoint["config"]
    d = cfg["data"]
    rt = _run_runtime(lm, device)
    if data_dir is None:
        src, data_name, described, skipped = _run_val_data(lm, d, cfg["seed"])
    else:
        src, data_name, described, skipped = _folder_data(data_dir, lm.classes)
    if skipped:
        log(f"skipping {len(skipped)} unreadable image(s):")
        for p, why in skipped:
            log(f"  {p}: {why}")
    out = _eval_dir(lm.path, data_name, out_dir)

    pre = lm.preprocess
    ds = data.ImageDataset(src, transforms.eval_transform(pre), pre.resize_size)
    loader = data.make_loader(ds, batch_size or d["batch_size"], d["num_workers"] if num_workers is None else num_workers,
                              pin_memory=rt.device.type == "cuda")
    # plain cross-entropy (no label smoothing), as the run's validation loss
    ev = engine.evaluate(lm.model, progress.bar(loader, "evaluate", show_progress), rt, criterion=nn.CrossEntropyLoss())

    classes = lm.classes
    probs, y = ev.probs.numpy().astype(np.float64), ev.labels.numpy()
    pred = probs.argmax(1)
    conf = probs[np.arange(len(y)), pred]
    cm = metrics.confusion_matrix(y, pred, len(classes))
    pc = metrics.per_class(cm, classes)
    rows = [{"path": src.ids[i], "true": classes[y[i]], "pred": classes[pred[i]], "prob": round(float(conf[i]), 6),
             "prob_true": round(float(probs[i, y[i]]), 6), "correct": int(pred[i] == y[i])} for i in range(len(y))]
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["prob"])[:CONFIDENT_ERRORS]

    files = {
        "metrics": out / "metrics.json",
        "predictions": out / "predictions.csv",
        "per_class": out / "per_class.csv",
        "confusion_csv": out / "confusion_matrix.csv",
        "confusion_normalized_csv": out / "confusion_matrix_normalized.csv",
        "confusion_png": out / "confusion_matrix.png",
        "confusion_normalized_png": out / "confusion_matrix_normalized.png",
        "confident_errors": out / "confident_errors.csv",
    }
    metrics.write_csv(files["predictions"], rows, ("path", "true", "pred", "prob", "prob_true", "correct"))
    metrics.write_csv(files["per_class"], pc["per_class"] + [{"class": f"{k} avg", **pc[k]} for k in ("macro", "weighted")],
                      ("class", "precision", "recall", "f1", "support"))
    rownorm = _row_normalise(cm)
    metrics.write_matrix_csv(files["confusion_csv"], cm, classes)
    metrics.write_matrix_csv(files["confusion_normalized_csv"], rownorm, classes, fmt="{:.6f}")
    plots.confusion(files["confusion_png"], cm, classes, normalize=False)
    plots.confusion(files["confusion_normalized_png"], cm, classes, normalize=True)
    metrics.write_csv(files["confident_errors"], wrong, ("path", "true", "pred", "prob", "prob_true"))

    result = {
        "checkpoint": str(lm.path),
        "model": lm.name,
        "epoch": lm.checkpoint["epoch"],
        "data": described,
        "data_name": data_name,
        "images": int(len(y)),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "accuracy": ev.acc,
        "top5_accuracy": metrics.topk_accuracy(probs, y, 5) if len(classes) > 5 else None,
        "loss": ev.loss,
        "classes": classes,
        "per_class": pc["per_class"],
        "macro_avg": pc["macro"],
        "weighted_avg": pc["weighted"],
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": [[round(float(v), 6) for v in r] for r in rownorm],
        "confident_errors": wrong,
        "seconds": round(ev.seconds, 3),
        "device": str(rt.device),
        "out_dir": str(out),
        "files": {k: str(v) for k, v in files.items()},
    }
    checkpoint.atomic_write_json(files["metrics"], result)
    return result


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(1, keepdims=True).astype(float)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)


def _run_val_data(lm: LoadedModel, d: dict, seed: int) -> tuple[data.Source, str, str, list]:
    """The run's own validation set: the same folders, split and seed as in training."""
    try:
        bundle = data.build_data(config_mod.DataConfig.model_validate(d), seed)
    except DataError as exc:
        raise DataError(f"the run's validation data cannot be loaded: {exc.message}",
                        hint="pass --data DIR (a folder with one sub-folder per class) to evaluate on other images") from None
    if bundle.classes != lm.classes:
        raise DataError(
            f"the run's data now has classes {bundle.classes[:10]}, the checkpoint {lm.classes[:10]}",
            hint="the data folders changed since training; pass --data DIR to evaluate on a folder")
    if d["val"] is not None:
        described = str(d["val"])
    elif d["dataset"] is not None:
        described = f"{d['dataset']} validation split"
    else:
        described = f"{d['train']} (validation split {d['val_split']}, seed {seed})"
    skipped = bundle.skipped  # with a split, a skipped file may have belonged to either side
    if d["val"] is not None:
        val_root = str(Path(d["val"]).expanduser())
        skipped = [(p, r) for p, r in skipped if p.startswith(val_root)]
    return bundle.val, "val", described, skipped


def _folder_data(root: str | Path, classes: list[str]) -> tuple[data.Source, str, str, list]:
    """A folder of class folders whose names match the checkpoint's classes."""
    f_classes, paths, labels = data.scan_folder(root, "--data")
    if set(f_classes) != set(classes):
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


def _eval_dir(ckpt_path: Path, data_name: str, out_dir: str | Path | None) -> Path:
    """``RUN/eval/<data>`` for a run's best checkpoint (``<data>-<stem>`` for any other);
    a checkpoint outside a run folder gets ``eval/`` beside it."""
    if out_dir is not None:
        out = Path(out_dir).expanduser()
    else:
        base = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        out = base / "eval" / (data_name if ckpt_path.stem == "best" else f"{data_name}-{ckpt_path.stem}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out}: {exc.strerror or exc}",
                         hint="pass --out DIR with a writable folder") from None
    return out


# ---------------------------------------------------------------------------- predict

def predict(
    source: str | Path,
    inputs: list[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    log: Log = _stderr,
    show_progress: bool = False,
) -> dict:
    """Class probabilities for image files and folders (walked recursively), in batches.

    An unreadable file gets a row with an ``error`` and a line on ``log``; it is fatal only
    when no file at all could be read (DataError, exit code 2).
    """
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1 (got {top_k})")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    lm = load_model(source)
    rt = _run_runtime(lm, device)
    paths = collect_images(inputs, log)
    if not paths:
        raise InputError("no image files to predict", hint="pass image files or folders that contain images")
    k = min(top_k, len(lm.classes))
    rows: list[dict] = [{"path": p, "class": None, "prob": None, "top_k": [], "error": None} for p in paths]
    for idx, logits, errors in _forward_files(lm.model, paths, lm.preprocess, rt, batch_size, num_workers,
                                                 "predict" if show_progress else None):
        for i, why in errors.items():
            rows[i]["error"] = why
            log(f"cannot read {paths[i]}: {why}")
        if logits is None:
            continue
        p, c = logits.softmax(1).topk(k, dim=1)
        for row_i, ps, cs in zip(idx, p.tolist(), c.tolist()):
            top = [{"class": lm.classes[ci], "prob": float(pi)} for pi, ci in zip(ps, cs)]
            rows[row_i].update({"class": top[0]["class"], "prob": top[0]["prob"], "top_k": top})
    failed = sum(r["error"] is not None for r in rows)
    if failed == len(rows):
        raise DataError(f"none of the {len(rows)} file(s) could be read as an image",
                        hint="check the paths; readable types: " + ", ".join(sorted(data.IMAGE_EXTENSIONS)))
    return {"checkpoint": str(lm.path), "model": lm.name, "classes": lm.classes, "top_k": k,
            "images": len(rows), "predicted": len(rows) - failed, "failed": failed, "predictions": rows}


# ---------------------------------------------------------------------------- extract

def _is_checkpoint_arg(source: str | Path) -> bool:
    p = Path(source).expanduser()
    if p.exists():
        return True
    if p.suffix in (".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"checkpoint not found: {p}")
    return False


def head_module(model: nn.Module) -> nn.Module:
    """The main classifier layer, whose input is the penultimate (feature) layer."""
    fam = models.family_of(model)
    if fam is not None:
        return model.get_submodule(fam.heads[0])
    if hasattr(model, "get_classifier"):  # timm
        return model.get_classifier()
    raise CnnftError(f"cannot find the classifier layer of {type(model).__name__}")


def extract(
    source: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int = 0,
    log: Log = _stderr,
    show_progress: bool = False,
) -> dict:
    """Penultimate-layer features (the classifier's input) for every image in a folder of
    class folders, saved as ``.npz`` with ``features``, ``labels``, ``classes`` and ``paths``.

    ``source`` is a checkpoint/run folder, or a backbone name (its pretrained weights and
    their preprocessing, e.g. ``efficientnet_lite0`` offline).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    classes, paths, labels = data.scan_folder(data_dir, "--data")
    if _is_checkpoint_arg(source):
        lm = load_model(source)
        model, name, pre = lm.model, lm.name, lm.preprocess
        rt = _run_runtime(lm, device)
    else:
        bb = models.build(str(source), "DEFAULT", None)
        model, name, pre = bb.model.eval(), bb.name, bb.preprocess
        defaults = config_mod.TrainConfig()
        rt = runtime.make_runtime(device, defaults.amp, defaults.channels_last)
        rt.prepare(model)
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out.parent}: {exc.strerror or exc}") from None

    captured: list[torch.Tensor] = []
    hook = head_module(model).register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0].detach().float().flatten(1).cpu()))
    feats, kept, skipped = [], [], []
    t0 = time.perf_counter()
    try:
        for idx, _logits, errors in _forward_files(model, paths, pre, rt, batch_size, num_workers,
                                                      "extract" if show_progress else None):
            for i, why in errors.items():
                skipped.append((paths[i], why))
                log(f"skipping unreadable {paths[i]}: {why}")
            if idx:
                feats.append(captured.pop())
                kept += idx
            captured.clear()
    finally:
        hook.remove()
    if not kept:
        raise DataError(f"--data: none of the {len(paths)} image(s) in {data_dir} could be read")
    features = torch.cat(feats).numpy().astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, features=features, labels=np.asarray([labels[i] for i in kept], dtype=np.int64),
             classes=np.asarray(classes, dtype=str), paths=np.asarray([paths[i] for i in kept], dtype=str),
             model=np.asarray(name, dtype=str))
    checkpoint.atomic_write_bytes(out, buf.getvalue())
    return {"out": str(out), "model": name, "images": len(kept), "feature_dim": int(features.shape[1]),
            "classes": classes, "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------- export

def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise InputError(f"--format onnx needs the onnx and onnxruntime packages ({exc.name} is not installed)",
                         hint="pip install 'cnnft[onnx]'   (or: pip install onnx onnxruntime)") from None
    return onnx, onnxruntime


def export(source: str | Path, fmt: str, out: str | Path, *, tolerance: float = EXPORT_TOLERANCE) -> dict:
    """Export a checkpoint's model as TorchScript or ONNX (dynamic batch axis), check that it
    gives the checkpoint's logits (max abs diff <= ``tolerance``) and write ``FILE.json``
    beside it with the classes and preprocessing.

    load checkpoint -> trace/export to a temporary file -> reload and compare -> rename.
    """
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format: unknown format {fmt!r}; use {' or '.join(EXPORT_FORMATS)}")
    onnx_mods = _onnx_modules() if fmt == "onnx" else None
    lm = load_model(source)
    model = lm.model.float().eval()
    size = lm.preprocess.crop_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    check = torch.randn(3, 3, size, size, generator=gen)  # another batch size: checks the dynamic axis
    with torch.inference_mode():
        expected = models.logits_of(model(check)).float()

    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out.parent}: {exc.strerror or exc}") from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter notices, not problems
            if fmt == "torchscript":
                with torch.no_grad():
                    traced = torch.jit.trace(model, example, check_trace=False)  # checked below, on another batch
                torch.jit.save(traced, str(tmp))
                with torch.inference_mode():
                    got = torch.jit.load(str(tmp), map_location="cpu")(check)
            else:
                onnx, ort = onnx_mods
                # the TorchScript-based exporter: the dynamo one needs onnxscript, which the
                # `onnx` extra does not install
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                                  output_names=["logits"], opset_version=ONNX_OPSET,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                onnx.checker.check_model(str(tmp))
                sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(sess.run(None, {"input": check.numpy()})[0])
        diff = float((models.logits_of(got).float() - expected).abs().max())
        if not diff <= tolerance:
            raise CnnftError(f"the exported {fmt} model's logits differ from the checkpoint's by {diff:.3g} "
                             f"(more than {tolerance:g}); nothing was written",
                             hint="run again with --debug and please report it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    meta = {
        "format": "cnnft-export",
        "export_format": fmt,
        "file": out.name,
        "model_name": lm.name,
        "num_classes": len(lm.classes),
        "classes": lm.classes,
        "preprocess": lm.preprocess.to_dict(),
        "input_size": [3, size, size],
        "input_name": "input",
        "output_name": "logits",
        "output": "logits [batch, num_classes]; apply softmax for probabilities",
        "dynamic_batch": True,
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "max_abs_diff": diff,
        "checkpoint": str(lm.path),
        "epoch": lm.checkpoint["epoch"],
        "cnnft_version": __version__,
        "torch_version": torch.__version__,
    }
    meta_path = out.with_name(out.name + ".json")
    checkpoint.atomic_write_json(meta_path, meta)
    return {**meta, "out": str(out), "metadata": str(meta_path), "tolerance": tolerance}

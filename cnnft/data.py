"""Datasets: class-per-folder images, splits and loaders (packaged sets: :mod:`cnnft.packaged`).

A dataset is a list of samples (an id such as a file path, and a label) plus a way to load
sample ``i`` as an RGB PIL image. Folders are scanned and every image is decoded once up
front, so a corrupt file is found before training starts, not in epoch 7.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

if TYPE_CHECKING:
    from .config import DataConfig

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float greyscale are rescaled, not clipped;
    transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """Decode an image file as RGB. ``draft``: let JPEG decode at a reduced scale that still
    covers ``draft`` pixels per side (much faster for large photos)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            # the filter above is process-wide, not per thread (images are checked in a thread
            # pool), so the limit is also checked here; above twice the limit PIL raises itself
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            return to_rgb(img)


def check_image(path: str) -> str | None:
    """None if ``path`` decodes as an image, else the reason it doesn't."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        open_image(path, draft=64)
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"image too large: over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    except PermissionError:
        return "cannot read: permission denied (give your user read access to the file)"
    except FileNotFoundError:
        return "cannot read: the file disappeared (deleted or moved while cnnft ran)"
    except Exception as exc:  # noqa: BLE001 - any decoder failure means an unusable file
        return f"cannot decode: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}"


@dataclass
class Source:
    """Samples (ids and labels) and how to load one as an RGB image."""

    ids: list[str]
    labels: list[int]
    load: Callable[[int, int | None], Image.Image]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> "Source":
        base = self.load
        idx = list(idx)
        return Source([self.ids[i] for i in idx], [self.labels[i] for i in idx],
                      lambda i, draft=None: base(idx[i], draft))


@dataclass
class DataBundle:
    """Train and validation sources with the class names they share."""

    classes: list[str]
    train: Source
    val: Source
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    test: Source | None = None  # data.test: evaluated apart, never used to pick best.pt
    test_skipped: list[tuple[str, str]] = field(default_factory=list)


def _folder_source(paths: list[str], labels: list[int]) -> Source:
    return Source(paths, labels, lambda i, draft=None: open_image(paths[i], draft))


def _hidden(name: str) -> bool:
    # .ipynb_checkpoints, .DS_Store, ._photo.jpg (macOS resource forks), .git ...
    return name.startswith(".")


def _unreadable_folder(key: str, folder: str | Path, exc: OSError) -> DataError:
    return DataError(f"{key}: cannot read folder {folder}: {exc.strerror or exc}",
                     hint=f"give your user read access to it (chmod -R u+rX {folder}), or move it out of the dataset")


def _entries(folder: Path, key: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise _unreadable_folder(key, folder, exc) from None


def _is_dir(entry: os.DirEntry, follow_symlinks: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False  # cannot even be examined: not a folder to descend into


def image_files(folder: str | Path, key: str) -> list[str]:
    """Image files under ``folder`` at any depth, sorted; hidden files and folders (a name
    starting with '.') are skipped at every level. A folder that cannot be listed is a
    DataError naming it; a file that cannot be examined is listed, so that the image check
    reports it like any other unreadable image."""
    found, todo = [], [Path(folder)]
    while todo:
        for e in _entries(todo.pop(), key):
            if _is_dir(e, follow_symlinks=False):
                todo.append(Path(e.path))
                continue
            if Path(e.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                ok = e.is_file()  # follows symlinks: a dangling one is no image
            except OSError:
                ok = True
            if ok:
                found.append(e.path)
    return sorted(found)


def _check_root(root: Path, key: str) -> None:
    try:
        st = root.stat()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(f"{key}: folder not found: {root}",
                            hint="check the path (relative paths are from the current directory)") from None
        raise _unreadable_folder(key, root, exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{key}: not a folder: {root}", hint="point it at a folder with one sub-folder per class")


def scan_folder(root: str | Path, key: str) -> tuple[list[str], list[str], list[int]]:
    """List a class-per-folder dataset: (classes, file paths, labels). Hidden folders and
    files are not part of it."""
    root = Path(root).expanduser()
    _check_root(root, key)
    entries = _entries(root, key)
    classes = [e.name for e in entries if _is_dir(e)]
    if not classes:
        loose = any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in entries)
        raise DataError(
            f"{key}: {root} has no class sub-folders",
            hint="lay images out as ROOT/<class>/<image>" + (" (images found directly in ROOT)" if loose else ""),
        )
    if len(classes) < 2:
        raise DataError(f"{key}: {root} has a single class ({classes[0]}); a classifier needs at least 2",
                        hint="add a folder for each other class: ROOT/<class>/<image>")
    paths, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        files = image_files(root / cls, key)
        if not files:
            empty.append(cls)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise DataError(
            f"{key}: class folder(s) with no images in {root}: {', '.join(empty)}",
            hint=f"add images or remove the folder(s); image types read: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    return classes, paths, labels


def scan_images(root: str | Path, key: str) -> tuple[list[str], list[str], list[int], str | None]:
    """A folder to embed: class folders give labels as in :func:`scan_folder`; images lying
    directly in ``root`` (alone or beside sub-folders) make it unlabelled: every image under
    it, label -1, no classes, and a note that says so. Returns (classes, paths, labels, note)."""
    root = Path(root).expanduser()
    _check_root(root, key)
    entries = _entries(root, key)
    if not any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and not _is_dir(e) for e in entries):
        return (*scan_folder(root, key), None)
    paths = image_files(root, key)
    beside = " (and in its sub-folders)" if any(_is_dir(e) for e in entries) else ""
    note = (f"{key}: images lie directly in {root}{beside}, so they have no class: labels are -1 and "
            f"classes is empty (for labels, put each class's images in ROOT/<class>/)")
    return [], paths, [-1] * len(paths), note


CHECK_NOTICE_AT = 2000  # images: from here the upfront check takes long enough to announce


def verify_images(paths: list[str], on_bad_image: str, key: str) -> list[tuple[str, str]]:
    """Decode every file once; return the unreadable ones, or raise if ``on_bad_image`` is error."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        reasons = list(pool.map(check_image, paths))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad and on_bad_image == "error":
        listing = "\n".join(f"    {p}: {r}" for p, r in bad[:10])
        more = f"\n    ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(
            f"{key}: {len(bad)} unreadable image(s):\n{listing}{more}",
            hint="remove or fix them, or set data.on_bad_image=skip to train without them",
        )
    return bad


def _limit(labels: list[int], n: int | None) -> list[int]:
    if n is None:
        return list(range(len(labels)))
    seen: Counter = Counter()
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < n:
            keep.append(i)
            seen[y] += 1
    return keep


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, val) keeping class proportions; the same seed gives the same split."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for y, idx in sorted(by_class.items()):
        idx = list(rng.permutation(idx))
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def build_data(cfg: "DataConfig", seed: int, log: Callable[[str], None] | None = None) -> DataBundle:
    """Resolve the training and validation sets described by the ``data`` config section."""
    train, val, dataset, limit_per_class = cfg.train, cfg.val, cfg.dataset, cfg.limit_per_class
    if (train is None) == (dataset is None):
        raise DataError(
            "data: set exactly one of data.train (a folder of class folders) or data.dataset "
            "(a packaged dataset such as digits or cifar10)"
        )
    skipped: list[tuple[str, str]] = []
    if dataset is not None:
        if val is not None:
            raise DataError("data.val: not used with data.dataset (packaged sets bring their own split)")
        from .packaged import load_packaged  # the packaged sets build on this module

        classes, tr, va = load_packaged(dataset, cfg.root, cfg.download, cfg.val_split, seed)
        tr = tr.subset(_limit(tr.labels, limit_per_class))
        va = va.subset(_limit(va.labels, limit_per_class))
        return DataBundle(classes, tr, va, skipped, *_test_source(cfg, classes))

    classes, paths, labels = scan_folder(train, "data.train")
    keep = _limit(labels, limit_per_class)
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if val is not None:
        v_classes, v_paths, v_labels = scan_folder(val, "data.val")
        if v_classes != classes:
            only_t = sorted(set(classes) - set(v_classes))
            only_v = sorted(set(v_classes) - set(classes))
            raise DataError(
                "data.val: class folders differ from data.train"
                + (f"; only in train: {', '.join(only_t)}" if only_t else "")
                + (f"; only in val: {', '.join(only_v)}" if only_v else ""),
                hint="give both folders the same class sub-folders",
            )
        keep = _limit(v_labels, limit_per_class)
        v_paths, v_labels = [v_paths[i] for i in keep], [v_labels[i] for i in keep]
    to_check = paths + (v_paths if val is not None else [])
    notice = log is not None and len(to_check) >= CHECK_NOTICE_AT
    if notice:
        log(f"checking {len(to_check):,} images (each is decoded once before training) ...")
    t0 = time.perf_counter()
    bad = verify_images(to_check, cfg.on_bad_image, "data")
    if notice:
        log(f"checked {len(to_check):,} images in {time.perf_counter() - t0:.0f}s")
    skipped = bad
    bad_set = {p for p, _ in bad}

    def clean(ps, ls):
        kept = [(p, y) for p, y in zip(ps, ls) if p not in bad_set]
        return [p for p, _ in kept], [y for _, y in kept]

    label_of = dict(zip(paths, labels))
    paths, labels = clean(paths, labels)
    for label, cls in enumerate(classes):
        if label not in labels:
            lost = [f"\n    {p}: {r}" for p, r in bad if label_of.get(p) == label]
            raise DataError(
                f"data.train: class {cls!r} has no readable images: all {len(lost)} are unreadable"
                + "".join(lost[:5]) + (f"\n    ... and {len(lost) - 5} more" if len(lost) > 5 else ""),
                hint=f"replace the broken files of class {cls!r}, or remove its folder",
            )
    if val is not None:
        v_paths, v_labels = clean(v_paths, v_labels)
        train_src, val_src = _folder_source(paths, labels), _folder_source(v_paths, v_labels)
    else:
        src = _folder_source(paths, labels)
        tr, va = stratified_split(labels, cfg.val_split, seed)
        train_src, val_src = src.subset(tr), src.subset(va)
    if len(val_src) == 0:
        raise DataError(
            "data: the validation set is empty",
            hint="add readable images to data.val" if val is not None else
            "a validation image is split off per class with at least 2 images; add images or give data.val",
        )
    return DataBundle(classes, train_src, val_src, skipped, *_test_source(cfg, classes))


def _test_source(cfg: "DataConfig", classes: list[str]) -> tuple[Source | None, list[tuple[str, str]]]:
    """The ``data.test`` folder (all of it: ``limit_per_class`` is for training trials, a test
    set is only worth its full size) with its unreadable files; (None, []) when there is none."""
    if cfg.test is None:
        return None, []
    t_classes, paths, labels = scan_folder(cfg.test, "data.test")
    if sorted(t_classes) != sorted(classes):
        only_c = sorted(set(classes) - set(t_classes))
        only_t = sorted(set(t_classes) - set(classes))
        raise DataError(
            "data.test: class folders differ from the training classes"
            + (f"; missing in test: {', '.join(only_c[:10])}" if only_c else "")
            + (f"; only in test: {', '.join(only_t[:10])}" if only_t else ""),
            hint="give data.test one sub-folder per training class, with the same names",
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[t_classes[y]] for y in labels]
    bad = verify_images(paths, cfg.on_bad_image, "data.test")
    bad_set = {p for p, _ in bad}
    kept = [(p, y) for p, y in zip(paths, labels) if p not in bad_set]
    if not kept:
        raise DataError(f"data.test: none of the {len(paths)} image(s) in {cfg.test} could be read")
    return _folder_source([p for p, _ in kept], [y for _, y in kept]), bad


class ImageDataset(Dataset):
    """A Source with a transform: item i -> (tensor, label)."""

    def __init__(self, source: Source, transform, draft: int | None = None) -> None:
        self.source, self.transform, self.draft = source, transform, draft

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img = self.source.load(i, self.draft)
        return self.transform(img), self.source.labels[i]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of a run: its shuffle order and its augmentation draws."""
    return seed * 1_000_003 + epoch


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), optionally starting part-way through, so that a
    resumed epoch sees exactly the batches the interrupted one had left."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self._order()[self.start:])

    def __len__(self) -> int:
        return self.n - self.start


def _sigterm_only_from_parent() -> None:
    """In a loader worker: let SIGTERM from the main process (DataLoader shutdown, Python's
    exit) end the worker as usual, and ignore it from anyone else. `timeout`, `kill --
    -PGID` and Slurm signal every process of the job at once; a worker that died of it
    would crash the main process ("DataLoader worker is killed by signal") before it could
    save. A plain SIG_IGN is not enough: at exit Python terminates leftover workers with
    SIGTERM and then waits for them, forever."""
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):  # macOS, Windows
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    parent = os.getppid()
    # blocked here, the signal stays pending for sigwaitinfo; threads started later inherit the mask
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # what torch's own worker handler does for its parent's SIGTERM

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def _worker_init(_worker_id: int) -> None:
    # The main process handles Ctrl-C and SIGTERM (it saves, then stops the workers itself);
    # one thread per worker avoids oversubscribing the cores the main process computes on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sigterm_only_from_parent()
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, *, sampler: Sampler | None = None,
    generator: torch.Generator | None = None, pin_memory: bool = False, collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader with seeded workers that leave Ctrl-C and SIGTERM to the main process: the
    one loader policy of training and inference.

    A loader with a ``sampler`` is a training loader: when its last batch would hold a single
    image, that image is left out of the epoch (the shuffle picks another one each epoch),
    because BatchNorm cannot train on a batch of one ("Expected more than 1 value per
    channel") and a dataset of 4k+1 images would crash the run at the end of epoch 1."""
    lone_last = sampler is not None and batch_size > 1 and len(sampler) % batch_size == 1
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None, generator=generator,
        pin_memory=pin_memory, drop_last=lone_last, persistent_workers=False, collate_fn=collate_fn,
    )

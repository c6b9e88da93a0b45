"""Datasets: class-per-folder images, splits and loaders (packaged sets: :mod:`cnnft.data.packaged`).

A dataset is a list of samples (an id such as a file path, and a label) plus a way to load
sample ``i`` as an RGB PIL image. Folders are scanned and every image is decoded once up
front, so a corrupt file is found before training starts, not in epoch 7.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import progress
from ..errors import DataError
from .samples import (  # noqa: F401 - the torch-free part of the data layer, re-exported
    IMAGE_EXTENSIONS,
    Source,
    class_mismatch,
    image_files,
    scan_folder,
    scan_images,
    stratified_split,
    to_rgb,
)

if TYPE_CHECKING:
    from ..config import DataConfig

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe


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
            # phone photos are stored sideways with an EXIF note of how to turn them: turned
            # here, the one place every command decodes an image (train, evaluate, predict, extract)
            return to_rgb(ImageOps.exif_transpose(img))


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


CHECK_NOTICE_AT = 2000  # images: from here the upfront check takes long enough to announce


def verify_images(paths: list[str], on_bad_image: str, key: str,
                  log: Callable[[str], None] | None = None) -> list[tuple[str, str]]:
    """Decode every file once; return the unreadable ones, or raise if ``on_bad_image`` is error.
    With ``log``, a long check reports its progress in plain lines."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        reasons = list(progress.track(pool.map(check_image, paths), "checking images", len(paths), False, log))
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
        from .packaged import load_packaged

        classes, tr, va = load_packaged(dataset, cfg.root, cfg.download, cfg.val_split, seed)
        tr = tr.subset(_limit(tr.labels, limit_per_class))
        va = va.subset(_limit(va.labels, limit_per_class))
        return DataBundle(classes, tr, va, skipped, *_test_source(cfg, classes))

    classes, paths, labels = scan_folder(train, "data.train")
    keep = _limit(labels, limit_per_class)
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if val is not None:
        v_classes, v_paths, v_labels = scan_folder(val, "data.val")
        _check_same_classes(classes, v_classes)
        keep = _limit(v_labels, limit_per_class)
        v_paths, v_labels = [v_paths[i] for i in keep], [v_labels[i] for i in keep]
    to_check = paths + (v_paths if val is not None else [])
    notice = log is not None and len(to_check) >= CHECK_NOTICE_AT
    if notice:
        log(f"checking {len(to_check):,} images (each is decoded once before training) ...")
    t0 = time.perf_counter()
    bad = verify_images(to_check, cfg.on_bad_image, "data", log)
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


def _check_same_classes(classes: list[str], v_classes: list[str]) -> None:
    """data.val must hold the class folders data.train holds."""
    differ = class_mismatch("data.val", classes, v_classes, "data.train", "only in train")
    if differ:
        raise DataError(differ, hint="give both folders the same class sub-folders")


def _test_source(cfg: "DataConfig", classes: list[str]) -> tuple[Source | None, list[tuple[str, str]]]:
    """The ``data.test`` folder (all of it: ``limit_per_class`` is for training trials, a test
    set is only worth its full size) with its unreadable files; (None, []) when there is none."""
    if cfg.test is None:
        return None, []
    t_classes, paths, labels = scan_folder(cfg.test, "data.test")
    differ = class_mismatch("data.test", classes, t_classes, "the training classes", "missing in test")
    if differ:
        raise DataError(differ, hint="give data.test one sub-folder per training class, with the same names")
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[t_classes[y]] for y in labels]
    bad = verify_images(paths, cfg.on_bad_image, "data.test")
    bad_set = {p for p, _ in bad}
    kept = [(p, y) for p, y in zip(paths, labels) if p not in bad_set]
    if not kept:
        raise DataError(f"data.test: none of the {len(paths)} image(s) in {cfg.test} could be read")
    return _folder_source([p for p, _ in kept], [y for _, y in kept]), bad


class ImageDataset(Dataset):
    """A Source with a transform: item i -> (tensor, label).

    With a ``seed``, the random transform of item i draws from its own generator state, fixed
    by (seed, epoch, i) (see :meth:`set_epoch`), not from whichever process loads it: the
    augmentation of a run is the same for any number of loader workers, and an epoch resumed
    part-way gives its remaining images the augmentation they would have had. The calling
    process's global generator is left as it was."""

    def __init__(self, source: Source, transform, draft: int | None = None, seed: int | None = None) -> None:
        self.source, self.transform, self.draft = source, transform, draft
        self.seed, self.epoch = seed, 0
        # images that could not be read any more (deleted, moved or spoilt while cnnft runs), marked
        # by whichever process met them: shared memory, which loader workers write into
        self.lost = torch.zeros(len(source), dtype=torch.bool)
        if len(source):
            self.lost.share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentation of ``epoch`` (read by the loader's workers when it starts a pass)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: "int | tuple[int, int]"):
        # (epoch, i) from an EpochTagged sampler: persistent workers keep their own copy of the
        # dataset, so the epoch must travel with the index
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        j, img = self._load(i)
        if self.seed is None:
            return self.transform(img), self.source.labels[j]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only, which the transforms draw from: torch.manual_seed would also
            # seed every GPU (not restored by fork_rng(devices=[])), or, before CUDA starts,
            # record a stack trace per call to do it later (~1 ms per image)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            return self.transform(img), self.source.labels[j]

    def _load(self, i: int) -> tuple[int, Image.Image]:
        """Image ``i``; if it cannot be read any more, the next one that can (with its own label):
        the lost one is marked in :attr:`lost` and skipped from then on, like a bad image."""
        n = len(self.source)
        for k in range(n):
            j = (i + k) % n
            if self.lost[j]:
                continue
            try:
                return j, self.source.load(j, self.draft)
            except Exception:  # noqa: BLE001 - checked readable at the start: it changed since
                self.lost[j] = True
        raise DataError("data: none of the images can be read any more (deleted or moved while cnnft ran)",
                        hint="put the images back, then resume the run")

    def lost_files(self) -> list[tuple[str, str]]:
        """(path, reason) of each image found unreadable after the start."""
        return [(self.source.ids[j], check_image(self.source.ids[j]) or "could not be read during training")
                for j in torch.nonzero(self.lost).flatten().tolist()]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random augmentation in ``epoch`` of a run seeded ``seed``:
    a hash, so that nearby (seed, epoch, index) triples give unrelated draws."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of a run: its shuffle order and its augmentation draws."""
    return seed * 1_000_003 + epoch


class EpochSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch), optionally starting part-way through, so that a
    resumed epoch sees exactly the batches the interrupted one had left. With ``weights``, an
    epoch draws ``n`` samples by weight instead (the balanced sampler)."""

    def __init__(self, n: int, seed: int, shuffle: bool, weights: torch.Tensor | None = None) -> None:
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:  # drawn by weight, with replacement (a balanced epoch)
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        return iter(self._order()[self.start:])

    def __len__(self) -> int:
        return self.n - self.start


class EpochTagged(Sampler):
    """``sampler``'s indices as (epoch, index) pairs, its current epoch read at each pass: how
    an ImageDataset in persistent loader workers learns which epoch's augmentation to draw."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


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


class _Loader(DataLoader):
    """A DataLoader whose worker processes are started with SIGTERM blocked: a SIGTERM sent to
    the whole process group between a worker's fork and its ``_worker_init`` would otherwise kill
    the worker with the default action (and crash the run) before it could set its own policy.
    The main process gets its mask back as soon as the workers are started; a SIGTERM that came
    meanwhile is then delivered to it."""

    def __iter__(self):
        if not self.num_workers or not hasattr(signal, "pthread_sigmask") \
                or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(_worker_id: int) -> None:
    # The main process handles Ctrl-C and SIGTERM (it saves, then stops the workers itself);
    # one thread per worker avoids oversubscribing the cores the main process computes on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sigterm_only_from_parent()
    torch.set_num_threads(1)


def loader_workers(setting: int | str) -> int:
    """``data.num_workers``: a number as given; ``auto`` none on 2 cores or fewer (decoding in
    other processes takes the cores the model computes on, measured slower there), else one
    per core but one, at most 8."""
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int | str, *, sampler: Sampler | None = None,
    generator: torch.Generator | None = None, pin_memory: bool = False, collate_fn: Callable | None = None,
    persistent: bool | None = None,
) -> DataLoader:
    """A DataLoader with seeded workers that leave Ctrl-C and SIGTERM to the main process: the
    one loader policy of training and inference.

    A loader with a ``sampler`` is a training loader: when its last batch would hold a single
    image, that image is left out of the epoch (the shuffle picks another one each epoch),
    because BatchNorm cannot train on a batch of one ("Expected more than 1 value per
    channel") and a dataset of 4k+1 images would crash the run at the end of epoch 1.
    ``persistent`` (default: with pinned memory, i.e. on CUDA) keeps worker processes alive
    between passes."""
    lone_last = sampler is not None and batch_size > 1 and len(sampler) % batch_size == 1
    num_workers = loader_workers(num_workers)
    # workers that outlive an epoch save their start-up (process spawn, imports, opening files)
    # every epoch: worth it where pinned memory says a GPU trains; the epoch then rides on the
    # indices, since each worker holds its own copy of the dataset
    if persistent is None:
        persistent = pin_memory
    persistent = bool(persistent and num_workers and (sampler is None or hasattr(sampler, "epoch")))
    if persistent and sampler is not None:
        sampler = EpochTagged(sampler)
    return _Loader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None, generator=generator,
        pin_memory=pin_memory, drop_last=lone_last, persistent_workers=persistent, collate_fn=collate_fn,
    )

"""Decoded cache: images and labels kept as uint8 arrays that loader workers memory-map.

Decoding a 1024x2048 PNG costs about 50 ms, most of what a loader worker spends per
Cityscapes image. With ``dataset.cache=PATH`` each image and label is decoded once into a
``.npy`` file; a worker then memory-maps it (no decoding, no copy) and the train transform
reads only the pixels its crop keeps. The operating system's page cache holds the arrays
once for all workers and DDP ranks of the machine.

Layout, one folder per dataset split (named by a digest of its file list and label table,
so splits and datasets can share one ``PATH``)::

    PATH/<digest>/index.json          what each entry was made from: source paths, sizes,
                                      modification times (ns), array shapes
    PATH/<digest>/images/000123.npy   uint8 H x W x 3, RGB, as seg.data.folder.read_image
    PATH/<digest>/labels/000123.npy   uint8 H x W, TRAIN IDS: the label PNG after the
                                      dataset's lookup table (values checked when built)
    PATH/<digest>/.lock               one builder at a time (DDP ranks, tools/build_cache.py)

Entry ``i`` is pair ``i`` of the dataset. Opening a dataset validates the cache with
``stat`` only (no PNG is read): an entry whose image or label changed size or modification
time, or whose arrays are gone, is stale. Missing and stale entries are built when the
dataset opens (``dataset.cache_build=true``, the default) or refused in one line that
names the file and the command that rebuilds. Every array file is written under a
temporary name and renamed; the index is rewritten (atomically) every few seconds and when
a build stops, so an interrupted build keeps its finished entries and the next one resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from seg.errors import DatasetError
from seg.fileio import atomic_write, exclusive_lock, write_text_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
SAVE_EVERY_S = 5.0  # how often a running build records its finished entries
REBUILD_HINT = "python tools/build_cache.py dataset=<this dataset> dataset.root=<its root> dataset.cache={root}"


class CacheableDataset(Protocol):
    """What the cache needs from a dataset (``seg.data.folder.PairedDataset``)."""

    pairs: list[tuple[Path, Path]]
    lut: np.ndarray  # uint8[256] label value -> train id
    valid: np.ndarray  # bool[256] allowed label values

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode pair ``index``: (RGB uint8 H x W x 3, train ids uint8 H x W)."""
        ...


@dataclass
class CacheState:
    """The cache of one dataset split against its source files, found with ``stat`` only."""

    folder: Path
    entries: dict[int, dict[str, Any]]  # valid and stale entries of the index
    missing: list[int]  # pairs with no entry (never built, or the build was interrupted)
    stale: list[int]  # pairs whose source changed or whose arrays are gone
    reasons: dict[int, str]  # stale pair -> why, one line

    @property
    def todo(self) -> list[int]:
        return sorted(self.missing + self.stale)


@dataclass
class BuildResult:
    """What :func:`build_cache` did."""

    folder: Path
    images: int  # entries in the cache (= pairs of the dataset)
    built: int  # entries decoded by this call
    bytes: int  # size of all array files


def _digest(dataset: CacheableDataset) -> str:
    """Identity of a split: its (image, label) paths in order and its label table."""
    identity = {
        "format": FORMAT_VERSION,
        "pairs": [[os.path.abspath(i), os.path.abspath(lb)] for i, lb in dataset.pairs],
        "lut": np.asarray(dataset.lut, np.uint8).tobytes().hex(),
        "valid": np.asarray(dataset.valid, bool).tobytes().hex(),
    }
    # A colour table (colour masks) changes what a label file means; plain id PNGs have
    # none, so their folders keep the names they had before colour masks existed.
    label_source = getattr(dataset, "label_source", "")
    if label_source:
        identity["labels"] = label_source
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def cache_folder(root: str | Path, dataset: CacheableDataset) -> Path:
    """``root/<digest>``: where the cache of ``dataset`` lives under ``root``."""
    return Path(root) / _digest(dataset)[:16]


def _entry_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / "images" / f"{index:06d}.npy", folder / "labels" / f"{index:06d}.npy"


def _stat(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of ``path``, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # written atomically, so only by hand or a bad disk
        raise DatasetError(f"unreadable cache index {path}: {err}; delete {folder}") from err
    if index.get("format") != FORMAT_VERSION:
        return None  # another format: rebuilt from scratch
    return index


def _listed(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def _why_stale(
    entry: dict[str, Any], pair: tuple[Path, Path], arrays: tuple[bool, bool], index: int
) -> str | None:
    """Why entry ``index`` no longer stands for ``pair`` (None: it still does)."""
    for key, path in zip(("image", "label"), pair, strict=True):
        if entry[key] != os.path.abspath(path):
            return f"entry {index} was made from {entry[key]}, not {path}"
        if entry[f"{key}_stat"] != _stat(path):
            return f"{path} changed (size or modification time) or is gone since it was cached"
    if not all(arrays):
        return f"the cached arrays of {pair[0]} are gone"
    return None


def check_cache(root: str | Path, dataset: CacheableDataset) -> CacheState:
    """Compare the cache under ``root`` with ``dataset``'s source files (``stat`` only)."""
    if Path(root).exists() and not Path(root).is_dir():
        raise DatasetError(f"dataset.cache={root} is not a folder")
    folder = cache_folder(root, dataset)
    index = _read_index(folder) or {"entries": {}}
    recorded = {int(k): v for k, v in index["entries"].items()}
    images, labels = _listed(folder / "images"), _listed(folder / "labels")
    missing, stale, reasons = [], [], {}
    for i, pair in enumerate(dataset.pairs):
        entry = recorded.get(i)
        if entry is None:
            missing.append(i)
            continue
        name = f"{i:06d}.npy"
        why = _why_stale(entry, pair, (name in images, name in labels), i)
        if why is not None:
            stale.append(i)
            reasons[i] = why
    entries = {i: e for i, e in recorded.items() if i < len(dataset.pairs)}
    return CacheState(folder, entries, missing, stale, reasons)


def _refusal(state: CacheState, dataset: CacheableDataset, root: str | Path) -> str:
    """One line: what is wrong with the cache, and the command that rebuilds it."""
    hint = f"{REBUILD_HINT.format(root=root)} (or set dataset.cache_build=true)"
    if state.stale:
        more = f" (and {len(state.stale) - 1} more entries)" if len(state.stale) > 1 else ""
        why = state.reasons[state.stale[0]]
        return f"decoded cache {state.folder} is stale: {why}{more}; rebuild it with: {hint}"
    first = dataset.pairs[state.missing[0]][0]
    return (
        f"decoded cache {state.folder} lacks {len(state.missing)} of {len(dataset.pairs)} "
        f"images (first: {first}); build it with: {hint}"
    )


def _save_array(path: Path, array: np.ndarray) -> None:
    try:
        atomic_write(path, lambda file: np.save(file, np.ascontiguousarray(array)))
    except OSError as err:
        raise DatasetError(f"cannot write cache file {path}: {err.strerror or err}") from err


def _save_index(folder: Path, entries: dict[int, dict[str, Any]]) -> None:
    index = {
        "format": FORMAT_VERSION,
        "what": "seg decoded cache: images/<i>.npy uint8 HxWx3 RGB, labels/<i>.npy uint8 HxW "
        "train ids (after the dataset's lookup table); entry i = pair i of the dataset",
        "entries": {str(i): entries[i] for i in sorted(entries)},
    }
    try:
        write_text_atomic(folder / INDEX, json.dumps(index, indent=1) + "\n")
    except OSError as err:
        raise DatasetError(f"cannot write {folder / INDEX}: {err.strerror or err}") from err


def _build_entries(
    dataset: CacheableDataset, state: CacheState, progress: bool | None, desc: str
) -> int:
    """Decode the missing and stale entries of ``state``; returns how many were built.

    The index is saved every ``SAVE_EVERY_S`` seconds and when the loop ends for any reason
    (done, a bad file, Ctrl-C), so finished entries survive an interruption.
    """
    folder, entries = state.folder, state.entries
    todo = state.todo
    for i in state.stale:  # until rebuilt, a stale entry must not look valid
        entries.pop(i, None)
    built = 0
    last_save = time.monotonic()
    try:
        for i in tqdm(
            todo, desc=desc, unit="image", disable=None if progress is None else not progress
        ):
            image_path, label_path = dataset.pairs[i]
            # Stat before decoding: a file changed while being read is then seen as stale.
            image_stat, label_stat = _stat(image_path), _stat(label_path)
            image, label = dataset.load(i)
            image_file, label_file = _entry_files(folder, i)
            _save_array(image_file, image)
            _save_array(label_file, label)
            entries[i] = {
                "image": os.path.abspath(image_path),
                "image_stat": image_stat,
                "label": os.path.abspath(label_path),
                "label_stat": label_stat,
                "shape": list(label.shape),
            }
            built += 1
            if time.monotonic() - last_save > SAVE_EVERY_S:
                _save_index(folder, entries)
                last_save = time.monotonic()
    finally:
        _save_index(folder, entries)
    return built


def _make_folder(folder: Path) -> None:
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(exist_ok=True)
    except OSError as err:
        raise DatasetError(
            f"cannot create the cache folder {folder}: {err.strerror or err} (dataset.cache)"
        ) from err


def build_cache(
    dataset: CacheableDataset,
    root: str | Path,
    progress: bool | None = None,
    desc: str = "caching",
) -> BuildResult:
    """Bring the cache of ``dataset`` under ``root`` up to date: decode every missing or
    stale entry (under the folder's lock; entries another process finished are kept).

    Args:
        progress: tqdm bar (None: only on a terminal); ``desc`` is its label.
    Raises:
        DatasetError: a source file cannot be decoded (named; entries built so far are
            kept), or the cache cannot be written.
    """
    check_cache(root, dataset)  # a root that is not a folder, an unreadable index
    folder = cache_folder(root, dataset)
    _make_folder(folder)
    with exclusive_lock(folder / ".lock"):
        state = check_cache(root, dataset)  # again under the lock: another rank may have built
        built = 0
        if state.todo:
            logger.info(
                "decoded cache %s: decoding %d of %d images",
                folder,
                len(state.todo),
                len(dataset.pairs),
            )
            built = _build_entries(dataset, state, progress, desc)
    size = 0
    for i in range(len(dataset.pairs)):
        for path in _entry_files(folder, i):
            size += (_stat(path) or [0])[0]
    return BuildResult(folder=folder, images=len(dataset.pairs), built=built, bytes=size)


class DecodedCache:
    """Read side of one split's cache: entry ``i`` as memory-mapped arrays.

    Each process maps an entry the first time it reads it and keeps the mapping: mapping
    anew per read would fault in every page again (measured: about 2 ms of a 1024x1024
    sample). Kept mappings cost address space, not memory: the pages are the page cache's.
    Pickling (spawned workers) carries the folder and shapes, not the mappings.
    """

    def __init__(self, folder: Path, shapes: Sequence[tuple[int, int]]) -> None:
        self.folder = folder
        self.shapes = [tuple(s) for s in shapes]
        self._mapped: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mapped": {}}

    def __len__(self) -> int:
        return len(self.shapes)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Entry ``index``: (RGB uint8 H x W x 3, train ids uint8 H x W), read-only views
        of memory-mapped files: pages are read when (and only where) pixels are used."""
        arrays = self._mapped.get(index)
        if arrays is None:
            arrays = self._mapped[index] = self._map(index)
        return arrays

    def _map(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_file, label_file = _entry_files(self.folder, index)
        try:
            image = np.load(image_file, mmap_mode="r")
            label = np.load(label_file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"cannot read cache entry {image_file.name} in {self.folder}: {err}; delete the "
                "folder or rebuild it with tools/build_cache.py"
            ) from err
        h, w = self.shapes[index]
        if image.shape != (h, w, 3) or label.shape != (h, w) or image.dtype != np.uint8:
            raise DatasetError(
                f"cache entry {image_file} does not match its index (shape {image.shape}, "
                f"expected {(h, w, 3)}); rebuild it with tools/build_cache.py"
            )
        return np.asarray(image), np.asarray(label)


def open_cache(dataset: CacheableDataset, root: str | Path, build: bool = True) -> DecodedCache:
    """Validate (``stat`` only) and return the cache of ``dataset`` under ``root``.

    Missing or stale entries are decoded now when ``build`` (a tqdm bar on a terminal),
    otherwise a ``DatasetError`` names the first stale file and the rebuilding command.
    """
    state = check_cache(root, dataset)
    if state.todo:
        if not build:
            raise DatasetError(_refusal(state, dataset, root))
        build_cache(dataset, root)
        state = check_cache(root, dataset)
        if state.todo:  # changed again while building
            raise DatasetError(_refusal(state, dataset, root))
    shapes = [tuple(state.entries[i]["shape"]) for i in range(len(dataset.pairs))]
    return DecodedCache(state.folder, shapes)

"""Atomic file writing: a crash leaves the old file or the new one, never half a file.

Every file the framework writes for users (checkpoints, evaluation and comparison reports,
predictions, ONNX models, benchmark results) goes through :func:`atomic_write`: the content
is written to a temporary file beside the target and renamed over it. ``durable=True``
(checkpoints) also fsyncs the file and the folder, so that the rename survives a power cut;
the default skips that, as thousands of small outputs (prediction PNGs) would pay for it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], durable: bool = False
) -> None:
    """Create ``path`` atomically: ``write(file)`` fills a temporary file in the same folder,
    which is then renamed over ``path`` (fsynced first, folder too, when ``durable``).

    If anything fails (or the process dies) before the rename, ``path`` keeps its previous
    content; on an exception the temporary file is removed. The file gets the usual
    permissions (umask), and the temporary name is unique per call, so concurrent writers of
    one target never mix their bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda file: file.write(data), durable=durable)


def write_text_atomic(path: str | os.PathLike[str], text: str, durable: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Encode ``array`` (H x W grey or H x W x 3 BGR, uint8) as PNG and write it atomically."""
    try:  # OpenCV reports some bad arrays by returning False, others by raising cv2.error
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"cannot encode {path} as PNG (array {array.dtype} {array.shape})")
    write_bytes_atomic(path, encoded.tobytes())

"""Atomic file writing: a crash leaves the old file or the new one, never half a file.

Every file the framework writes for users (checkpoints, evaluation and comparison reports,
predictions, ONNX models, benchmark results) goes through :func:`atomic_write`: the content
is written to a temporary file beside the target and renamed over it. ``durable=True``
(checkpoints) also fsyncs the file and the folder, so that the rename survives a power cut;
the default skips that, as thousands of small outputs (prediction PNGs) would pay for it.

A write that fails on the system's side (a full disk, no permission) raises one
:class:`~seg.errors.OutputError` line naming the target and the reason; the target keeps
its previous content and the temporary file is removed. Temporary files are named
``.<name>.<host>-<pid>-<random>.partial``: one left by a killed process (``kill -9``, a
power cut) is found and removed by :func:`remove_stale_partials`, which the writers of
checkpoints, predictions and ONNX models call when they start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from seg.errors import OutputError, SegError

try:  # POSIX advisory locks; elsewhere concurrent writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: ``.<name>.<host>-<pid>-<8 hex>.partial[.ext]``; the host part is absent in older names.
_PARTIAL = re.compile(
    r"^\..+?\.(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)-[0-9a-f]{8}\.partial(?:\.[A-Za-z0-9]+)?$"
)
#: A partial file untouched this long is stale whoever wrote it (writers write continuously).
STALE_AFTER_S = 24 * 3600


def _host() -> str:
    """This machine's short name, as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def partial_path(path: str | os.PathLike[str], suffix: str = "") -> Path:
    """A temporary name beside ``path`` unique to this call: ``.<name>.<host>-<pid>-<hex>.partial``
    plus ``suffix`` (e.g. ``.mp4`` for writers that pick a format from the suffix)."""
    path = Path(path)
    tag = f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}.{tag}.partial{suffix}")


def process_alive(pid: int) -> bool:
    """True while process ``pid`` runs on this machine (or cannot be told: another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def is_stale_partial(path: Path, now: float | None = None) -> bool:
    """True for a temporary file of :func:`atomic_write` whose writer is gone: written on
    this machine by a process that no longer runs, or untouched for ``STALE_AFTER_S``."""
    match = _PARTIAL.match(path.name)
    if match is None or not path.is_file():
        return False
    host = match.group("host")
    if host in (None, _host()) and not process_alive(int(match.group("pid"))):
        return True
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def remove_stale_partials(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Remove the stale temporary files (:func:`is_stale_partial`) in ``folder`` (and its
    subfolders when ``recursive``); returns what was removed. Never raises: a file that
    cannot be removed (read-only media) is left."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.partial*") if recursive else folder.glob(".*.partial*"):
        if is_stale_partial(path):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


def _os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` that ``error`` is or was raised from (torch wraps a failed write of
    its zip writer in a ``RuntimeError`` raised while handling it), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe_os_error(error: OSError) -> str:
    """``No space left on device (ENOSPC)``: the reason of an ``OSError`` in a few words."""
    reason = error.strerror or str(error) or type(error).__name__
    name = errno.errorcode.get(error.errno) if error.errno is not None else None
    return f"{reason} ({name})" if name else reason


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

    Raises:
        OutputError: the system refused the write (full disk, no permission, read-only
            file system), in one line naming ``path`` and the reason; ``error.reason``
            holds the reason alone and ``error.errno`` the system's code.
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "xb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        cause = None if isinstance(error, SegError) else _os_error_in(error)
        if cause is None:
            raise
        reason = describe_os_error(cause)
        failure = OutputError(f"cannot write {path}: {reason}")
        failure.errno, failure.reason = cause.errno, reason
        raise failure from error
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


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if absent) for the block, so
    that processes filling the same folder (loader workers, DDP ranks) take turns."""
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)

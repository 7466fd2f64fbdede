"""Project exceptions.

Every error a user can cause (bad data, bad config, bad checkpoint) is raised as a
``SegError`` subclass whose message is one line naming the file, key or value at fault.
The tools catch ``SegError`` at the top, print the message and exit with status 2, so
users see one clear line instead of a traceback.
"""

import logging


class SegError(Exception):
    """Base class of the errors that ``tools/*.py`` report as a single line."""


class DatasetError(SegError):
    """A dataset root, split, image or label is missing, unreadable or inconsistent."""


class CheckpointError(SegError):
    """A checkpoint file is missing, truncated, not a checkpoint, or does not fit the config."""


class ConfigError(SegError):
    """A configuration value is invalid (wrong range, unknown name, inconsistent sizes)."""


class OutputError(SegError, OSError):
    """A file for users (checkpoint, report, prediction, model) cannot be written: a full
    disk, no permission. Also an ``OSError``, with ``errno`` set where the system gave one;
    ``reason`` is the system's reason alone (``No space left on device (ENOSPC)``)."""

    reason: str = ""


def first_line(error: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """The first non-empty line of ``error``'s message (its type name when it has none).

    Library exceptions (Hydra, torch, onnx) often carry many lines; a one-line ``SegError``
    quotes this line instead. ``with_type`` prefixes ``TypeName: ``; ``limit`` caps the
    length so that a huge message cannot flood the one line.
    """
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    if with_type and text:
        line = f"{type(error).__name__}: {line}"
    return line[:limit]


def log_to_files(error: BaseException, logger: str = "seg.train") -> None:
    """Write ``error``'s message as one ERROR record to the log files of the ``seg`` logger
    (``train.log`` during a training run; nothing outside one).

    For an error about to end a run: the tool's error edge prints it on the console, so
    the console handlers are left out and the line is shown once.
    """
    handlers = [h for h in logging.getLogger("seg").handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        return
    source = logging.getLogger(logger)
    record = source.makeRecord(source.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in handlers:
        handler.handle(record)

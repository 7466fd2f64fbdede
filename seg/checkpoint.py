"""Atomic checkpoint saving and safe loading.

A checkpoint is one ``torch.save`` file holding a dict with keys ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``loss`` (state dicts), ``iteration`` (int), ``rng``, ``config``
(the resolved config as plain containers) and ``metrics``. Only tensors and plain Python
containers go in, so that :func:`load_checkpoint` can use ``weights_only=True``: a
hostile file cannot run code while it is read (and its ``config`` builds only seg's own
classes: ``seg.engine.load.check_stored_config``). docs/reliability.md states the guarantees.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from seg.errors import CheckpointError, OutputError, first_line
from seg.fileio import atomic_write, remove_stale_partials

CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "iteration",
    "rng",
    "config",
    "metrics",
)
#: Keys needed to evaluate a checkpoint; resuming training asks for all of ``CHECKPOINT_KEYS``.
EVAL_KEYS = ("model", "config")


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Save ``payload`` (a checkpoint dict) to ``path`` atomically and durably (fsynced).

    The temporary files of writes killed earlier in the same folder (``kill -9`` during a
    save) are removed first (``seg.fileio.remove_stale_partials``).

    Raises:
        CheckpointError: the file could not be written (a full disk, no permission), in one
            line naming ``path`` and the reason; ``path`` keeps its previous content.
    """
    path = Path(path)
    remove_stale_partials(path.parent)
    try:
        atomic_write(path, lambda file: torch.save(dict(payload), file), durable=True)
    except OutputError as error:
        kept = (
            f"the previous {path.name} is unchanged"
            if path.is_file()
            else f"no {path.name} was written"
        )
        raise CheckpointError(f"cannot save checkpoint {path}: {error.reason}; {kept}") from error


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    required_keys: Iterable[str] = EVAL_KEYS,
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its keys.

    Loading also removes the temporary files of killed saves beside ``path``
    (``seg.fileio.remove_stale_partials``): resuming a run killed during a save starts by
    clearing them.

    Raises:
        CheckpointError: one line naming ``path``, for a missing or unreadable file, a
            file that is not a PyTorch zip archive, a truncated file, content refused by
            the weights-only unpickler (objects that could run code), a top-level object
            that is not a dict, or missing ``required_keys``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    remove_stale_partials(path.parent)
    try:
        with path.open("rb") as file:
            head = file.read(4)
    except OSError as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first_line(error, with_type=True)}"
        ) from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty")
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            # A zip's directory sits at its end: a zip start without it means a cut-off file.
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt (zip archive without its end)"
            )
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save zip file)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long; keep its line naming the refused global, if any.
        detail = next(
            (ln.strip() for ln in str(error).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
            "",
        )
        raise CheckpointError(
            f"refused to load checkpoint {path}: it holds objects other than tensors and "
            f"plain containers, which could run code when unpickled"
            + (f" ({detail[:160]})" if detail else "")
        ) from None
    except Exception as error:
        message = first_line(error, with_type=True)
        if "PytorchStreamReader" in message or isinstance(error, EOFError):
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt ({message[:160]})"
            ) from None
        raise CheckpointError(f"cannot load checkpoint {path}: {message[:200]}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not a seg checkpoint: it holds a {type(checkpoint).__name__}, not a dict"
        )
    missing = [key for key in required_keys if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks required keys {missing}")
    if "model" in checkpoint and not isinstance(checkpoint["model"], dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict")
    if "config" in checkpoint and not isinstance(checkpoint["config"], dict):
        raise CheckpointError(f"checkpoint {path}: 'config' is not a dict")
    return checkpoint

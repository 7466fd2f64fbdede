"""Loading model weights from a local file, with a clear report of what did not fit.

Nothing is downloaded: pretrained weights are a file the user points to. The file is read
with ``torch.load(..., weights_only=True)`` so that a hostile file cannot run code. It may
hold a raw state dict or a ``seg`` checkpoint (a dict with a ``"model"`` key).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from seg.errors import CheckpointError

logger = logging.getLogger(__name__)


#: Key prefixes added by wrappers: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``module.``, ``_orig_mod.``) that every key carries."""
    cleaned = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if cleaned and all(key.startswith(prefix) for key in cleaned):
            cleaned = {key[len(prefix) :]: value for key, value in cleaned.items()}
    return cleaned


@dataclass
class WeightsReport:
    """What ``load_weights`` did: loaded keys, and keys that were missing, unexpected or
    of the wrong shape (these last ones are skipped, not loaded)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts per category, and the first few keys of each problem list."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.path}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape-mismatched", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        return "; ".join(parts)


#: Key prefix of the auxiliary heads, which a deployment model is built without.
AUX_PREFIX = "aux_heads."


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    strict: bool = True,
) -> WeightsReport:
    """Load ``state`` into ``model``: the one way a state dict becomes a model's weights.

    Wrapper prefixes (``module.``, ``_orig_mod.``) are stripped; entries of the auxiliary
    heads are dropped when ``model`` was built without them (a training checkpoint loaded
    for deployment), and only then.

    Args:
        model: the module to fill.
        state: a state dict (e.g. a checkpoint's ``"model"``).
        source: the file it came from, named in messages.
        strict: any missing, unexpected or shape-mismatched key is an error; otherwise
            what fits is loaded and what was skipped is logged.
    Raises:
        CheckpointError: ``strict`` and the weights do not fit: one line with the count and
            the first keys of the first kind of misfit.
    """
    cleaned = strip_wrapper_prefixes(state)
    expected = model.state_dict()
    if not any(key.startswith(AUX_PREFIX) for key in expected):
        cleaned = {k: v for k, v in cleaned.items() if not k.startswith(AUX_PREFIX)}
    report = WeightsReport(path=str(source))
    report.missing = sorted(set(expected) - set(cleaned))
    report.unexpected = sorted(set(cleaned) - set(expected))
    report.mismatched = sorted(
        f"{k} {tuple(cleaned[k].shape)} in the file vs {tuple(expected[k].shape)} in the model"
        for k in set(expected) & set(cleaned)
        if cleaned[k].shape != expected[k].shape
    )
    fitting = {k: v for k, v in cleaned.items() if k in expected and v.shape == expected[k].shape}
    report.loaded = sorted(fitting)
    if strict:
        for label, keys in (
            ("missing keys", report.missing),
            ("unexpected keys", report.unexpected),
            ("shape mismatches", report.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                raise CheckpointError(
                    f"{source}: weights do not fit the model: {len(keys)} {label} ({shown})"
                )
    model.load_state_dict(fitting, strict=strict)
    if report.missing or report.unexpected or report.mismatched:
        logger.warning("weights: %s", report.summary())
    return report


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a raw state dict or the ``"model"`` entry of a checkpoint from ``path``.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-type errors all mean "not usable"
        raise CheckpointError(f"cannot read weights file {path}: {error}") from error
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        payload = payload["model"]
    if not isinstance(payload, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items()
    ):
        raise CheckpointError(
            f"weights file {path} holds neither a state dict nor a checkpoint with a 'model' key"
        )
    return dict(payload)


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    prefix: str = "",
    only: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> WeightsReport:
    """Load tensors from ``path`` into ``model`` where names and shapes match.

    Args:
        model: the module to fill (its initialisation stays where nothing is loaded).
        path: local file with a state dict or a checkpoint dict with a ``"model"`` key.
        prefix: keys in the file start with this prefix (e.g. ``"backbone."``); it is
            stripped and keys without it are ignored. A DDP ``"module."`` prefix is
            stripped in any case.
        only: load only model keys starting with one of these prefixes (e.g.
            ``("detail.", "semantic.")`` for the backbone); other model keys are
            neither loaded nor reported missing, other file keys not reported unexpected.
        ignore: file keys (after prefix stripping) starting with one of these prefixes
            are dropped silently, e.g. ``("aux_heads.",)`` for a model built without them.
    Returns:
        A ``WeightsReport``; its summary is logged (a warning when anything did not fit).
    Raises:
        CheckpointError: the file is missing or unreadable, or nothing in it matches.
    """
    source = read_state_dict(path)
    stripped: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        key = key.removeprefix("module.")
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :]
        if not key.startswith(tuple(ignore)):
            stripped[key] = value

    def selected(key: str) -> bool:
        return only is None or key.startswith(tuple(only))

    target = {key: value for key, value in model.state_dict().items() if selected(key)}
    report = WeightsReport(path=str(path))
    to_load: dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        if key not in target:
            if selected(key):
                report.unexpected.append(key)
        elif value.shape != target[key].shape:
            report.mismatched.append(
                f"{key} {tuple(value.shape)} vs model {tuple(target[key].shape)}"
            )
        else:
            to_load[key] = value
    report.missing = [key for key in target if key not in to_load and key not in stripped]
    report.loaded = sorted(to_load)
    if not to_load:
        raise CheckpointError(
            f"no tensor in weights file {path} matches the model (prefix {prefix!r}); "
            f"{report.summary()}"
        )
    model.load_state_dict(to_load, strict=False)
    if report.missing or report.unexpected or report.mismatched:
        logger.warning("weights: %s", report.summary())
    else:
        logger.info("weights: %s", report.summary())
    return report

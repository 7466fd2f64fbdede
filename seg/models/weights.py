"""Loading model weights: one strict loader with a report, and safe reading of weight files.

:func:`load_into` is the one function that puts a state dict into a model, for
``model.weights=`` and for the checkpoint loaders of eval, predict and export. It is strict
by default: a state dict that does not fit stops with one line naming the source, the
counts and the first offending keys.

Nothing is downloaded: weights are a local file the user points to. Files are read with
``torch.load(..., weights_only=True)`` so that a hostile file cannot run code; both the
zip format of ``torch.save`` (PyTorch >= 1.6) and the older format of published
checkpoints are accepted.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg.checkpoint import load_checkpoint
from seg.errors import CheckpointError, first_line
from seg.models.state_keys import guess_format, strip_wrapper_prefixes

logger = logging.getLogger(__name__)

#: State-dict prefix of the auxiliary heads (training only; absent from deployment models).
AUX_HEADS_PREFIX = "aux_heads."
#: Model arguments that name weight files read while the model is built. Loaders that take
#: every weight from a checkpoint (eval, predict, export) set these to None first.
WEIGHT_FILE_ARGUMENTS = ("weights", "backbone_weights")
#: How many offending keys an error message shows per category.
SHOWN_KEYS = 3
#: A pickle of protocol 2, which is how the pre-zip ``torch.save`` format starts.
LEGACY_TORCH_HEAD = b"\x80\x02"


def _shown(keys: Sequence[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


@dataclass
class WeightsReport:
    """What :func:`load_into` did with a state dict.

    ``loaded``: keys copied into the model. ``missing``: model keys the state lacks.
    ``unexpected``: state keys the model lacks. ``mismatched``: keys present in both with
    other shapes, as ``"key (shape) in the file vs (shape) in the model"``. ``dropped``: auxiliary-head
    entries left out because the model was built without auxiliary heads (not a problem).
    ``reinitialised``: classifier tensors whose class dimension alone differs (fine-tuning
    to another class count): not loaded, they keep the model's initialisation (not a
    problem); ``class_counts``: the class counts of the file and the model then.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    class_counts: tuple[int, int] | None = None

    @property
    def fits(self) -> bool:
        """True when nothing was missing, unexpected or of the wrong shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """Counts and first keys of each problem category, e.g. ``"2 missing keys (a, b)"``."""
        parts = []
        for label, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} ({_shown(keys)})")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line: what was loaded from where, then any problems and dropped entries."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if not self.fits:
            parts.append("skipped " + self.problems())
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} auxiliary-head entries")
        if self.reinitialised and self.class_counts is not None:
            in_file, in_model = self.class_counts
            parts.append(
                f"re-initialised {len(self.reinitialised)} classifier tensors of the heads "
                f"(the file predicts {in_file} classes, this model {in_model}; names below)"
            )
        return "; ".join(parts)


def _mismatch(key: str, value: torch.Tensor, expected: torch.Tensor) -> str:
    return f"{key} {tuple(value.shape)} in the file vs {tuple(expected.shape)} in the model"


def _class_dimension_only(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """The two shapes differ in their first (output, class) dimension alone."""
    return (
        value.ndim == expected.ndim >= 1
        and value.shape[0] != expected.shape[0]
        and value.shape[1:] == expected.shape[1:]
    )


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    strict: bool = True,
    classifiers: Sequence[str] = (),
) -> WeightsReport:
    """Load ``state`` into ``model`` and report what fitted.

    Args:
        model: the module to fill; where nothing is loaded it keeps its initialisation.
        state: a state dict; a wrapper prefix (``module.``, ``_orig_mod.``) that every key
            carries is stripped. Entries under ``aux_heads.`` are dropped when ``model`` has
            no auxiliary heads (a training checkpoint loaded for deployment), and only then.
        source: where ``state`` came from (a path), named in messages.
        strict: any missing, unexpected or shape-mismatched key raises; otherwise what fits
            is loaded and what was skipped is logged as a warning.
        classifiers: names of the modules (``head.classifier``) whose output dimension is
            the class count, given by the model (``BiSeNetV2.classifier_modules``). Their
            tensors whose first dimension alone differs from the model's are not loaded:
            they keep the model's fresh initialisation, are listed in ``reinitialised``
            and logged (a warning line, then their names), and are no problem even when
            strict. Empty (the default, every checkpoint loader): no exception.
    Returns:
        A :class:`WeightsReport`.
    Raises:
        CheckpointError: one line naming ``source``, the counts and the first offending
            keys (strict), or nothing at all fits (either mode).
    """
    cleaned = strip_wrapper_prefixes(state)
    target = model.state_dict()
    model_has_aux = any(key.startswith(AUX_HEADS_PREFIX) for key in target)
    report = WeightsReport(source=str(source))
    to_load: dict[str, torch.Tensor] = {}
    candidates: dict[str, tuple[int, int]] = {}  # classifier key -> (file, model) classes
    for key, value in cleaned.items():
        if key not in target:
            if key.startswith(AUX_HEADS_PREFIX) and not model_has_aux:
                report.dropped.append(key)
            else:
                report.unexpected.append(key)
        elif not isinstance(value, torch.Tensor):
            report.mismatched.append(f"{key} ({type(value).__name__}, not a tensor)")
        elif value.shape != target[key].shape:
            if key.rpartition(".")[0] in classifiers and _class_dimension_only(value, target[key]):
                candidates[key] = (int(value.shape[0]), int(target[key].shape[0]))
            else:
                report.mismatched.append(_mismatch(key, value, target[key]))
        else:
            to_load[key] = value
    if len(set(candidates.values())) == 1:  # one class count in the file, another here
        report.reinitialised = [key for key in target if key in candidates]  # model order
        report.class_counts = next(iter(candidates.values()))
    else:  # the classifiers disagree among themselves: not a class-count change
        report.mismatched += [_mismatch(key, cleaned[key], target[key]) for key in candidates]
    report.missing = [key for key in target if key not in cleaned]
    report.loaded = sorted(to_load)
    name = type(model).__name__
    if strict and not report.fits:
        raise CheckpointError(f"weights from {source} do not fit {name}: {report.problems()}")
    if not to_load and target:
        raise CheckpointError(
            f"no tensor of {source} fits {name}: {report.problems() or 'the state is empty'}"
        )
    model.load_state_dict(to_load, strict=report.fits and not report.reinitialised)
    if report.fits and not report.reinitialised:
        logger.info("weights: %s", report.summary())
    else:
        logger.warning("weights: %s", report.summary())
    if report.reinitialised:
        logger.warning("weights: re-initialised (class count): %s", ", ".join(report.reinitialised))
    return report


# ------------------------------------------------------------------------- reading files
def _load_legacy(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a pre-zip ``torch.save`` file, one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next(
            (ln.strip() for ln in str(error).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
            "",
        )
        if detail:  # the weights-only unpickler refused a global: nothing was run
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain "
                f"containers, which could run code when unpickled ({detail[:160]})"
            ) from None
        raise CheckpointError(
            f"{path} is truncated or corrupt ({first_line(error, with_type=True, limit=160)})"
        ) from None
    except (EOFError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({first_line(error, with_type=True, limit=160)})"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"cannot load {path}: {first_line(error, with_type=True, limit=200)}"
        ) from None


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """The dict stored in a ``torch.save`` file, read without running code.

    Zip files (PyTorch >= 1.6) go through :func:`seg.checkpoint.load_checkpoint`;
    files in the older format (many published checkpoints) are read with the same
    weights-only unpickler.

    Raises:
        CheckpointError: one line naming ``path``: missing, empty, not a PyTorch file,
            truncated, holding objects that could run code, or not holding a dict.
    """
    path = Path(path)
    head = b""
    if path.is_file():
        try:
            with path.open("rb") as file:
                head = file.read(len(LEGACY_TORCH_HEAD))
        except OSError as error:
            raise CheckpointError(
                f"cannot read {path}: {first_line(error, with_type=True)}"
            ) from None
    if head != LEGACY_TORCH_HEAD:
        return load_checkpoint(path, map_location="cpu", required_keys=())
    payload = _load_legacy(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a dict of weights")
    return payload


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items()
    )


def state_dict_of(payload: Mapping[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a weights file's dict: the dict itself, or its ``model``
    (seg checkpoint) or ``state_dict`` (mmsegmentation / mmengine checkpoint) entry.

    Raises:
        CheckpointError: none of these is a mapping of names to tensors.
    """
    for key in ("model", "state_dict"):
        if _is_state_dict(payload.get(key)):
            return dict(payload[key])
    if _is_state_dict(payload) and payload:
        return dict(payload)
    hint = ""
    if {"detail", "segment"} <= set(payload) and all(
        _is_state_dict(payload[k]) for k in ("detail", "segment")
    ):
        hint = " (it looks like a backbone file: use model.backbone_weights=PATH)"
    raise CheckpointError(
        f"{path} holds neither a state dict nor a checkpoint with a 'model' or 'state_dict' "
        f"state dict (top-level keys: {_shown(sorted(map(str, payload)))}){hint}"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a raw state dict, or the state dict of a checkpoint, from ``path``."""
    return state_dict_of(read_weights_file(path), path)


def _warn_on_other_settings(
    payload: Mapping[str, Any], settings: Mapping[str, Any], path: str | Path
) -> None:
    config = payload.get("config")
    stored = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(stored, Mapping):
        return
    for key, value in settings.items():
        if key in stored and stored[key] != value:
            logger.warning(
                "weights: %s comes from a model with %s=%r, this model has %s=%r: its outputs "
                "will differ from the source's (set model.%s=%r to match)",
                path, key, stored[key], key, value, key, stored[key],
            )  # fmt: skip


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    prefix: str = "",
    only: Sequence[str] | None = None,
    strict: bool = True,
    settings: Mapping[str, Any] | None = None,
    classifiers: Sequence[str] = (),
) -> WeightsReport:
    """Load the weights file ``path`` into ``model`` with :func:`load_into`.

    Args:
        model: the module to fill.
        path: local file with a state dict or a checkpoint (``model`` / ``state_dict``).
        prefix: keys in the file start with this prefix (e.g. ``"backbone."``); it is
            stripped and keys without it are ignored.
        only: names of top-level submodules of ``model`` to load (e.g. ``("detail",
            "semantic")`` for the backbone); other submodules keep their initialisation
            and file keys outside them are ignored.
        strict, classifiers: as in :func:`load_into`.
        settings: model arguments that change what the weights compute (e.g.
            ``{"bga_upsample": "bilinear"}``); where the file is a seg checkpoint whose
            ``config.model`` stored another value, a warning names both.
    Raises:
        CheckpointError: the file is unreadable or does not fit. A state dict in the layout
            of a published BiSeNetV2 (CoinCheung/BiSeNet, mmsegmentation) is named, with
            the converter to run.
    """
    payload = read_weights_file(path)
    _warn_on_other_settings(payload, settings or {}, path)
    state = strip_wrapper_prefixes(state_dict_of(payload, path))
    if prefix:
        state = {
            key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
        }
    target: nn.Module = model
    if only is not None:
        target = nn.ModuleDict({name: model.get_submodule(name) for name in only})
        state = {key: value for key, value in state.items() if key.split(".", 1)[0] in only}
    try:
        return load_into(target, state, path, strict=strict, classifiers=classifiers)
    except CheckpointError as error:
        source_format = guess_format(state)
        if source_format in ("coincheung", "mmseg"):
            raise CheckpointError(
                f"{error}; {path} is a {source_format} BiSeNetV2 state dict: convert it first "
                f"with python tools/convert_weights.py src={path} out=converted.pt"
            ) from None
        raise

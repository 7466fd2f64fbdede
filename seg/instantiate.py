"""``hydra.utils.instantiate`` restricted to the project's own classes, with one-line errors.

Checkpoints are data, and so are the configs stored in them: evaluating, predicting with or
exporting a checkpoint rebuilds its model (and, for evaluation, its dataset and evaluator)
from the stored config. A ``_target_`` is an import path that Hydra imports and calls, so a
planted ``_target_`` would make a checkpoint run code. :func:`build_from_checkpoint` (and
:func:`check_targets`, which ``seg.engine.load`` runs on a whole stored config first)
therefore checks every ``_target_`` of a node, at any depth, against
:data:`ALLOWED_TARGETS` before anything is imported or built, and refuses the whole node
with one ``ConfigError`` line naming the key and the value. A new model, dataset, transform,
loss, optimizer or schedule joins the list in the change that adds the class. The configs a
user writes for training are the user's own code and may name any class (:func:`build`);
Python code that evaluates checkpoints of its own classes admits them for a block with
:func:`allow_targets` (neither a config nor a checkpoint can).

Hydra wraps anything a ``_target_`` raises in a multi-line ``InstantiationException``. A
``SegError`` raised inside (a missing dataset root, a bad loss setting) reaches the user
as itself, in one line; any other failure becomes a one-line ``ConfigError`` naming what
could not be built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seg.errors import ConfigError, SegError, first_line

#: Every ``_target_`` a config may name, by kind. Spelled as the configs spell them (the
#: stored configs of older checkpoints use the same names).
ALLOWED_BY_KIND: dict[str, tuple[str, ...]] = {
    "models": ("seg.models.bisenetv2.BiSeNetV2",),
    "datasets": (
        "seg.data.cityscapes.CityscapesDataset",
        "seg.data.folder.FolderDataset",
        "seg.data.synthcity.SynthCityDataset",
    ),
    "transforms": (
        "seg.data.transforms.build_train_transform",
        "seg.data.transforms.build_eval_transform",
    ),
    "evaluator": ("seg.engine.evaluator.Evaluator",),
    "losses": (
        "seg.losses.CrossEntropyLoss",
        "seg.losses.OhemCELoss",
        "seg.losses.FocalLoss",
        "seg.losses.GhmcLoss",
        "seg.losses.MultiHeadLoss",
    ),
    "optimizer": ("seg.engine.optim.build_sgd",),
    "schedule": ("seg.engine.schedule.WarmupPolyLR",),
}
ALLOWED_TARGETS: frozenset[str] = frozenset(t for ts in ALLOWED_BY_KIND.values() for t in ts)

# Admitted from Python for a block (allow_targets); never read from a config.
_extra_targets: list[str] = []


@contextlib.contextmanager
def allow_targets(*targets: str) -> Iterator[None]:
    """Admit the import paths ``targets`` besides :data:`ALLOWED_TARGETS` inside the block.

    For Python code and tests that build a class of their own from a config (e.g. a stand-in
    model): the tools never call it, so a checkpoint cannot widen the list.
    """
    _extra_targets.extend(targets)
    try:
        yield
    finally:
        for target in targets:
            _extra_targets.remove(target)


def is_allowed(target: object) -> bool:
    """True when ``target`` is an import path :func:`build` may instantiate."""
    return isinstance(target, str) and (target in ALLOWED_TARGETS or target in _extra_targets)


def _plain(node: Any) -> Any:
    """``node`` as plain dicts/lists with interpolations resolved (what Hydra would see)."""
    if isinstance(node, DictConfig | ListConfig):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as error:
            where = _node_key(node) or "the config"
            raise ConfigError(f"cannot resolve {where}: {first_line(error)}") from None
    return node


def _node_key(node: Any) -> str:
    """The dotted key of an OmegaConf node inside its config (``dataset.val``), or ''."""
    if isinstance(node, DictConfig | ListConfig):
        with contextlib.suppress(Exception):
            return str(node._get_full_key(None))
    return ""


def find_refused_target(node: Any, prefix: str = "") -> tuple[str, object] | None:
    """The first ``(dotted key, value)`` of a ``_target_`` in ``node`` (any depth, dicts and
    lists) that is not allowed, or None when every one is."""
    node = _plain(node)
    if isinstance(node, Mapping):
        if "_target_" in node and not is_allowed(node["_target_"]):
            return f"{prefix}_target_", node["_target_"]
        for key, value in node.items():
            found = find_refused_target(value, f"{prefix}{key}.")
            if found is not None:
                return found
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            found = find_refused_target(value, f"{prefix}{index}.")
            if found is not None:
                return found
    return None


def check_targets(node: Any, what: str) -> None:
    """Refuse ``node`` with one line if any ``_target_`` in it is not allowed; ``what``
    completes "refused to build ..." (``"the dataset"``, ``"from checkpoint x.pt"``).

    Raises:
        ConfigError: naming the key (``dataset.val.transform._target_``) and its value.
    """
    key = _node_key(node)
    found = find_refused_target(node, f"{key}." if key else "")
    if found is not None:
        where, target = found
        raise ConfigError(
            f"refused to build {what}: {where}={target!r} is not one of seg's own classes "
            f"(seg.instantiate.ALLOWED_TARGETS: {', '.join(ALLOWED_BY_KIND)}); configs, "
            "and the configs stored in checkpoints, build nothing else"
        )


def build_from_checkpoint(node: Any, what: str, **kwargs: Any) -> Any:
    """:func:`build` for a node of a config stored in a checkpoint: every ``_target_`` in
    ``node`` must be allowed (:func:`check_targets`) before anything is imported."""
    check_targets(node, f"the {what}")
    return build(node, what, **kwargs)


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)`` for a config the user wrote; ``what`` names the
    object in error messages.

    Raises:
        ConfigError: any build failure, in one line.
        SegError: raised by the target itself (e.g. ``DatasetError``), passed on as is.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, SegError):
            cause = cause.__cause__
        if isinstance(cause, SegError):
            raise cause from None
        # Hydra's first line only names the target ("Error in call to target 'x.Y':"); the
        # reason is the cause's message, on the next line.
        reason = first_line(error)
        if error.__cause__ is not None:
            reason = f"{reason.rstrip(':')}: {first_line(error.__cause__, with_type=True)}"
        raise ConfigError(f"cannot build the {what}: {reason}") from None

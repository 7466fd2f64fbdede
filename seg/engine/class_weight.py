"""``loss.class_weight``: its check, ``auto`` resolved once when a run starts, its log lines.

``loss.class_weight`` is the loss config's one per-class weight setting; configs/loss/*.yaml
pass it to every head's loss (``class_weights: ${loss.class_weight}``), where it enters as
each loss documents (seg/losses/). Its values:

- ``null``: no class weights (every loss as without them);
- a list of ``dataset.num_classes`` finite numbers >= 0, not all 0;
- ``auto``: the median-frequency weights of the train split
  (:mod:`seg.data.class_weights`), computed by one pass over the train labels when a run
  starts, on rank 0, and shared with the other ranks.

A run stores the list it trained with: its config gets ``loss.class_weight: [...]`` (so
eval, resume and the comparison report see the numbers) and, for ``auto``, the record
``resolved_from`` (``seg.engine.state.RESOLVED_FROM``) holding ``auto`` at every key that
resolution changed. ``resume=auto`` compares configs as their commands gave them, so the
same command typed again continues the run, and a resumed ``auto`` run takes its list from
the checkpoint instead of counting again: the weights never change within a run.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from seg.data.class_weights import count_class_frequency, format_weights
from seg.engine.state import RESOLVED_FROM, flatten
from seg.errors import ConfigError
from seg.instantiate import build

logger = logging.getLogger("seg.train")

AUTO = "auto"
KEY = "loss.class_weight"

#: What ``loss.class_weight`` is: None, ``"auto"`` or one weight per class.
ClassWeight = None | str | list[float]


def class_weight_setting(cfg: DictConfig) -> ClassWeight:
    """Check ``loss.class_weight`` (one ``ConfigError`` line naming the key) and return it.

    A set value is also tried on the loss: it is built once with weights of 1, so that a loss
    that takes no class weights (GHM-C), or a loss config whose heads do not pass the setting
    on, stops the run before the train labels are read.
    """
    value = OmegaConf.select(cfg, KEY, default=None)
    if value is None:
        return None
    num_classes = int(cfg.dataset.num_classes)
    if isinstance(value, str):
        if value != AUTO:
            raise ConfigError(
                f"{KEY} must be null, auto or a list of {num_classes} numbers, got {value!r}"
            )
        _try_on_loss(cfg, num_classes)
        return AUTO
    if not isinstance(value, ListConfig | list | tuple):
        raise ConfigError(
            f"{KEY} must be null, auto or a list of {num_classes} numbers, got {value!r}"
        )
    values = list(value)
    if len(values) != num_classes:
        raise ConfigError(
            f"{KEY} lists {len(values)} weights but dataset.num_classes is {num_classes} "
            f"(one weight per class): {values}"
        )
    bad = [v for v in values if not _is_weight(v)]
    if bad:
        raise ConfigError(f"{KEY} must hold finite numbers >= 0, got {bad[0]!r} in {values}")
    if not any(v > 0 for v in values):
        raise ConfigError(f"{KEY} must hold at least one weight above 0, got {values}")
    _try_on_loss(cfg, num_classes)
    return [float(v) for v in values]


def _is_weight(value: Any) -> bool:
    """A finite number >= 0 (not a bool)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= 0


def _try_on_loss(cfg: DictConfig, num_classes: int) -> None:
    """Build the loss with weights of 1: a loss that refuses class weights says so now, and
    a loss config whose heads do not pass the setting on is an error (none) or a warning."""
    trial = copy.deepcopy(cfg)
    trial.loss.class_weight = [1.0] * num_classes
    loss = build(trial.loss, "loss")
    heads = getattr(loss, "losses", {})
    unweighted = [h for h, m in heads.items() if getattr(m, "class_weights", None) is None]
    if heads and len(unweighted) == len(heads):
        raise ConfigError(
            f"{KEY} is set but no head's loss takes it: the loss config must pass it on as "
            "class_weights: ${loss.class_weight} (see configs/loss/ce.yaml)"
        )
    if unweighted:
        logger.warning("%s: heads %s take no class weights (their loss config)", KEY, unweighted)


def stored_auto_weights(checkpoint: Mapping[str, Any] | None) -> list[float] | None:
    """The list a checkpoint's run resolved from ``loss.class_weight=auto`` (else None)."""
    config = (checkpoint or {}).get("config") or {}
    record = config.get(RESOLVED_FROM) or {}
    if (record.get("loss") or {}).get("class_weight") != AUTO:
        return None
    return [float(v) for v in config["loss"]["class_weight"]]


def with_class_weight(cfg: DictConfig, weights: list[float], resolved_auto: bool) -> DictConfig:
    """A copy of ``cfg`` with ``loss.class_weight`` set to ``weights``; when they resolve
    ``auto``, with the ``resolved_from`` record of every key that changed (the heads' too)."""
    out = copy.deepcopy(cfg)
    out.loss.class_weight = list(weights)
    if resolved_auto:
        before = flatten(OmegaConf.to_container(cfg, resolve=True))
        after = flatten(OmegaConf.to_container(out, resolve=True))
        record: dict[str, Any] = {}
        for key, value in before.items():
            if after.get(key) != value:  # loss.class_weight and the heads' copies of it
                *parents, last = key.split(".")
                node = record
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[last] = value
        with open_dict(out):
            out[RESOLVED_FROM] = record
    return out


def resolve_class_weight(
    cfg: DictConfig,
    setting: ClassWeight,
    checkpoint: Mapping[str, Any] | None,
    train_dataset: Any,
    is_main: bool,
    share: Callable[[Any], Any],
) -> DictConfig:
    """``cfg`` with ``loss.class_weight`` as the run trains with it, the weights logged.

    ``auto``: the list the resumed ``checkpoint`` resolved, else one pass over the labels
    of ``train_dataset`` on the main rank (``is_main``), handed to every rank by ``share``
    (a broadcast from rank 0; the identity in one process). Other settings are returned
    as they are (``setting`` from :func:`class_weight_setting`).
    """
    names = [str(n) for n in cfg.dataset.class_names]
    if setting is None:
        return cfg
    if setting != AUTO:
        logger.info("%s: %s", KEY, format_weights(names, setting))
        return cfg
    stored = stored_auto_weights(checkpoint)
    if stored is not None:
        logger.info(
            "%s=auto: the weights this run computed when it started: %s",
            KEY,
            format_weights(names, stored),
        )
        return with_class_weight(cfg, stored, resolved_auto=True)
    result = None
    if is_main:
        frequency = count_class_frequency(train_dataset)
        weights = frequency.weights(len(names)).tolist()
        result = (weights, frequency.images, frequency.absent(len(names)))
    weights, images, absent = share(result)
    logger.info(
        "%s=auto: median-frequency weights of the train split (%d labels): %s",
        KEY,
        images,
        format_weights(names, weights),
    )
    if absent:
        logger.warning(
            "%s=auto: no train pixel of %s, weight 0",
            KEY,
            ", ".join(names[c] for c in absent),
        )
    return with_class_weight(cfg, weights, resolved_auto=True)

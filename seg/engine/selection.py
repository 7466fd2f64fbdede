"""Which evaluation is best, and when a run stops improving: ``trainer.best_metric`` and
``trainer.early_stop``.

``trainer.best_metric`` names the score that chooses ``best.pt``: one of the summary
metrics of every evaluation (:data:`SUMMARY_METRICS`: ``mIoU``, the default, ``mAcc``,
``aAcc``, ``fwIoU``) or one class's IoU, ``IoU/<class name>`` with the name exactly as in
``dataset.class_names`` (``IoU/road``; quote names with spaces on the command line:
``'trainer.best_metric=IoU/traffic light'``). Higher is better for all of them. The name
is checked against the dataset's class names before anything is built.

``trainer.early_stop`` (``{patience: N, min_delta: D}``; ``patience: null`` is off) ends a
run whose best metric has not improved by more than ``min_delta`` (in the metric's own
units, fractions: 0.005 is half a point) for ``patience`` evaluations in a row. As in
Lightning's ``EarlyStopping`` callback, an evaluation counts as an improvement
when it beats the reference score (the best score at the last counted improvement) by
more than ``min_delta``; small gains below ``min_delta`` still update ``best.pt`` but do
not reset the count, and they add up against the unchanged reference. The count and the
reference live in :class:`seg.engine.state.TrainState` and in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from seg.errors import ConfigError
from seg.values import float_setting, int_setting

#: The summary metrics of an evaluation that ``trainer.best_metric`` may name.
SUMMARY_METRICS: tuple[str, ...] = ("mIoU", "mAcc", "aAcc", "fwIoU")
#: ``IoU/<class name>``: one class's IoU.
CLASS_IOU_PREFIX = "IoU/"


@dataclass(frozen=True)
class BestMetric:
    """The score that chooses ``best.pt``: a summary metric, or the IoU of class
    ``class_index`` (``name`` is then ``IoU/<class name>``)."""

    name: str = "mIoU"
    class_index: int | None = None

    def value(self, metrics: Mapping[str, Any]) -> float:
        """This score in ``metrics`` (``ConfusionMatrix.compute()``; NaN when undefined,
        e.g. a class absent from both the ground truth and the predictions)."""
        if self.class_index is None:
            return float(metrics[self.name])
        value = metrics["IoU"][self.class_index]
        return math.nan if value is None else float(value)


def parse_best_metric(value: Any, class_names: Sequence[str]) -> BestMetric:
    """``trainer.best_metric`` checked against the summary metrics and ``class_names``.

    Raises:
        ConfigError: an unknown name, in one line listing the valid ones.
    """
    name = "mIoU" if value is None else str(value)
    if name in SUMMARY_METRICS:
        return BestMetric(name)
    names = [str(n) for n in class_names]
    if name.startswith(CLASS_IOU_PREFIX) and name[len(CLASS_IOU_PREFIX) :] in names:
        return BestMetric(name, names.index(name[len(CLASS_IOU_PREFIX) :]))
    valid = [*SUMMARY_METRICS, *(f"{CLASS_IOU_PREFIX}{n}" for n in names)]
    raise ConfigError(
        f"trainer.best_metric={name!r} is not a metric of this run; valid: {', '.join(valid)}"
    )


@dataclass(frozen=True)
class EarlyStopSettings:
    """``trainer.early_stop``: stop after ``patience`` evaluations in a row without an
    improvement of more than ``min_delta``."""

    patience: int
    min_delta: float = 0.0


def early_stop_settings(node: Any) -> EarlyStopSettings | None:
    """``trainer.early_stop``: None (or ``patience: null``) for off, else the checked settings."""
    if node is None:
        return None
    if not isinstance(node, DictConfig | dict):
        raise ConfigError(
            f"trainer.early_stop must be null or {{patience: N, min_delta: D}}, got {node!r}"
        )
    unknown = set(node) - {"patience", "min_delta"}
    if unknown:
        raise ConfigError(
            f"trainer.early_stop has unknown keys {sorted(unknown)} (patience, min_delta)"
        )
    patience = node.get("patience")
    if patience is None:
        return None
    min_delta = float_setting(node.get("min_delta", 0.0), "trainer.early_stop.min_delta")
    if not 0.0 <= min_delta < 1.0:  # also refuses NaN; the metrics are fractions in [0, 1]
        raise ConfigError(
            f"trainer.early_stop.min_delta must be in [0, 1) (metrics are fractions: "
            f"0.005 is half a point), got {min_delta!r}"
        )
    return EarlyStopSettings(
        patience=int_setting(patience, "trainer.early_stop.patience", minimum=1),
        min_delta=min_delta,
    )


def stalled(evals_since_improvement: int, settings: EarlyStopSettings | None) -> bool:
    """True when early stopping is on and its patience has run out."""
    return settings is not None and evals_since_improvement >= settings.patience

"""Statistics of a loss comparison: per-loss mean +- std over seeds and rare classes.

Which loss is ahead is decided by the paired bootstrap (``seg.bootstrap``, called by
``seg.compare.report``), not here.

Pure functions of the runs' final metrics (:class:`seg.compare.runs.RunResult`); figures
are fractions in [0, 1].
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seg.compare.runs import RunResult

#: The fraction of classes, least frequent first by training pixel count, called "rare".
RARE_FRACTION = 1.0 / 3.0


def rare_classes(train_pixels: Sequence[int], fraction: float = RARE_FRACTION) -> list[int]:
    """Train ids of the least frequent ``fraction`` of classes by training pixel count."""
    count = max(1, round(len(train_pixels) * fraction))
    return sorted(int(k) for k in np.argsort(np.asarray(train_pixels), kind="stable")[:count])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


@dataclass
class LossSummary:
    """One loss over its seeds (fractions in [0, 1], seconds)."""

    loss: str
    seeds: list[int]
    miou: list[float]
    miou_mean: float
    miou_std: float
    rare_miou_mean: float
    rare_miou_std: float
    class_iou_mean: list[float]
    seconds_per_iter: float


def summarize(
    results: Sequence[RunResult], losses: Sequence[str], rare: Sequence[int]
) -> list[LossSummary]:
    """Per-loss statistics over seeds, in the order of ``losses``."""
    summaries = []
    for loss in losses:
        runs = [r for r in results if r.loss == loss]
        mious = [r.miou for r in runs]
        rare_mious = [_nanmean([r.class_iou[k] for k in rare]) for r in runs]
        per_class = np.array([r.class_iou for r in runs], dtype=np.float64)
        with warnings.catch_warnings():  # a class absent from every run is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            class_mean = np.nanmean(per_class, axis=0).tolist()
        miou_mean, miou_std = _mean_std(mious)
        rare_mean, rare_std = _mean_std(rare_mious)
        summaries.append(
            LossSummary(
                loss=loss,
                seeds=[r.seed for r in runs],
                miou=mious,
                miou_mean=miou_mean,
                miou_std=miou_std,
                rare_miou_mean=rare_mean,
                rare_miou_std=rare_std,
                class_iou_mean=class_mean,
                seconds_per_iter=statistics.median([r.seconds_per_iter for r in runs]),
            )
        )
    return summaries

"""Confusion matrix and the segmentation metrics derived from it.

Semantics follow the official Cityscapes evaluation:

* pixels whose label is ``ignore_index`` are not counted at all;
* ``IoU_c = TP / (TP + FP + FN)`` over the whole split, with no +1 in the denominator;
* a class absent from both ground truth and prediction has IoU NaN and is left out of
  the mean (a class predicted but absent from the ground truth has IoU 0);
* ``Acc_c = TP / (TP + FN)`` (per-class recall), NaN for a class without ground-truth pixels;
* ``aAcc`` is the overall pixel accuracy, ``fwIoU`` the IoU weighted by ground-truth frequency.

All values are fractions in [0, 1]; tables show them as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from seg import dist
from seg.errors import DatasetError
from seg.tables import markdown_table


class ConfusionMatrix:
    """A ``num_classes x num_classes`` count matrix (rows: ground truth, columns: prediction).

    Counts stay on ``device`` and are accumulated with one ``bincount`` per update, so
    evaluation does not copy predictions to the host.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(
            (self.num_classes, self.num_classes), dtype=torch.int64, device=device
        )

    def reset(self) -> None:
        """Zero all counts."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: int64 N x H x W predicted class ids in ``[0, num_classes)``.
            target: int64 N x H x W ground-truth ids; ``ignore_index`` pixels are skipped.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        n = self.num_classes
        target = target.to(self.matrix.device)
        pred = pred.to(self.matrix.device)
        valid = target != self.ignore_index
        index = target[valid].long() * n + pred[valid].long()
        counts = torch.bincount(index, minlength=n * n)
        if counts.numel() != n * n:
            # bincount returns more than n*n bins only for ids >= num_classes; predictions
            # are argmax ids < n, so the culprit is the label (no extra sync: the size is known).
            raise DatasetError(
                f"label id >= num_classes {n} found (labels must be train ids in [0, {n}) "
                f"or ignore_index {self.ignore_index}); does the dataset match the model?"
            )
        self.matrix += counts.view(n, n)

    def all_reduce(self) -> None:
        """Sum the counts of all DDP processes (no-op in a single process)."""
        dist.all_reduce_sum(self.matrix)

    def compute(self) -> dict[str, Any]:
        """Metrics of the counts so far; see :func:`metrics_from_matrix`."""
        return metrics_from_matrix(self.matrix)


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def metrics_from_matrix(matrix: torch.Tensor) -> dict[str, Any]:
    """Compute metrics from a C x C confusion matrix (rows: ground truth, cols: prediction).

    Returns ``{"IoU": [C floats], "Acc": [C floats], "mIoU", "mAcc", "aAcc", "fwIoU"}``;
    per-class lists hold NaN for undefined classes, the means skip them.
    """
    m = matrix.detach().to("cpu", torch.float64)
    tp = m.diagonal()
    gt = m.sum(dim=1)  # TP + FN
    predicted = m.sum(dim=0)  # TP + FP
    union = gt + predicted - tp  # TP + FP + FN
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = m.sum()
    if total > 0:
        a_acc = float(tp.sum() / total)
        freq = gt / total
        # Classes with NaN IoU have no ground-truth pixels, hence weight 0.
        fw_iou = float((freq * torch.nan_to_num(iou, nan=0.0)).sum())
    else:
        a_acc = fw_iou = math.nan
    return {
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": a_acc,
        "fwIoU": fw_iou,
    }


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"


def format_metrics_table(
    metrics: dict[str, Any],
    class_names: Sequence[str] | None = None,
    markdown: bool = False,
) -> str:
    """Per-class IoU / accuracy table plus the summary line, values in percent.

    ``markdown=True`` gives a GitHub table; otherwise fixed-width text for the console.
    """
    iou, acc = metrics["IoU"], metrics["Acc"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        names = [str(i) for i in range(len(iou))]
    summary = [
        ("mIoU", metrics["mIoU"]),
        ("mAcc", metrics["mAcc"]),
        ("aAcc", metrics["aAcc"]),
        ("fwIoU", metrics["fwIoU"]),
    ]
    if markdown:
        per_class = [
            [name, _percent(i), _percent(a)] for name, i, a in zip(names, iou, acc, strict=True)
        ]
        totals = [[key, _percent(value)] for key, value in summary]
        return (
            markdown_table(["class", "IoU", "Acc"], per_class, align=["left", "right", "right"])
            + "\n\n"
            + markdown_table(["metric", "value"], totals, align=["left", "right"])
            + "\n"
        )
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'IoU':>7} {'Acc':>7}", "-" * (width + 16)]
    lines += [
        f"{name:<{width}} {_percent(i):>7} {_percent(a):>7}"
        for name, i, a in zip(names, iou, acc, strict=True)
    ]
    lines.append("-" * (width + 16))
    lines.append("  ".join(f"{key} {_percent(value)}" for key, value in summary))
    return "\n".join(lines)

"""Is an evaluation's model predicting (nearly) one class only? The collapse warning.

A model that learns to predict one class everywhere (the background of a binary task,
the dominant class of a few-class one: a learning rate too high, a loss that only sees
easy pixels, a class balance far from the data's) still scores a positive mIoU, so the
curves alone can hide it. Each periodic evaluation checks its confusion matrix (rows:
ground truth, columns: prediction, ignored pixels left out) against two rules:

1. one class receives at least :data:`COLLAPSE_PREDICTED_SHARE` of the predicted pixels
   while it holds at most :data:`COLLAPSE_MAX_TRUE_SHARE` of the ground-truth pixels (so
   a class that really covers nearly every pixel does not count);
2. the IoU is 0 for every class but one, among at least two classes with an IoU (a class
   absent from both the ground truth and the predictions has none).

Either one gives one line in ``train.log`` and ``val/collapsed`` = 1 in TensorBoard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seg.metrics import metrics_from_matrix

#: Rule 1: a class holding this share of all predicted pixels or more (95%) ...
COLLAPSE_PREDICTED_SHARE = 0.95
#: ... while holding no more than this share of the ground truth (75%): at least 20 points
#: of the pixels are then given to that class although they belong to others.
COLLAPSE_MAX_TRUE_SHARE = 0.75


def collapse_message(matrix: torch.Tensor, class_names: Sequence[str] | None = None) -> str | None:
    """Why the predictions of this confusion matrix count as collapsed, or None.

    Args:
        matrix: C x C counts, rows ground truth, columns prediction (``ConfusionMatrix``).
        class_names: C names for the message (ids when None or of another length).
    Returns:
        One line naming the class and the shares (percent), or None when neither rule holds.
    """
    m = matrix.detach().to("cpu", torch.float64)
    total = float(m.sum())
    if total <= 0:
        return None
    names = list(class_names or [])
    if len(names) != m.shape[0]:
        names = [str(i) for i in range(m.shape[0])]
    predicted_share = m.sum(dim=0) / total
    true_share = m.sum(dim=1) / total
    top = int(predicted_share.argmax())
    reasons = []
    if (
        float(predicted_share[top]) >= COLLAPSE_PREDICTED_SHARE
        and float(true_share[top]) <= COLLAPSE_MAX_TRUE_SHARE
    ):
        reasons.append(
            f"{100 * float(predicted_share[top]):.1f}% of the predicted pixels are "
            f"{names[top]!r}, which holds {100 * float(true_share[top]):.1f}% of the ground truth"
        )
    iou = torch.tensor(metrics_from_matrix(matrix)["IoU"], dtype=torch.float64)
    defined = ~torch.isnan(iou)
    nonzero = defined & (iou > 0)
    if int(defined.sum()) >= 2 and int(nonzero.sum()) == 1:
        only = int(nonzero.nonzero()[0])
        reasons.append(f"the IoU is 0 for every class but {names[only]!r}")
    if not reasons:
        return None
    return "predictions collapsed to one class: " + "; ".join(reasons)

"""The confusion matrix of an evaluation as an image for TensorBoard.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no window, no global
state), so it is safe in a training process and under tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def confusion_image(
    matrix: torch.Tensor,
    class_names: Sequence[str],
    iou: Sequence[float] | None = None,
    title: str = "",
) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB image.

    Args:
        matrix: C x C counts, rows ground truth, columns prediction.
        class_names: C names (``class_<i>`` where missing).
        iou: per-class IoU in [0, 1] (NaN: class absent), shown beside each row's name.
        title: the figure's title.
    Returns:
        H x W x 3 uint8, about 90 px per inch at a size that grows with C.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = matrix.detach().to("cpu", torch.float64).numpy()
    size = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    # Each row is the share of that class's pixels given to each prediction (recall on the
    # diagonal); a class without ground-truth pixels keeps an empty row.
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    names = [class_names[i] if i < len(class_names) else f"class_{i}" for i in range(size)]
    labels = names
    if iou is not None:
        labels = [
            f"{name} ({'n/a' if v is None or math.isnan(float(v)) else f'{100 * float(v):.1f}'})"
            for name, v in zip(names, list(iou) + [None] * size, strict=False)
        ]
    side = 2.5 + 0.3 * size
    figure = Figure(figsize=(side + 1.5, side), dpi=90, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(shares, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(size), names, rotation=90, fontsize=8)
    axes.set_yticks(range(size), labels, fontsize=8)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth (IoU %)" if iou is not None else "ground truth")
    if title:
        axes.set_title(title, fontsize=9)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="share of the row's pixels")
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])

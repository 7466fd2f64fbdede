"""Cross-entropy averaged over valid pixels, with optional class weights."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from seg.losses.pixel import (
    LabelLogProbLoss,
    PixelLoss,
    class_vector,
    mean_over,
    pixel_class_weights,
)


class CrossEntropyLoss(PixelLoss):
    """Cross-entropy averaged over valid pixels, with optional class weights.

    With ``class_weights`` w (one finite value >= 0 per class; the loss config's
    ``loss.class_weight``) the mean is PyTorch's weighted mean over the valid pixels i,

        loss = sum_i w[y_i] * CE_i / sum_i w[y_i]

    as ``torch.nn.functional.cross_entropy(weight=w)``; without, the plain mean. A batch
    with no valid pixel, or whose valid pixels all weigh 0, gives 0 (torch: NaN).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(ignore_index=ignore_index, num_classes=num_classes)
        vector = class_vector(class_weights, num_classes, "CrossEntropyLoss class_weights")
        self.register_buffer("class_weights", vector, persistent=False)

    def _compute(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        num_classes = logits.shape[1]
        safe, valid = self._prepare_labels(labels, num_classes)
        pixel_weight = valid.float()
        class_weight = pixel_class_weights(
            self.class_weights, safe, num_classes, "CrossEntropyLoss"
        )
        if class_weight is not None:
            pixel_weight = pixel_weight * class_weight

        def term(log_p: Tensor) -> tuple[Tensor, Tensor]:
            loss, scaled = mean_over(log_p, pixel_weight)
            return -loss, -scaled

        return LabelLogProbLoss.apply(logits, safe, term), {}

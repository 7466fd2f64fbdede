"""Cross-entropy averaged over valid pixels, with optional class weights."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from seg.errors import ConfigError
from seg.losses.pixel import LabelLogProbLoss, PixelLoss, class_vector, mean_over


class CrossEntropyLoss(PixelLoss):
    """Cross-entropy averaged over valid pixels, with optional class weights.

    With ``class_weights`` w the mean is sum(w[y] * l) / sum(w[y]) over valid pixels, as in
    ``torch.nn.functional.cross_entropy``. A batch with no valid pixel gives 0 (torch: NaN).
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
        if self.class_weights is not None:
            if self.class_weights.numel() != num_classes:
                raise ConfigError(
                    f"CrossEntropyLoss: {self.class_weights.numel()} class_weights for "
                    f"{num_classes} classes"
                )
            pixel_weight = pixel_weight * self.class_weights[safe.squeeze(1)]

        def term(log_p: Tensor) -> tuple[Tensor, Tensor]:
            loss, scaled = mean_over(log_p, pixel_weight)
            return -loss, -scaled

        return LabelLogProbLoss.apply(logits, safe, term), {}

"""Focal loss over softmax (Lin et al., ICCV 2017), per pixel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from seg.errors import ConfigError
from seg.losses.pixel import LabelLogProbLoss, PixelLoss, class_vector, pixel_class_weights


class FocalLoss(PixelLoss):
    """Focal loss over softmax, -alpha_t (1 - p_t)^gamma log p_t, averaged over valid pixels.

    ``alpha`` (optional) lists one weight per class; the mean divides by the number of valid
    pixels (not by the sum of alpha). With ``gamma=0`` and no ``alpha`` it is cross-entropy.

    ``class_weights`` w (optional, one finite value >= 0 per class; the loss config's
    ``loss.class_weight``) is a per-class factor like alpha whose mean is CrossEntropyLoss's
    weighted one: over the valid pixels i,

        loss = sum_i w[y_i] * alpha[y_i] * (1 - p_i)^gamma * (-log p_i) / sum_i w[y_i]

    (alpha = 1 when not given), so ``gamma=0`` with w and no alpha is CrossEntropyLoss with
    the same w. Valid pixels that all weigh 0 give 0.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Sequence[float] | None = None,
        ignore_index: int = 255,
        num_classes: int | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(ignore_index=ignore_index, num_classes=num_classes)
        if not gamma >= 0:
            raise ConfigError(f"FocalLoss gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer(
            "alpha", class_vector(alpha, num_classes, "FocalLoss alpha"), persistent=False
        )
        vector = class_vector(class_weights, num_classes, "FocalLoss class_weights")
        self.register_buffer("class_weights", vector, persistent=False)

    def _compute(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        num_classes = logits.shape[1]
        safe, valid = self._prepare_labels(labels, num_classes)
        pixel_weight = valid.float()
        if self.alpha is not None:
            if self.alpha.numel() != num_classes:
                raise ConfigError(
                    f"FocalLoss: {self.alpha.numel()} alpha values for {num_classes} classes"
                )
            pixel_weight = pixel_weight * self.alpha[safe.squeeze(1)]
        class_weight = pixel_class_weights(self.class_weights, safe, num_classes, "FocalLoss")
        # Mean over valid pixels, written as in CrossEntropyLoss so that gamma=0 without
        # alpha reproduces it bit for bit (with the same class weights too).
        denominator = valid.float()
        if class_weight is not None:
            pixel_weight = pixel_weight * class_weight
            denominator = denominator * class_weight
        scale = pixel_weight / denominator.sum().clamp_min(torch.finfo(torch.float32).tiny)

        def term(log_p: Tensor) -> tuple[Tensor, Tensor]:
            # Autograd on the N x H x W per-pixel values only (cheap) gives dLoss/dlog p_t.
            with torch.enable_grad():
                log_p = log_p.detach().requires_grad_()
                per_pixel = -log_p
                if self.gamma != 0:
                    # 1 - p_t as -expm1 (accurate near p_t = 1); the floor keeps the gradient
                    # of (1 - p_t)^gamma finite for gamma < 1 when p_t rounds to 1.
                    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
                    per_pixel = one_minus_p.pow(self.gamma) * per_pixel
                loss = torch.dot(per_pixel.reshape(-1), scale.reshape(-1))
                (coeff,) = torch.autograd.grad(loss, log_p)
            return loss.detach(), coeff

        return LabelLogProbLoss.apply(logits, safe, term), {}

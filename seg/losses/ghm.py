"""Gradient harmonized cross-entropy (GHM-C) over softmax, with its moving bin counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from seg.errors import ConfigError
from seg.losses.pixel import LabelLogProbLoss, PixelLoss


class GhmcLoss(PixelLoss):
    """Gradient harmonized cross-entropy over softmax (GHM-C; Li, Liu and Wang, AAAI 2019).

    Each valid pixel's gradient norm is ``g = 1 - p_t``: the norm of the cross-entropy's
    gradient with respect to its true-class logit. ``[0, 1]`` is cut into ``bins`` equal
    regions (region i holds ``i / bins <= g < (i + 1) / bins``; ``g = 1`` falls in the last).
    With N valid pixels, R_i of them in region i and M non-empty regions in the batch, each
    pixel's cross-entropy is weighted by the inverse gradient density
    ``beta = N / (M * R_i)`` and

        loss = (1 / N) * sum over valid pixels of beta * CE

    so each non-empty region carries the same total weight and the many easy pixels (small
    g) no longer dominate. With one bin this is plain cross-entropy. As in the official
    implementation (mmdetection's ``GHMC``), M counts the regions that are non-empty in this
    batch, and the weights are constants: no gradient flows through them.

    Momentum ``m > 0`` replaces R_i by a moving count A_i <- m * A_i + (1 - m) * R_i, updated
    only for the regions non-empty in this batch; ``beta = N / (M * A_i)``. A starts at 0, as
    in the official code, so the first steps are scaled up: by 1 / (1 - m^k) after k steps
    of a steady distribution (x4, x2.3, x1.7, ... for m = 0.75). The moving counts are the
    buffer ``bin_counts`` (float32, ``bins``), updated by every call (training or not) and
    saved by ``state_dict()``: a checkpoint must hold it for a resumed run to be exact.

    Everything stays on the device (``bucketize`` and a fixed-size ``scatter_add_``): no
    host-device sync. ``forward_with_stats`` reports ``easy_fraction``, the fraction of valid
    pixels in the lowest region (g < 1 / bins). A batch with no valid pixel gives 0 with zero
    gradients and leaves ``bin_counts`` unchanged.

    Class weights (``loss.class_weight``) are refused: GHM-C's weights are normalised so that
    every non-empty gradient region carries the same total weight, a per-class factor would
    undo that balance, and the method defines no place for one.
    """

    def __init__(
        self,
        bins: int = 10,
        momentum: float = 0.75,
        ignore_index: int = 255,
        num_classes: int | None = None,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(ignore_index=ignore_index, num_classes=num_classes)
        if class_weights is not None:
            raise ConfigError(
                "GhmcLoss takes no class weights (loss.class_weight must be null with loss=ghm): "
                "GHM-C already balances its pixels by gradient density, per gradient region"
            )
        if isinstance(bins, bool) or int(bins) != bins or bins < 1:
            raise ConfigError(f"GhmcLoss bins must be an integer >= 1, got {bins}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"GhmcLoss momentum must be in [0, 1), got {momentum}")
        self.bins = int(bins)
        self.momentum = float(momentum)
        # Inner region edges 1/bins .. (bins-1)/bins, in float32 like g.
        inner = torch.arange(1, self.bins, dtype=torch.float32) / self.bins
        self.register_buffer("inner_edges", inner, persistent=False)
        self.register_buffer("bin_counts", torch.zeros(self.bins, dtype=torch.float32))

    def forward_with_stats(
        self, logits: Tensor, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """As ``forward``, plus ``{"easy_fraction": 0-dim tensor}``; updates ``bin_counts``."""
        if self.bin_counts.device != logits.device:
            raise ConfigError(
                f"GhmcLoss: its bin counts are on {self.bin_counts.device} but the logits on "
                f"{logits.device}; move the loss to the model's device (loss.to(device))"
            )
        return super().forward_with_stats(logits, labels)

    def _compute(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        safe, valid = self._prepare_labels(labels, logits.shape[1])
        stats: dict[str, Tensor] = {}

        def term(log_p: Tensor) -> tuple[Tensor, Tensor]:
            grad_norm = -torch.expm1(log_p)  # 1 - p_t, accurate near p_t = 1
            weights, new_counts, easy_fraction = ghm_pixel_weights(
                grad_norm, valid, self.bin_counts, self.inner_edges, self.momentum
            )
            self.bin_counts.copy_(new_counts)
            stats["easy_fraction"] = easy_fraction
            # loss = sum(w * CE) = -w . log p_t, so dLoss/dlog p_t = -w.
            return -torch.dot(log_p.reshape(-1), weights.reshape(-1)), weights.neg()

        return LabelLogProbLoss.apply(logits, safe, term), stats


def ghm_pixel_weights(
    grad_norm: Tensor,
    valid: Tensor,
    bin_counts: Tensor,
    inner_edges: Tensor,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """GHM-C weights beta / N per pixel, the updated moving counts, and the easy fraction.

    Args:
        grad_norm: float32 N x H x W, g = 1 - p_t in [0, 1].
        valid: bool N x H x W, the pixels that count.
        bin_counts: float32 ``bins``, the moving counts A before this batch (not modified).
        inner_edges: float32 ``bins - 1``, the region edges 1/bins .. (bins-1)/bins.
        momentum: m in [0, 1); 0 uses this batch's counts alone.

    Returns:
        ``(weights, new_counts, easy_fraction)``: float32 N x H x W weights
        1 / (M * A_i) on valid pixels and 0 elsewhere (so sum(weights * CE) is the loss),
        float32 ``bins`` counts after this batch, and a 0-dim float32 fraction of valid pixels
        in region 0. Fixed shapes only and no host reads (no host-device sync).
    """
    region = torch.bucketize(grad_norm, inner_edges, right=True)  # int64 in [0, bins)
    batch_counts = torch.zeros(bin_counts.shape, dtype=torch.int64, device=grad_norm.device)
    batch_counts.scatter_add_(0, region.reshape(-1), valid.reshape(-1).long())
    nonempty = batch_counts > 0
    moving = momentum * bin_counts + (1.0 - momentum) * batch_counts.float()
    new_counts = torch.where(nonempty, moving, bin_counts)
    n_nonempty = torch.count_nonzero(nonempty)
    tiny = torch.finfo(torch.float32).tiny
    # beta / N = 1 / (M * A_i) on the non-empty regions; empty regions hold no valid pixel.
    per_region = torch.where(nonempty, (new_counts * n_nonempty).clamp_min(tiny).reciprocal(), 0)
    weights = per_region[region] * valid
    easy_fraction = batch_counts[0] / batch_counts.sum().clamp_min(1)
    return weights, new_counts, easy_fraction.float()

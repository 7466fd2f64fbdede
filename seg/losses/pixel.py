"""What every per-pixel loss shares: the label-log-probability autograd function, the
input checks and the label range check, the weighted mean, and per-class vectors.

All four losses (:mod:`.cross_entropy`, :mod:`.focal`, :mod:`.ohem`, :mod:`.ghm`) are
functions of ``log p_t`` (the log-probability of each pixel's label) and share one autograd
function, :class:`LabelLogProbLoss`. Its backward needs only a per-pixel coefficient
``c = dLoss/d log p_t``, because ``d log p_t / dz_j = [j = t] - p_j``:

    grad = -c * softmax(z) + c at the label's channel

It writes this into the saved log-softmax buffer in place (``exp_``, ``mul_``, one
``scatter_add_``), so a step allocates one N x C x H x W float32 buffer in the forward and
none in the backward (``F.cross_entropy`` allocates three). A second backward through the same
graph is refused by autograd's version-counter check (the buffer has been overwritten).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from seg.errors import ConfigError, DatasetError

# A pixel term maps log p_t (float32 N x H x W, detached) to (loss: 0-dim, dloss/dlog p_t: N x H x W).
PixelTerm = Callable[[Tensor], tuple[Tensor, Tensor]]


class LabelLogProbLoss(torch.autograd.Function):
    """Loss = term(log_softmax(logits)[label]); gradient via the saved log-softmax, in place."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, safe_labels: Tensor, term: PixelTerm) -> Tensor:
        """logits: float32 N x C x H x W; safe_labels: int64 N x 1 x H x W, all in [0, C)."""
        log_probs = torch.log_softmax(logits, dim=1)
        log_p_label = log_probs.gather(1, safe_labels).squeeze(1)
        loss, coeff = term(log_p_label)
        ctx.save_for_backward(log_probs, safe_labels, coeff)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        log_probs, safe_labels, coeff = ctx.saved_tensors
        neg_c = (coeff * -grad_loss).unsqueeze(1)  # N x 1 x H x W
        grad = log_probs.exp_().mul_(neg_c)  # -c * softmax, reusing the saved buffer
        grad.scatter_add_(1, safe_labels, neg_c.neg_())
        return grad, None, None


def mean_over(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean sum(w * v) / sum(w) and its gradient w / sum(w); 0 when sum(w) == 0."""
    scaled = weights / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.dot(values.reshape(-1), scaled.reshape(-1)), scaled


class PixelLoss(nn.Module):
    """Shared input handling: shape and label checks, float32 cast, autocast off.

    Label range check (label >= C or < 0, other than ``ignore_index``): it needs a reduction
    over the labels, and reading that on the host would be a host-device sync per step. On
    CPU tensors the check is immediate (no device to wait for). On an accelerator the minimum
    and maximum label are copied to pinned host memory without blocking and inspected at a
    later call, once the copy's CUDA event has completed: the ``DatasetError`` then comes one
    or two steps late but with no sync, and meanwhile out-of-range labels are clamped so that
    no device-side assert can fire.
    """

    def __init__(self, ignore_index: int = 255, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"loss num_classes must be >= 1, got {num_classes}")
        self.ignore_index = int(ignore_index)
        self.num_classes = num_classes
        self._pending_label_checks: list[tuple[Any, Tensor, int]] = []

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits N x C x H x W (any float dtype), labels int64 N x H x W -> float32 scalar."""
        return self.forward_with_stats(logits, labels)[0]

    def forward_with_stats(
        self, logits: Tensor, labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """As ``forward``, plus a dict of 0-dim tensors for logging."""
        self._check_shapes(logits, labels)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._compute(logits.float(), labels.long())

    def _compute(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _check_shapes(self, logits: Tensor, labels: Tensor) -> None:
        name = type(self).__name__
        if logits.dim() != 4 or not logits.is_floating_point():
            raise ConfigError(
                f"{name}: logits must be a float N x C x H x W tensor, got {logits.dtype} "
                f"{tuple(logits.shape)}"
            )
        if labels.dim() != 3 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ConfigError(
                f"{name}: labels must be an integer N x H x W tensor, got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        n, c, h, w = logits.shape
        if tuple(labels.shape) != (n, h, w):
            raise ConfigError(
                f"{name}: labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} "
                f"(labels must come at the logits' resolution)"
            )
        if self.num_classes is not None and c != self.num_classes:
            raise ConfigError(
                f"{name}: logits have {c} channels but num_classes is {self.num_classes}"
            )

    def _prepare_labels(self, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Labels made safe to index with, and their valid mask, after the range check.

        Returns ``(safe int64 N x 1 x H x W, valid bool N x H x W)``: ignored pixels get label 0
        in ``safe``. The range check is immediate on CPU and deferred on CUDA, where ``safe`` is
        clamped into ``[0, C)`` so that no device-side assert can fire meanwhile.
        """
        valid = labels != self.ignore_index
        safe = torch.where(valid, labels, 0)
        label_range = torch.stack(torch.aminmax(safe))
        if safe.device.type == "cpu":
            self._raise_if_out_of_range(*label_range.tolist(), num_classes)
        else:
            self._check_label_range_later(label_range, num_classes)
            safe = safe.clamp(0, num_classes - 1)
        return safe.unsqueeze(1), valid

    def _raise_if_out_of_range(self, low: int, high: int, num_classes: int) -> None:
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DatasetError(
                f"{type(self).__name__}: label value {bad} is outside [0, {num_classes}) and is "
                f"not ignore_index {self.ignore_index}; check the dataset's label mapping and "
                f"num_classes"
            )

    def _check_label_range_later(self, label_range: Tensor, num_classes: int) -> None:
        """Queue a sync-free check on CUDA; report earlier checks whose copy has landed."""
        if label_range.device.type != "cuda":  # no event API assumed: check now (one sync)
            self._raise_if_out_of_range(*label_range.tolist(), num_classes)
            return
        still_pending = []
        for event, host_range, classes in self._pending_label_checks:
            if event.query():
                self._raise_if_out_of_range(*host_range.tolist(), classes)
            else:
                still_pending.append((event, host_range, classes))
        host_range = torch.empty(2, dtype=label_range.dtype, pin_memory=True)
        host_range.copy_(label_range, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_label_checks = [*still_pending, (event, host_range, num_classes)]


def class_vector(
    values: Sequence[float] | None, num_classes: int | None, what: str
) -> Tensor | None:
    """Per-class float32 vector from config, checked: one finite value >= 0 per class.

    ``"auto"`` is refused here: the training run resolves ``loss.class_weight=auto`` to a
    list before it builds the loss (in Python, compute one with
    ``seg.data.class_weights.count_class_frequency``).
    """
    if values is None:
        return None
    if isinstance(values, str):
        raise ConfigError(
            f"{what} must be a list of numbers, got {values!r} ('auto' is resolved by "
            "tools/train.py from loss.class_weight=auto before the loss is built)"
        )
    try:
        vector = torch.as_tensor(list(values), dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{what} must be a list of numbers, got {values!r}") from None
    if vector.dim() != 1 or (num_classes is not None and vector.numel() != num_classes):
        raise ConfigError(
            f"{what} must list one value per class ({num_classes}), got {list(values)}"
        )
    if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
        raise ConfigError(f"{what} must be finite and non-negative, got {list(values)}")
    return vector


def pixel_class_weights(
    class_weights: Tensor | None, safe_labels: Tensor, num_classes: int, what: str
) -> Tensor | None:
    """Each pixel's class weight w[y]: float32 N x H x W (None without class weights).

    ``safe_labels``: int64 N x 1 x H x W in [0, C) (``PixelLoss._prepare_labels``).
    Indexing stays on the device: no host-device sync.
    """
    if class_weights is None:
        return None
    if class_weights.numel() != num_classes:
        raise ConfigError(
            f"{what}: {class_weights.numel()} class weights for {num_classes} classes"
        )
    return class_weights[safe_labels.squeeze(1)]

"""Segmentation losses: OHEM cross-entropy, cross-entropy, focal loss, GHM-C, and their per-head sum.

Every loss maps ``logits`` N x C x H x W (any float dtype) and ``labels`` int64 N x H x W
(train ids, ``ignore_index`` = ignore) to a float32 scalar. Work happens in float32 with
autocast off, so thresholds and logs are never evaluated in half precision.

All four losses are functions of ``log p_t`` (the log-probability of each pixel's label)
and share one autograd function, ``_LabelLogProbLoss``. Its backward needs only a per-pixel
coefficient ``c = dLoss/d log p_t``, because ``d log p_t / dz_j = [j = t] - p_j``:

    grad = -c * softmax(z) + c at the label's channel

It writes this into the saved log-softmax buffer in place (``exp_``, ``mul_``, one
``scatter_add_``), so a step allocates one N x C x H x W float32 buffer in the forward and
none in the backward (``F.cross_entropy`` allocates three). A second backward through the same
graph is refused by autograd's version-counter check (the buffer has been overwritten).

Edge cases: a batch with no valid pixel gives a loss of 0 with zero gradients (never NaN),
and a label outside ``[0, C)`` other than ``ignore_index`` raises ``DatasetError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from seg.errors import ConfigError, DatasetError

# A pixel term maps log p_t (float32 N x H x W, detached) to (loss: 0-dim, dloss/dlog p_t: N x H x W).
PixelTerm = Callable[[Tensor], tuple[Tensor, Tensor]]


class _LabelLogProbLoss(torch.autograd.Function):
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


def _mean_over(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean sum(w * v) / sum(w) and its gradient w / sum(w); 0 when sum(w) == 0."""
    scaled = weights / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.dot(values.reshape(-1), scaled.reshape(-1)), scaled


class _PixelLoss(nn.Module):
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


def _class_vector(
    values: Sequence[float] | None, num_classes: int | None, what: str
) -> Tensor | None:
    """Per-class float32 vector from config, checked against ``num_classes``."""
    if values is None:
        return None
    vector = torch.as_tensor(list(values), dtype=torch.float32)
    if vector.dim() != 1 or (num_classes is not None and vector.numel() != num_classes):
        raise ConfigError(
            f"{what} must list one value per class ({num_classes}), got {list(values)}"
        )
    if bool((vector < 0).any()):
        raise ConfigError(f"{what} must be non-negative, got {list(values)}")
    return vector


class CrossEntropyLoss(_PixelLoss):
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
        vector = _class_vector(class_weights, num_classes, "CrossEntropyLoss class_weights")
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
            loss, scaled = _mean_over(log_p, pixel_weight)
            return -loss, -scaled

        return _LabelLogProbLoss.apply(logits, safe, term), {}


class FocalLoss(_PixelLoss):
    """Focal loss over softmax, -alpha_t (1 - p_t)^gamma log p_t, averaged over valid pixels.

    ``alpha`` (optional) lists one weight per class; the mean divides by the number of valid
    pixels (not by the sum of alpha). With ``gamma=0`` and no ``alpha`` it is cross-entropy.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Sequence[float] | None = None,
        ignore_index: int = 255,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(ignore_index=ignore_index, num_classes=num_classes)
        if not gamma >= 0:
            raise ConfigError(f"FocalLoss gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer(
            "alpha", _class_vector(alpha, num_classes, "FocalLoss alpha"), persistent=False
        )

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
        # Mean over valid pixels, written as in CrossEntropyLoss so that gamma=0 without
        # alpha reproduces it bit for bit.
        scale = pixel_weight / valid.float().sum().clamp_min(torch.finfo(torch.float32).tiny)

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

        return _LabelLogProbLoss.apply(logits, safe, term), {}


class OhemCELoss(_PixelLoss):
    """Online hard example mining over per-pixel cross-entropy.

    Per-pixel CE (``ignore_index`` excluded); pixels with loss > -log(thresh) are hard.
    n_min = floor(valid pixels in the batch * min_kept_ratio) (at least 1 when any pixel is
    valid); if fewer than n_min pixels are hard, the n_min largest losses are kept instead.
    Returns the mean over the kept pixels; ``kept_fraction`` = kept / valid pixels.

    Our definitions where the reference versions return NaN: a batch with no valid pixel gives
    0 with zero gradients; fewer than 1 / min_kept_ratio valid pixels keep at least one pixel.

    Kept pixels are selected by weights (no boolean-mask copies), in one of two ways that give
    the same result (ties at the cut share the remaining weight, so the top-n_min mean is exact):

    - ``selection="host"``: read the hard and valid counts on the host, then take the top-n_min
      path only when it is needed, finding the n_min-th largest loss by a sampled quickselect
      (``kthvalue``), never a full sort. Fastest on CPU, where reading a count costs nothing.
    - ``selection="device"``: no host-device sync. n_min is computed on the device and the
      n_min-th largest loss is read from a sorted ``topk`` of the largest n_min that the batch
      shape allows; both paths are evaluated and one is chosen with ``torch.where``. The price
      is one ``topk`` per call even when enough pixels are hard.

    ``"auto"`` (the default) picks ``host`` for CPU tensors and ``device`` otherwise.
    """

    SELECTIONS = ("auto", "host", "device")

    def __init__(
        self,
        thresh: float = 0.7,
        ignore_index: int = 255,
        min_kept_ratio: float = 1 / 16,
        num_classes: int | None = None,
        selection: str = "auto",
    ) -> None:
        super().__init__(ignore_index=ignore_index, num_classes=num_classes)
        if not 0.0 < thresh < 1.0:
            raise ConfigError(
                f"OhemCELoss thresh must be a probability strictly between 0 and 1, got {thresh}"
            )
        if not 0.0 < min_kept_ratio <= 1.0:
            raise ConfigError(f"OhemCELoss min_kept_ratio must be in (0, 1], got {min_kept_ratio}")
        if selection not in self.SELECTIONS:
            raise ConfigError(
                f"OhemCELoss selection must be one of {list(self.SELECTIONS)}, got {selection!r}"
            )
        self.thresh = float(thresh)
        self.min_kept_ratio = float(min_kept_ratio)
        self.selection = selection
        self.loss_thresh = -math.log(self.thresh)  # per-pixel CE above this is "hard"

    def n_min(self, n_valid: int) -> int:
        """Minimum number of pixels kept for ``n_valid`` valid pixels."""
        if n_valid == 0:
            return 0
        return max(math.floor(n_valid * self.min_kept_ratio), 1)

    def _compute(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        safe, valid = self._prepare_labels(labels, logits.shape[1])
        selection = self.selection
        if selection == "auto":
            selection = "host" if logits.device.type == "cpu" else "device"
        kept_weights = self._kept_weights_host if selection == "host" else self._kept_weights_device
        stats: dict[str, Tensor] = {}

        def term(log_p: Tensor) -> tuple[Tensor, Tensor]:
            # log p_t <= 0, so ignored pixels (set to +1 here) get loss -1 and are never kept.
            pixel_loss = torch.where(valid, log_p, 1.0).neg_()
            n_valid = torch.count_nonzero(valid)
            weights, n_kept = kept_weights(pixel_loss, n_valid)
            # coeff = dLoss/dlog p_t: -1/n_kept on kept pixels, 0 elsewhere; loss = -coeff . log p_t
            coeff = weights * (-1.0 / n_kept.clamp_min(1))
            stats["kept_fraction"] = n_kept / n_valid.clamp_min(1)
            return -torch.dot(pixel_loss.view(-1), coeff.view(-1)), coeff

        return _LabelLogProbLoss.apply(logits, safe, term), stats

    def _kept_weights_host(self, pixel_loss: Tensor, n_valid_t: Tensor) -> tuple[Tensor, Tensor]:
        """Kept-pixel weights (0 or 1, ties shared; shaped like pixel_loss) and their count."""
        hard = pixel_loss > self.loss_thresh
        n_hard_t = torch.count_nonzero(hard)
        n_hard, n_valid = torch.stack([n_hard_t, n_valid_t]).tolist()
        n_min = self.n_min(n_valid)
        if n_hard >= n_min:
            return hard.float(), n_hard_t
        return top_k_weights(pixel_loss, n_min), torch.full_like(n_hard_t, n_min)

    def _kept_weights_device(self, pixel_loss: Tensor, n_valid_t: Tensor) -> tuple[Tensor, Tensor]:
        """As ``_kept_weights_host``, with every count kept on the device (no sync)."""
        flat = pixel_loss.view(-1)
        hard = flat > self.loss_thresh
        n_hard = torch.count_nonzero(hard)
        # n_min on the device, in float64 like n_min() so that the floor agrees exactly.
        n_min = torch.floor(n_valid_t.double() * self.min_kept_ratio).long().clamp_min(1)
        n_min = torch.where(n_valid_t > 0, n_min, 0)
        # The largest n_min the shape allows bounds the data's n_min: one static-size topk.
        top = flat.topk(self.n_min(flat.numel()), sorted=True).values
        cut = top.index_select(0, (n_min - 1).clamp_min(0).view(1))  # the n_min-th largest
        above = flat > cut
        tied = flat == cut
        # Ties at the cut share what is left of n_min; without ties that share is exactly 1.
        share = (n_min - torch.count_nonzero(above)) / torch.count_nonzero(tied).clamp_min(1)
        top_weights = above.float() + tied * share
        use_hard = n_hard >= n_min
        weights = torch.where(use_hard, hard.float(), top_weights)
        return weights.view_as(pixel_loss), torch.where(use_hard, n_hard, n_min)


# Top-k selection on the host path: the k-th largest of a sample of this many entries bounds the
# k-th largest of the whole from below, so that one quickselect runs on a candidate set
# of about 1.3 k entries instead of on every pixel (kthvalue on 2M floats costs about as
# much as a tenth of a cross-entropy step).
_SAMPLE_SIZE = 65536


def _kth_largest(flat: Tensor, k: int) -> tuple[float, Tensor]:
    """The k-th largest entry v of a 1-D tensor and a tensor holding every entry >= v.

    Returns ``(v, candidates)``. Exact: the candidates are all entries >= a threshold t with
    at least k of them, so v >= t and v is the k-th largest of the candidates.
    """
    n = flat.numel()
    stride = n // _SAMPLE_SIZE
    if stride >= 4:
        sample = flat[::stride]
        m = sample.numel()
        expected = k * m / n  # entries of the sample among the top k of the whole
        rank = min(m, math.ceil(1.25 * expected + 4.0 * math.sqrt(expected) + 16))
        t = sample.kthvalue(m - rank + 1).values
        candidates = flat[flat >= t]
        if candidates.numel() >= k:
            return candidates.kthvalue(candidates.numel() - k + 1).values.item(), candidates
    # Small input, or an unlucky sample: select on everything.
    return flat.kthvalue(n - k + 1).values.item(), flat


def top_k_weights(values: Tensor, k: int) -> Tensor:
    """Float weights shaped like ``values``, summing to k, that pick its k largest entries.

    Entries above the k-th largest value v weigh 1 and entries equal to v share the rest, so
    that sum(w * values) is exactly the sum of the k largest even with ties. The k-th largest is
    found by a sampled quickselect (``kthvalue``), never a full sort; reads v on the host.
    """
    flat = values.reshape(-1)
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    v, candidates = _kth_largest(flat, k)
    n_above = int(torch.count_nonzero(candidates > v))
    n_tied = int(torch.count_nonzero(candidates == v))
    if n_above + n_tied == k:  # no tie across the cut (the usual case)
        return (values >= v).float()
    return torch.where(values > v, 1.0, (values == v) * ((k - n_above) / n_tied))


class GhmcLoss(_PixelLoss):
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
    """

    def __init__(
        self,
        bins: int = 10,
        momentum: float = 0.75,
        ignore_index: int = 255,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(ignore_index=ignore_index, num_classes=num_classes)
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

        return _LabelLogProbLoss.apply(logits, safe, term), stats


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


@dataclass
class LossOutput:
    """What ``MultiHeadLoss`` returns: the weighted total, each head's term, logging stats."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class MultiHeadLoss(nn.Module):
    """Weighted sum of one loss per model head.

    ``heads`` maps a head name (``main``, ``aux2``, ...) to ``{"loss": module, "weight": float}``
    (``weight`` defaults to 1). Any ``Mapping`` works, including the ``DictConfig`` that Hydra
    passes when it instantiates the nested loss nodes. ``name`` labels the setting in logs.
    """

    def __init__(self, heads: Mapping[str, Mapping[str, Any]], name: str | None = None) -> None:
        super().__init__()
        self.name = name
        if not isinstance(heads, Mapping) or len(heads) == 0:
            raise ConfigError(f"MultiHeadLoss heads must be a non-empty mapping, got {heads!r}")
        self.losses = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for head, spec in heads.items():
            if not isinstance(spec, Mapping) or "loss" not in spec:
                raise ConfigError(f"loss head '{head}' needs a 'loss' entry, got {spec!r}")
            unknown = set(spec) - {"loss", "weight"}
            if unknown:
                raise ConfigError(f"loss head '{head}' has unknown keys {sorted(unknown)}")
            module = spec["loss"]
            if not isinstance(module, nn.Module) or not hasattr(module, "forward_with_stats"):
                raise ConfigError(
                    f"loss head '{head}': 'loss' must be a loss module with forward_with_stats, "
                    f"got {type(module).__name__}"
                )
            weight = float(spec.get("weight", 1.0))
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"loss head '{head}' weight must be >= 0, got {weight}")
            self.losses[str(head)] = module
            self.weights[str(head)] = weight

    def forward(self, outputs: Mapping[str, Tensor], labels: Tensor) -> LossOutput:
        """outputs: head -> logits N x C x H x W; labels int64 N x H x W -> ``LossOutput``."""
        if not isinstance(outputs, Mapping):
            raise ConfigError(
                "MultiHeadLoss expects the model's dict of head outputs (train mode), got "
                f"{type(outputs).__name__}"
            )
        extra = [head for head in outputs if head not in self.losses]
        if extra:
            raise ConfigError(
                f"model head(s) {extra} have no configured loss (configured: {list(self.losses)})"
            )
        missing = [head for head in self.losses if head not in outputs]
        if missing:
            raise ConfigError(
                f"loss configured for head(s) {missing} that the model does not output "
                f"(outputs: {list(outputs)}); build the model with aux heads or drop them "
                f"from the loss config"
            )
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for head, module in self.losses.items():
            term, head_stats = module.forward_with_stats(outputs[head], labels)
            terms[head] = term
            stats.update({f"{head}/{name}": value for name, value in head_stats.items()})
            weighted = term * self.weights[head]
            total = weighted if total is None else total + weighted
        assert total is not None  # heads is non-empty
        return LossOutput(total=total, terms=terms, stats=stats)

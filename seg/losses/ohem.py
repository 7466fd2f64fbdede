"""Online hard example mining over per-pixel cross-entropy, and its exact top-k selection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from seg.errors import ConfigError
from seg.losses.pixel import LabelLogProbLoss, PixelLoss, class_vector, pixel_class_weights


class OhemCELoss(PixelLoss):
    """Online hard example mining over per-pixel cross-entropy.

    Per-pixel CE (``ignore_index`` excluded); pixels with loss > -log(thresh) are hard.
    n_min = floor(valid pixels in the batch * min_kept_ratio) (at least 1 when any pixel is
    valid); if fewer than n_min pixels are hard, the n_min largest losses are kept instead.
    Returns the mean over the kept pixels; ``kept_fraction`` = kept / valid pixels.

    With ``class_weights`` w (one finite value >= 0 per class; the loss config's
    ``loss.class_weight``) the selection is unchanged (by each pixel's unweighted CE, i.e.
    its true-class probability against ``thresh``, and by n_min) and the loss is the
    weighted mean over the kept pixels, sum w[y] * CE / sum w[y], as CrossEntropyLoss over
    the kept pixels (a tie at the cut enters with its share). Kept pixels that all weigh 0
    give 0. ``kept_fraction`` still counts pixels.

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
        class_weights: Sequence[float] | None = None,
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
        vector = class_vector(class_weights, num_classes, "OhemCELoss class_weights")
        self.register_buffer("class_weights", vector, persistent=False)

    def n_min(self, n_valid: int) -> int:
        """Minimum number of pixels kept for ``n_valid`` valid pixels."""
        if n_valid == 0:
            return 0
        return max(math.floor(n_valid * self.min_kept_ratio), 1)

    def _compute(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        safe, valid = self._prepare_labels(labels, logits.shape[1])
        class_weight = pixel_class_weights(self.class_weights, safe, logits.shape[1], "OhemCELoss")
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
            if class_weight is None:
                # coeff = dLoss/dlog p_t: -1/n_kept on kept pixels, 0 elsewhere;
                # loss = -coeff . log p_t
                coeff = weights * (-1.0 / n_kept.clamp_min(1))
            else:  # -k w[y] / sum(k w[y]) with k the kept weights (ties shared)
                kept_class_weight = weights * class_weight
                total = kept_class_weight.sum().clamp_min(torch.finfo(torch.float32).tiny)
                coeff = kept_class_weight / -total
            stats["kept_fraction"] = n_kept / n_valid.clamp_min(1)
            return -torch.dot(pixel_loss.view(-1), coeff.view(-1)), coeff

        return LabelLogProbLoss.apply(logits, safe, term), stats

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

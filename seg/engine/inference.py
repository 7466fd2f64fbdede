"""Test-time inference: whole image, sliding window, multi-scale and horizontal flip.

All functions take normalised float images N x 3 x H x W on the model's device and a
model in eval mode that returns logits N x C x h x w at its input size (a dict with a
``"main"`` entry is accepted too). They are shared by the evaluator and the prediction
tool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seg.errors import ConfigError

INFERENCE_MODES = ("whole", "slide")


def main_logits(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The main-head logits of a model output (a tensor, or a dict of heads)."""
    if isinstance(output, dict):
        return output["main"]
    return output


def forward_padded(model: nn.Module, images: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Logits N x C x H x W for images N x 3 x H x W of any size.

    Pads the bottom/right with zeros (the mean colour after normalisation) up to a
    multiple of ``multiple``, runs the model once, and crops the logits back.
    """
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    logits = main_logits(model(images))
    return logits[..., :h, :w].float()


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of length ``crop`` covering ``size`` (last one flush)."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def slide_logits(
    model: nn.Module,
    images: torch.Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> torch.Tensor:
    """Sliding-window logits N x C x H x W: windows of ``crop_size`` [h, w] every ``stride``.

    Overlapping windows are averaged. Images smaller than the crop along a side use one
    window of the image's own size on that side (padded to a multiple of 32 by
    :func:`forward_padded`).
    """
    h, w = images.shape[-2:]
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=images.device)
    for top in _window_starts(h, crop_h, stride_h):
        for left in _window_starts(w, crop_w, stride_w):
            bottom, right = min(top + crop_h, h), min(left + crop_w, w)
            logits = forward_padded(model, images[..., top:bottom, left:right])
            if total is None:
                total = images.new_zeros((images.shape[0], logits.shape[1], h, w))
            total[..., top:bottom, left:right] += logits
            count[..., top:bottom, left:right] += 1
    assert total is not None  # at least one window always runs
    return total / count


def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class probabilities N x C x H' x W' averaged over scales and (optionally) flips.

    Args:
        images: normalised float N x 3 x H x W.
        mode: "whole" (one padded forward per scale) or "slide" (windows of ``crop_size``
            every ``stride``, both [h, w] in pixels of the rescaled image).
        scales: image scale factors; each prediction is resized to ``out_size``.
        flip: also run on the horizontally flipped image and flip the result back.
        out_size: [H', W'] of the result (the label size); defaults to the input size.
    Returns:
        float32 probabilities N x C x H' x W' (softmax per pass, then averaged).
    """
    if mode not in INFERENCE_MODES:
        raise ConfigError(f"eval.mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ConfigError("eval.mode=slide needs eval.crop_size and eval.stride")
    h, w = images.shape[-2:]
    out_hw = (int(out_size[0]), int(out_size[1])) if out_size is not None else (h, w)

    def run(batch: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            assert crop_size is not None and stride is not None
            return slide_logits(model, batch, crop_size, stride)
        return forward_padded(model, batch)

    total: torch.Tensor | None = None
    passes = 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = images
        if size != (h, w):
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = [(scaled, False), (scaled.flip(-1), True)] if flip else [(scaled, False)]
        for view, flipped in views:
            probs = run(view).softmax(dim=1)
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != out_hw:
                probs = F.interpolate(probs, size=out_hw, mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            passes += 1
    assert total is not None  # scales is non-empty (validated by the callers)
    return total / passes

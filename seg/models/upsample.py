"""Bilinear upsampling by an integer factor as two small matrix products.

``F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)`` is separable:
each output row is a blend of two input rows, each output column of two input columns, so

    out = W_h @ x @ W_w.T      (W_h: H*f x H, W_w: W*f x W, two non-zeros per row)

gives the same values. Why bother: on a GPU the backward of ``upsample_bilinear2d`` adds
each output gradient into the input gradient with atomic adds, and the profile of the
training step on an H100 (docs/benchmarks.md) put 37% of the step there, for the heads'
19-channel logits upsampled to the crop size. The matrix products' backward is two more
matrix products, with no atomics. Whether it is faster is for the benchmark to say:
``tools/benchmark.py sections=[train_step]`` times both (``model.head_upsample``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: How the segment heads upsample their logits: ``interpolate`` (F.interpolate) or
#: ``matmul`` (:func:`upsample_bilinear_matmul`); the values are the same.
HEAD_UPSAMPLE_MODES = ("interpolate", "matmul")


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, factor: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (in_size * factor) x in_size matrix of 1-d bilinear upsampling by ``factor``,
    with PyTorch's ``align_corners=False`` source positions (clamped at 0; the last input
    takes both weights at the far edge)."""
    out_size = in_size * factor
    rows = torch.arange(out_size, dtype=torch.float64)
    source = ((rows + 0.5) / factor - 0.5).clamp(min=0.0)
    first = source.floor().long().clamp(max=in_size - 1)
    second = (first + 1).clamp(max=in_size - 1)
    weight_second = source - first
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.index_put_((rows.long(), first), 1.0 - weight_second, accumulate=True)
    matrix.index_put_((rows.long(), second), weight_second, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def upsample_bilinear_matmul(x: Tensor, factor: int) -> Tensor:
    """N x C x H x W -> N x C x (H * factor) x (W * factor), equal to F.interpolate's
    bilinear ``align_corners=False`` upsampling up to rounding. The result is contiguous
    (NCHW) whatever the input's memory format."""
    _, _, height, width = x.shape
    rows = bilinear_matrix(height, factor, x.dtype, x.device)
    columns = bilinear_matrix(width, factor, x.dtype, x.device)
    return torch.matmul(rows, torch.matmul(x, columns.t()))

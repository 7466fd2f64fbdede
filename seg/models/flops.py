"""Parameter and convolution-FLOP counting.

FLOPs follow the convention of the BiSeNetV2 reference figures: 2 x multiply-adds, of
convolutions only (BN, activations, pooling and interpolation are not counted). A
convolution producing ``out`` elements from ``in_channels / groups`` channels with a
``kh x kw`` kernel costs ``2 * out * (in_channels / groups) * kh * kw`` (bias ignored).

The count runs the model on the ``meta`` device: shapes are propagated, nothing is
computed, so counting at 1024 x 2048 takes milliseconds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats not included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def conv_flops(conv: nn.Conv2d, output: torch.Tensor) -> int:
    """FLOPs (2 x multiply-adds) of one ``conv`` call that produced ``output``."""
    kernel_h, kernel_w = conv.kernel_size
    macs_per_output = (conv.in_channels // conv.groups) * kernel_h * kernel_w
    return 2 * output.numel() * macs_per_output


def count_conv_flops(
    model: nn.Module, input_shape: Sequence[int], *, training: bool = False
) -> int:
    """Convolution FLOPs of one forward pass of ``model`` on an input of ``input_shape``.

    Args:
        model: any module; it is copied to the meta device, the original is untouched.
        input_shape: e.g. ``(1, 3, 1024, 2048)``.
        training: count in train mode (for BiSeNetV2: with the auxiliary heads) instead
            of eval mode.
    Returns:
        The FLOP count as an integer.
    """
    meta_model = copy.deepcopy(model).to("meta")
    meta_model.train(training)
    for module in meta_model.modules():
        # Batch statistics do not change FLOPs, and eval-mode BN accepts batch 1 with 1x1 maps.
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        total += conv_flops(module, output)

    for module in meta_model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(hook)
    with torch.no_grad():
        meta_model(torch.empty(*input_shape, device="meta"))
    return total

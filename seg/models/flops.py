"""Parameter, FLOP and MAC counting (PyTorch's own ``FlopCounterMode``).

FLOPs are PyTorch's count: 2 x multiply-adds of convolutions and matrix products (BN,
activations, pooling and interpolation are not counted), which for BiSeNetV2 are all
convolutions. MACs (multiply-adds) are half of that; most papers, BiSeNetV2's among them,
quote MACs and call them FLOPs.

The count runs the model on the ``meta`` device: shapes are propagated, nothing is
computed, so counting at 1024 x 2048 takes milliseconds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats not included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: Sequence[int], *, training: bool = False) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of ``model`` on ``input_shape``.

    Args:
        model: any module; it is copied to the meta device, the original is untouched.
        input_shape: e.g. ``(1, 3, 1024, 2048)``.
        training: count in train mode (for BiSeNetV2: with the auxiliary heads) instead
            of eval mode.
    """
    meta_model = copy.deepcopy(model).to("meta")
    meta_model.train(training)
    for module in meta_model.modules():
        # Batch statistics do not change FLOPs, and eval-mode BN accepts batch 1 with 1x1 maps.
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(torch.empty(*input_shape, device="meta"))
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_shape: Sequence[int], *, training: bool = False) -> int:
    """Multiply-adds of one forward pass (what papers usually call FLOPs): FLOPs / 2."""
    return count_flops(model, input_shape, training=training) // 2

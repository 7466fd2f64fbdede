"""Segmentation losses: OHEM cross-entropy, cross-entropy, focal loss, GHM-C, and their per-head sum.

Every loss maps ``logits`` N x C x H x W (any float dtype) and ``labels`` int64 N x H x W
(train ids, ``ignore_index`` = ignore) to a float32 scalar. Work happens in float32 with
autocast off, so thresholds and logs are never evaluated in half precision.

One module per loss family (``cross_entropy``, ``focal``, ``ohem``, ``ghm``), their shared
pixel machinery (``pixel``: one autograd function, checks) and the per-head sum
(``multi_head``). Configs and stored checkpoints name the classes here, as
``seg.losses.OhemCELoss``; these names stay the public ones.

Edge cases: a batch with no valid pixel gives a loss of 0 with zero gradients (never NaN),
and a label outside ``[0, C)`` other than ``ignore_index`` raises ``DatasetError``.
"""

from seg.losses.cross_entropy import CrossEntropyLoss
from seg.losses.focal import FocalLoss
from seg.losses.ghm import GhmcLoss, ghm_pixel_weights
from seg.losses.multi_head import LossOutput, MultiHeadLoss
from seg.losses.ohem import OhemCELoss, top_k_weights

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "GhmcLoss",
    "LossOutput",
    "MultiHeadLoss",
    "OhemCELoss",
    "ghm_pixel_weights",
    "top_k_weights",
]

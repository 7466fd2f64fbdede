"""The model that eval, predict and export use: a network in eval mode and its dataset facts.

Made by :func:`seg.engine.load.load_inference_model` from a checkpoint, or by
:func:`seg.models.onnx_model.load_onnx_inference_model` from an exported ``.onnx``; the
type lives here, below both, so that neither loader imports the other's room for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class InferenceModel:
    """A model in eval mode (no auxiliary heads) and what is needed to use it.

    ``model`` maps normalised float N x 3 x H x W images to logits N x C x H x W.
    ``mean``/``std`` are the RGB normalisation on the 0-1 scale, ``palette`` has one RGB
    triple per train id, all read from the checkpoint's ``config["dataset"]`` (or the
    exported file's metadata).
    """

    model: nn.Module
    num_classes: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    palette: list[list[int]]
    config: dict[str, Any]
    device: torch.device
    path: Path
    weights: str = "model"  # "ema": the checkpoint's moving average of the weights

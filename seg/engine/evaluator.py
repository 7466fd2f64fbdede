"""The one evaluation path: used by ``tools/eval.py`` and by the trainer's periodic evaluation.

Built from the ``eval`` config group with ``hydra.utils.instantiate(cfg.eval)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from seg import dist
from seg.data.batch import batch_to_device
from seg.engine.amp import AmpSettings, amp_choice, autocast, resolve_amp
from seg.engine.inference import INFERENCE_MODES, predict_probs
from seg.errors import ConfigError
from seg.metrics import ConfusionMatrix
from seg.values import bool_setting, int_setting, pair_setting, scales_setting

#: Called once per batch with the collated batch (CPU) and the predicted ids
#: (int64 N x H x W on the device), e.g. to save prediction images.
PredictionSink = Callable[[Mapping[str, Any], torch.Tensor], None]


class Evaluator:
    """Runs a model over a loader and returns the metrics of :class:`ConfusionMatrix`.

    Args:
        num_classes, ignore_index: from the dataset config.
        mean, std: 0-1 scale RGB normalisation (as in training).
        mode: "whole" or "slide" inference.
        scales: test scales (multi-scale when more than one); probabilities averaged.
        flip: add horizontally flipped passes.
        crop_size, stride: window size and step [h, w] (or one int for both) for
            ``mode="slide"``; ``stride=None`` means two thirds of the crop.
        amp: "off", "fp16" or "bf16" autocast for the forward passes.
        class_names: names for tables.
        batch_size: images per batch of the evaluation loader (read by whoever builds
            the loader; kept here so that the whole ``eval`` group instantiates as one).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        mode: str = "whole",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        amp: str = "off",
        class_names: Sequence[str] | None = None,
        batch_size: int = 1,
    ) -> None:
        if mode not in INFERENCE_MODES:
            raise ConfigError(f"eval.mode must be one of {list(INFERENCE_MODES)}, got {mode!r}")
        amp_choice(amp, "cuda", "eval.amp")  # validated here, resolved per device in evaluate()
        scales = scales_setting(scales, "eval.scales")
        self.crop_size = pair_setting(crop_size, "eval.crop_size")
        self.stride = pair_setting(stride, "eval.stride")
        if mode == "slide":
            if self.crop_size is None:
                raise ConfigError("eval.mode=slide needs eval.crop_size")
            if self.stride is None:
                # Default: windows overlap by a third, so every pixel has context on all sides.
                self.stride = (
                    max(1, (2 * self.crop_size[0]) // 3),
                    max(1, (2 * self.crop_size[1]) // 3),
                )
            if any(s > c for s, c in zip(self.stride, self.crop_size, strict=True)):
                raise ConfigError(
                    f"eval.stride {list(self.stride)} larger than eval.crop_size "
                    f"{list(self.crop_size)} would leave pixels unpredicted"
                )
        batch_size = int_setting(batch_size, "eval.batch_size", minimum=1)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.mode = mode
        self.scales = scales
        self.flip = bool_setting(flip, "eval.flip")
        self.amp = "off" if amp is None or amp is False else amp
        self.class_names = list(class_names) if class_names is not None else None
        self.batch_size = int(batch_size)

    def predict(
        self,
        model: nn.Module,
        images: torch.Tensor,
        out_size: Sequence[int],
        amp: AmpSettings | None = None,
    ) -> torch.Tensor:
        """Class probabilities N x C x H x W at ``out_size`` for normalised images N x 3 x h x w.

        ``amp``: the resolved ``eval.amp`` for the images' device (resolved here when None).
        """
        amp = amp if amp is not None else resolve_amp(self.amp, images.device, "eval.amp")
        with autocast(amp):
            return predict_probs(
                model,
                images,
                mode=self.mode,
                scales=self.scales,
                flip=self.flip,
                crop_size=self.crop_size,
                stride=self.stride,
                out_size=out_size,
            )

    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Mapping[str, Any]],
        device: torch.device | str,
        progress: bool = True,
        on_prediction: PredictionSink | None = None,
    ) -> dict[str, Any]:
        """Evaluate ``model`` on every batch of ``loader``.

        Batches are ``{"image": uint8 N x H x W x 3, "label": uint8 N x H x W, ...}``. Under
        DDP each process sees its own shard and the confusion matrices are summed, so every
        process returns the metrics of the whole split. The model's train/eval mode is
        restored afterwards.

        Returns:
            ``ConfusionMatrix.compute()``: per-class ``IoU``/``Acc`` lists, ``mIoU``,
            ``mAcc``, ``aAcc``, ``fwIoU`` (fractions in [0, 1]).
        """
        device = torch.device(device)
        # The bare module: DDP's forward may run collectives, and shards can differ in length.
        net = model.module if isinstance(model, DistributedDataParallel) else model
        was_training = net.training
        net.eval()
        amp = resolve_amp(self.amp, device, "eval.amp")
        matrix = ConfusionMatrix(self.num_classes, self.ignore_index, device=device)
        batches = tqdm(loader, desc="eval", unit="batch", disable=not (progress and dist.is_main()))
        try:
            with torch.inference_mode():
                for batch in batches:
                    images, labels = batch_to_device(batch, device, self.mean, self.std)
                    if labels is None:
                        raise ValueError("evaluation batches need a 'label' entry")
                    probs = self.predict(net, images, labels.shape[-2:], amp)
                    pred = probs.argmax(dim=1)
                    matrix.update(pred, labels)
                    if on_prediction is not None:
                        on_prediction(batch, pred)
        finally:
            net.train(was_training)
        matrix.all_reduce()
        return matrix.compute()

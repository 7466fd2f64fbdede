"""albumentations 2.x pipelines for training and evaluation, plus per-sample seeding.

Pipelines work on numpy arrays: image uint8 H x W x 3 (RGB), mask uint8 H x W (train ids,
255 = ignore). They never normalise: the loader ships uint8 and the trainer normalises on
the device (``seg.data.batch``). Labels are always resampled nearest-neighbour.

Reproducible augmentation: albumentations 2.x draws from generators owned by the
``Compose`` (not from the global numpy/python RNGs), so seeding workers does not make it
repeat. Instead the training sampler hands each sample a seed derived from
``(run seed, global sample position)`` and :func:`apply_transform` re-seeds the pipeline
with it right before the call. One shared generator pair is installed for the whole
pipeline (``set_random_state``) rather than ``set_random_seed``, which would give every
transform an identical stream and correlate, e.g., the flip decision with the scale.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from seg.errors import ConfigError

IGNORE_INDEX = 255

# A dataset key is an index, or (index, sample_seed) when it comes from InfiniteSampler.
DatasetKey = int | tuple[int, int]


def _pair(value: Sequence[float] | float, name: str, cast: type = float) -> tuple:
    """Read a 2-element [a, b] from config (list, tuple or ListConfig)."""
    if isinstance(value, int | float):
        return (cast(value), cast(value))
    items = list(value)
    if len(items) != 2:
        raise ConfigError(f"{name} must have 2 values, got {items}")
    return (cast(items[0]), cast(items[1]))


def build_train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.25, 2.0),
    hflip_prob: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    jitter_prob: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> A.Compose:
    """Random scale -> pad to the crop (image 0, label ``ignore_index``) -> random crop ->
    horizontal flip -> colour jitter.

    Args:
        crop_size: ``[h, w]`` of the output.
        scale_range: ``[lo, hi]`` factors applied to the input size (Cityscapes: 0.25-2.0).
    Returns:
        A pipeline called as ``t(image=uint8 HxWx3, mask=uint8 HxW)`` giving ``crop_size``
        arrays.
    """
    crop_h, crop_w = _pair(crop_size, "crop_size", int)
    lo, hi = _pair(scale_range, "scale_range")
    if not 0 < lo <= hi:
        raise ConfigError(f"scale_range must satisfy 0 < lo <= hi, got [{lo}, {hi}]")
    if crop_h <= 0 or crop_w <= 0:
        raise ConfigError(f"crop_size must be positive, got [{crop_h}, {crop_w}]")
    steps: list[A.BasicTransform] = []
    if (lo, hi) != (1.0, 1.0):
        # RandomScale samples the factor from (1 + lo, 1 + hi).
        steps.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    steps += [
        A.PadIfNeeded(
            min_height=crop_h,
            min_width=crop_w,
            position="center",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=crop_h, width=crop_w),
        A.HorizontalFlip(p=hflip_prob),
    ]
    if jitter_prob > 0 and (brightness or contrast or saturation):
        steps.append(
            A.ColorJitter(
                brightness=brightness,
                contrast=contrast,
                saturation=saturation,
                hue=0.0,
                p=jitter_prob,
            )
        )
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


def build_eval_transform(resize: Sequence[int] | None = None) -> A.Compose:
    """Evaluation pipeline: identity (full resolution) or a resize to ``[h, w]``.

    With ``resize`` the label is resized too (nearest), so metrics are computed on the
    resized grid.
    """
    steps: list[A.BasicTransform] = []
    if resize is not None:
        h, w = _pair(resize, "resize", int)
        steps.append(
            A.Resize(
                height=h,
                width=w,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            )
        )
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


def unpack_key(key: DatasetKey) -> tuple[int, int | None]:
    """Split a dataset key into ``(index, sample_seed or None)``."""
    if isinstance(key, tuple | list):
        index, seed = key
        return int(index), int(seed)
    return int(key), None


def apply_transform(
    transform: A.Compose | None,
    image: np.ndarray,
    label: np.ndarray,
    seed: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``transform`` on one (image HxWx3, label HxW) pair, re-seeded with ``seed``."""
    if transform is None:
        return image, label
    if seed is not None:
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = transform(image=image, mask=label)
    return out["image"], out["mask"]


def to_sample(image: np.ndarray, label: np.ndarray, name: str) -> dict[str, object]:
    """Build the dataset item of the data contract: uint8 tensors HxWx3 and HxW, and name."""
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)),
        "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)),
        "name": name,
    }

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

Crop first. Scaling a 1024x2048 image by up to 2x and then keeping a 1024x1024 crop of it
resamples up to 8x the pixels that are kept. :class:`RandomScaleCrop` instead works out
where the crop lies in the rescaled (and padded) frame and resamples only the source region
under it (plus a pixel of margin for the bilinear taps). It draws its random numbers
exactly as ``RandomScale`` -> ``PadIfNeeded`` -> ``RandomCrop`` did, from the same
generator and in the same order, so a sample seed gives the same window as before: labels
are then identical pixel for pixel (nearest neighbour, same source pixel), images equal up
to the last bit of rounding (OpenCV's resize and warpAffine round bilinear weights
differently: at most 1 grey level apart).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class CropWindow:
    """Where a crop of the rescaled, centre-padded image lies, in source pixels.

    The source (``source`` = ``(H, W)``) is rescaled to ``scaled`` = ``(int(H * s),
    int(W * s))`` (as albumentations' ``RandomScale``), padded on both sides to at least
    the crop (``PadIfNeeded``, centred), and cropped. ``top``/``left`` give the rescaled-frame
    row/column of the crop's first row/column (negative where the crop starts in padding).
    """

    source: tuple[int, int]
    scaled: tuple[int, int]
    crop: tuple[int, int]
    top: int
    left: int

    def kept(self, axis: int) -> tuple[int, int]:
        """``[start, stop)`` of the crop rows (axis 0) or columns (axis 1) that show image."""
        offset = (self.top, self.left)[axis]
        return max(0, -offset), min(self.crop[axis], self.scaled[axis] - offset)

    def ratio(self, axis: int) -> float:
        """Source pixels per rescaled pixel along ``axis``, computed as OpenCV's resize does."""
        return 1.0 / (self.scaled[axis] / self.source[axis])


def crop_window(
    source: tuple[int, int],
    crop: tuple[int, int],
    scale: float,
    h_start: float,
    w_start: float,
    round_up: bool = False,
) -> CropWindow:
    """The window that ``RandomScale(scale)`` -> ``PadIfNeeded(crop, centre)`` ->
    ``RandomCrop(crop)`` with the draws ``h_start``, ``w_start`` in ``[0, 1)`` would keep.

    ``round_up``: the rescaled size is ``ceil(size * scale)`` (CoinCheung/BiSeNet's
    ``RandomResizedCrop``) instead of albumentations' ``int(size * scale)``.
    """
    rounding = math.ceil if round_up else int
    scaled = tuple(max(1, rounding(size * scale)) for size in source)
    offsets = []
    for size, want, start in zip(scaled, crop, (h_start, w_start), strict=True):
        pad_before = int((want - size) / 2.0) if size < want else 0
        padded = max(size, want)
        offsets.append(int((padded - want + 1) * start) - pad_before)
    return CropWindow(tuple(source), scaled, tuple(crop), offsets[0], offsets[1])


def _nearest_indices(window: CropWindow, axis: int) -> np.ndarray:
    """Source index of each kept crop row/column under OpenCV's INTER_NEAREST
    (``floor(dst * ratio)``, clamped), so labels match ``cv2.resize`` exactly."""
    start, stop = window.kept(axis)
    offset = (window.top, window.left)[axis]
    dst = np.arange(start + offset, stop + offset, dtype=np.float64)
    src = np.floor(dst * window.ratio(axis)).astype(np.intp)
    return np.minimum(src, window.source[axis] - 1)


def _place(kept: np.ndarray, window: CropWindow, fill: int) -> np.ndarray:
    """Put the resampled ``kept`` block into a crop-sized canvas of ``fill`` (padding);
    when the image covers the whole crop, ``kept`` already is the crop."""
    if kept.shape[:2] == window.crop:
        return kept
    (r0, r1), (c0, c1) = window.kept(0), window.kept(1)
    out = np.full((*window.crop, *kept.shape[2:]), fill, dtype=kept.dtype)
    out[r0:r1, c0:c1] = kept
    return out


def crop_label(label: np.ndarray, window: CropWindow, fill: int) -> np.ndarray:
    """The crop of the rescaled label (nearest neighbour), ``fill`` where it is padding.

    Args:
        label: uint8 ``H x W`` (may be a read-only memory map: only the rows and columns
            the crop keeps are read).
    Returns:
        uint8 ``crop_h x crop_w``.
    """
    rows, cols = _nearest_indices(window, 0), _nearest_indices(window, 1)
    # Gather the kept rows of the kept column span, then the columns of that block.
    band = label[:, cols[0] : cols[-1] + 1].take(rows, axis=0)
    return _place(band.take(cols - cols[0], axis=1), window, fill)


def crop_image(image: np.ndarray, window: CropWindow) -> np.ndarray:
    """The crop of the bilinearly rescaled image, 0 where it is padding.

    Only the source region under the kept window (plus one pixel of margin) is read and
    resampled, with the sampling positions of ``cv2.resize`` (half-pixel centres, edges
    clamped); ``cv2.warpAffine`` does the sampling, so values can differ from a full
    ``cv2.resize`` by one grey level (rounding of the interpolation weights).

    Args:
        image: uint8 ``H x W x C`` (may be a read-only memory map).
    Returns:
        uint8 ``crop_h x crop_w x C``.
    """
    (r0, r1), (c0, c1) = window.kept(0), window.kept(1)
    if window.scaled == window.source:  # no resampling: a plain copy, exactly
        kept = image[window.top + r0 : window.top + r1, window.left + c0 : window.left + c1]
        return _place(np.array(kept), window, 0)
    matrix = np.zeros((2, 3))
    origin = []
    for axis, (start, stop) in enumerate(((r0, r1), (c0, c1))):
        ratio = window.ratio(axis)
        offset = (window.top, window.left)[axis]
        # Source coordinate of crop pixel d: (d + offset + 0.5) * ratio - 0.5 (cv2.resize).
        first = (start + offset + 0.5) * ratio - 0.5
        last = (stop - 1 + offset + 0.5) * ratio - 0.5
        lo = max(0, math.floor(first) - 1)
        hi = min(window.source[axis], math.floor(last) + 3)
        origin.append((lo, hi))
        matrix[1 - axis, 1 - axis] = ratio  # warpAffine's matrix is in (x, y) order
        matrix[1 - axis, 2] = first - lo
    (y0, y1), (x0, x1) = origin
    return _place(_warp(image[y0:y1, x0:x1], matrix, (c1 - c0, r1 - r0)), window, 0)


def _warp(region: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear ``dst(x, y) = region(matrix @ (x, y, 1))``, edges replicated (as resize).

    OpenCV 5's warpAffine has a vectorised path for 4-channel uint8 but not for 3 channels
    (measured 4-5x slower), so RGB goes through RGBA and back: two cheap conversions.
    """
    three = region.ndim == 3 and region.shape[2] == 3
    if three:
        region = cv2.cvtColor(region, cv2.COLOR_RGB2RGBA)
    warped = cv2.warpAffine(
        region,
        matrix,
        size,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if three:
        return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)
    return warped.reshape(size[1], size[0], *region.shape[2:])


class RandomScaleCrop(A.DualTransform):
    """Random scale -> centre pad -> random crop, resampling only the pixels that are kept.

    Same parameters and random draws as ``A.RandomScale(scale_limit=(lo - 1, hi - 1))``,
    ``A.PadIfNeeded(crop, position="center", fill=0, fill_mask=ignore_index)`` and
    ``A.RandomCrop(crop)`` in a row (see the module docstring); a fraction of the work.

    Args:
        height, width: crop size.
        scale_range: ``(lo, hi)`` scale factors, or None for no rescaling (as the old
            pipeline without ``RandomScale``: no scale is drawn).
        ignore_index: label value of the padding.
        round_up: rescaled sizes rounded up (``ceil``) instead of down (see :func:`crop_window`).
    """

    def __init__(
        self,
        height: int,
        width: int,
        scale_range: tuple[float, float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        round_up: bool = False,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.round_up = bool(round_up)
        self.height, self.width = int(height), int(width)
        self.scale_range = (
            None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        )
        self.ignore_index = int(ignore_index)

    @property
    def targets(self) -> dict[str, Any]:
        return {"image": self.apply, "mask": self.apply_to_mask}

    def get_params(self) -> dict[str, Any]:
        if self.scale_range is None:
            return {"scale": 1.0}
        lo, hi = self.scale_range
        # Exactly RandomScale's draw: uniform over the limits shifted by -1, then + 1.
        return {"scale": self.py_random.uniform(lo - 1.0, hi - 1.0) + 1.0}

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        h_start = self.py_random.random()  # RandomCrop's two draws, in its order
        w_start = self.py_random.random()
        window = crop_window(
            tuple(params["shape"][:2]),
            (self.height, self.width),
            params["scale"],
            h_start,
            w_start,
            round_up=self.round_up,
        )
        return {"window": window}

    def apply(self, img: np.ndarray, window: CropWindow, **params: Any) -> np.ndarray:
        return crop_image(img, window)

    def apply_to_mask(self, mask: np.ndarray, window: CropWindow, **params: Any) -> np.ndarray:
        return crop_label(mask, window, self.ignore_index)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "scale_range", "ignore_index", "round_up")


def build_train_transform(
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.25, 2.0),
    hflip_prob: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    jitter_prob: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    crop_first: bool = True,
    scale_rounding: str = "floor",
) -> A.Compose:
    """Random scale -> pad to the crop (image 0, label ``ignore_index``) -> random crop ->
    horizontal flip -> colour jitter.

    Args:
        crop_size: ``[h, w]`` of the output.
        scale_range: ``[lo, hi]`` factors applied to the input size (Cityscapes: 0.25-2.0).
        crop_first: True: scale, pad and crop in one step that resamples only the kept
            region (:class:`RandomScaleCrop`); False: the three albumentations transforms,
            which rescale the whole image first (kept to compare against: same draws).
        scale_rounding: ``floor`` (albumentations' ``int(size * scale)``) or ``ceil`` (sizes
            rounded up, as CoinCheung/BiSeNet's recipe; crop-first pipeline only).
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
    if scale_rounding not in ("floor", "ceil"):
        raise ConfigError(f"scale_rounding must be floor or ceil, got {scale_rounding!r}")
    if scale_rounding == "ceil" and not crop_first:
        raise ConfigError("scale_rounding=ceil needs the crop-first pipeline (crop_first=true)")
    rescale = (lo, hi) != (1.0, 1.0)
    steps: list[A.BasicTransform] = []
    if crop_first:
        steps.append(
            RandomScaleCrop(
                crop_h,
                crop_w,
                (lo, hi) if rescale else None,
                ignore_index,
                round_up=scale_rounding == "ceil",
            )
        )
    else:
        if rescale:
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
        ]
    steps.append(A.HorizontalFlip(p=hflip_prob))
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


def _own_array(array: np.ndarray) -> np.ndarray:
    """A contiguous uint8 array the tensor may own: read-only views (a memory-mapped cache
    entry passed through an identity transform) are copied."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return array if array.flags.writeable else array.copy()


def to_sample(image: np.ndarray, label: np.ndarray, name: str) -> dict[str, object]:
    """Build the dataset item of the data contract: uint8 tensors HxWx3 and HxW, and name."""
    return {
        "image": torch.from_numpy(_own_array(image)),
        "label": torch.from_numpy(_own_array(label)),
        "name": name,
    }

"""Colour masks and overlays for label maps.

Used by the predictor (coloured masks and overlays on the user's images), and meant to be
reused wherever a label map is shown: TensorBoard images in the trainer, the evaluator's
coloured predictions. Everything here works on numpy uint8 arrays in RGB order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Pixels whose label has no palette entry (255 = ignore, or an id past the palette) are black.
UNLABELLED_COLOR = (0, 0, 0)


def cityscapes_palette() -> list[list[int]]:
    """The 19 Cityscapes train-id colours (RGB), read from ``cityscapesscripts``."""
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {label.trainId: list(label.color) for label in labels if 0 <= label.trainId < 255}
    return [by_train_id[train_id] for train_id in range(len(by_train_id))]


def generated_palette(num_classes: int) -> list[list[int]]:
    """A deterministic palette for datasets that ship none (the PASCAL VOC bit pattern).

    Class ``i`` gets its colour from the bits of ``i`` spread over R, G and B, so colours
    are distinct and stable across runs and machines.
    """
    palette = []
    for class_id in range(num_classes):
        rgb = [0, 0, 0]
        value = class_id + 1  # skip black, which marks unlabelled pixels
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette.append(rgb)
    return palette


def palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Turn an RGB palette (``[[r, g, b], ...]``, at most 256 entries) into a 256 x 3 uint8 lookup table.

    Entries past the palette are ``UNLABELLED_COLOR``.
    """
    table = np.asarray(palette, dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) > 256:
        raise ValueError(
            f"palette must be a list of at most 256 [r, g, b] triples, got shape {table.shape}"
        )
    if table.size and (table.min() < 0 or table.max() > 255):
        raise ValueError("palette values must lie in 0..255")
    lut = np.empty((256, 3), dtype=np.uint8)
    lut[:] = UNLABELLED_COLOR
    lut[: len(table)] = table
    return lut


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Colour a label map.

    Args:
        label: H x W integer label map (train ids; 255 or any id without a palette entry
            is drawn black).
        palette: RGB colours per train id, ``[[r, g, b], ...]`` or a 256 x 3 uint8 table.
    Returns:
        H x W x 3 uint8 RGB image.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"expected an integer label map, got dtype {label.dtype}")
    lut = palette if _is_lut(palette) else palette_array(palette)
    if label.dtype == np.uint8:
        return lut[label]
    color = lut[np.clip(label, 0, 255).astype(np.uint8)]
    color[(label < 0) | (label > 255)] = UNLABELLED_COLOR  # ids no table can hold
    return color


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a coloured mask over an image: ``(1 - alpha) * image + alpha * color``.

    Args:
        image: H x W x 3 uint8 RGB image.
        color: H x W x 3 uint8 coloured mask (from :func:`colorize`).
        alpha: weight of the mask, 0 (image only) to 1 (mask only).
    Returns:
        H x W x 3 uint8 RGB image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if image.shape != color.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image and mask must both be H x W x 3, got {image.shape} and {color.shape}"
        )
    blended = image.astype(np.float32) * (1.0 - alpha) + color.astype(np.float32) * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _is_lut(palette: Sequence[Sequence[int]] | np.ndarray) -> bool:
    return (
        isinstance(palette, np.ndarray) and palette.dtype == np.uint8 and palette.shape == (256, 3)
    )

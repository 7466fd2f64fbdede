"""Colour masks: a folder of RGB mask PNGs (plus their images) -> :class:`ColorMaskImage`.

Rules (data/README.md, "Your own annotations"): every image of the ``images`` folder
(sorted by name) is paired with ``<mask folder>/<stem>.png``, as ``FolderDataset`` pairs
them; each mask colour is mapped through ``color_to_trainid`` (``seg.data.colors``), a
colour absent from the table being one error line naming the mask and the colours. The
class list is ``classes=[...]`` (required: colours carry no names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg.data.annotations.classes import ClassMap
from seg.data.annotations.items import AnnotatedImage, ImageSource
from seg.data.colors import ColorTable, read_color_mask
from seg.data.folder import IMAGE_SUFFIXES
from seg.errors import ConfigError, DatasetError


@dataclass
class ColorMaskImage(AnnotatedImage):
    """An image and its colour mask, mapped through the colour table when painted."""

    mask_path: Path
    table: ColorTable

    def labels(self) -> list[str]:
        return []  # the table maps colours to train ids directly

    def paint(self, height: int, width: int, classes: ClassMap) -> np.ndarray:
        label = self.table.to_train_ids(read_color_mask(self.mask_path), self.mask_path)
        if label.shape != (height, width):
            raise DatasetError(
                f"mask size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{width}x{height} ({self.image.describe()}): {self.mask_path}"
            )
        return label


def read_color_folder(
    mask_dir: Path, image_dir: Path | None, table: ColorTable
) -> list[ColorMaskImage]:
    """Pair every image of ``image_dir`` with its colour mask in ``mask_dir``.

    Raises:
        ConfigError: no ``images`` folder given.
        DatasetError: a missing folder, an image without a mask, two images of one stem.
    """
    if image_dir is None:
        raise ConfigError(
            f"format=color needs images=FOLDER (the images of the masks in {mask_dir})"
        )
    for folder, kind in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise DatasetError(f"{kind} folder not found: {folder}")
    suffixes = {s.lower() for s in IMAGE_SUFFIXES}
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not images:
        raise DatasetError(f"no images ({', '.join(sorted(suffixes))}) in {image_dir}")
    items: list[ColorMaskImage] = []
    for image_path in images:
        mask_path = mask_dir / f"{image_path.stem}.png"
        if not mask_path.is_file():
            raise DatasetError(f"image without a mask (expected {mask_path}): {image_path}")
        items.append(
            ColorMaskImage(
                name=image_path.stem,
                source=mask_path,
                image=ImageSource(path=image_path, annotation=mask_path),
                size=None,
                mask_path=mask_path,
                table=table,
            )
        )
    return items

"""What every annotation format reads into: one :class:`AnnotatedImage` per image.

A format module (``labelme.py``, ``coco.py``, ``color.py``) parses and validates its files
into these items before anything is written; the writer (``writer.py``) then decodes each
image, asks the item to paint its mask at the image's size and writes both.
"""

from __future__ import annotations

import base64
import binascii
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from seg.data.annotations.classes import ClassMap
from seg.data.folder import read_image
from seg.errors import DatasetError


@dataclass(frozen=True)
class ImageSource:
    """An item's image: a file, or an encoded image embedded in the annotation file
    (labelme's ``imageData``, base64), used when the file is missing."""

    path: Path | None = None
    embedded: str | None = None  # base64 text of an encoded image
    annotation: Path | None = None  # the file that names or embeds the image (errors)

    def read(self) -> np.ndarray:
        """Decode to uint8 RGB H x W x 3; ``DatasetError`` naming the file if it cannot be."""
        if self.path is not None:
            return read_image(self.path)
        try:
            data = np.frombuffer(base64.b64decode(self.embedded or "", validate=True), np.uint8)
        except (binascii.Error, ValueError) as err:
            raise DatasetError(
                f"imageData is not valid base64 ({err}): {self.annotation}"
            ) from None
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if image is None:
            raise DatasetError(f"imageData does not decode to an image: {self.annotation}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"imageData of {self.annotation}"


@dataclass
class AnnotatedImage(ABC):
    """One image and its annotation.

    ``name`` is the file stem both get in the output (unique within a split); ``source``
    the annotation file that errors name; ``size`` the ``(height, width)`` the annotation
    states (None when it states none), which the decoded image must match.
    """

    name: str
    source: Path
    image: ImageSource
    size: tuple[int, int] | None

    @abstractmethod
    def labels(self) -> list[str]:
        """The labels this item paints (checked against the class list before writing)."""

    @abstractmethod
    def paint(self, height: int, width: int, classes: ClassMap) -> np.ndarray:
        """The index mask, uint8 H x W: train ids, ``classes.fill`` where nothing is painted.

        Raises:
            DatasetError: the annotation cannot be painted (naming ``source``).
        """

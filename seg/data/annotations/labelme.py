"""labelme: a folder of labelme JSON files -> :class:`LabelmeImage` items.

Rules (data/README.md, "Your own annotations"):

- every ``*.json`` file of the folder (not its subfolders), sorted by name, is one image;
  its output name is the JSON file's stem;
- the image is ``imagePath`` resolved relative to the JSON file (Windows ``\\`` separators
  accepted); when that file is missing, the ``imageData`` embedded in the JSON is used
  (written as PNG); neither is one error line;
- ``imageHeight``/``imageWidth``, when present, must equal the decoded image's size;
- shapes are painted in file order, a later shape on top of an earlier one (as labelme
  draws them); ``polygon`` (3 points or more), ``rectangle`` (2 corner points) and
  ``circle`` (centre, then a point on the circle) have an area and are painted, with
  vertices rounded to the nearest pixel and the outline's pixels inside the shape;
  ``point``, ``points``, ``line`` and ``linestrip`` have none: they are skipped and
  counted (one warning line); any other ``shape_type`` (``mask``, ...) is an error line
  naming the file and the shape. A shape without ``shape_type`` is a polygon (older
  labelme files).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from seg.data.annotations.classes import ClassMap
from seg.data.annotations.items import AnnotatedImage, ImageSource
from seg.errors import DatasetError, first_line

PAINTED = ("polygon", "rectangle", "circle")
SKIPPED = ("point", "points", "line", "linestrip")
MIN_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2}


@dataclass(frozen=True)
class Shape:
    """One shape to paint: its label, type and points (float x, y pairs)."""

    label: str
    kind: str  # one of PAINTED
    points: tuple[tuple[float, float], ...]


def _pixel(point: tuple[float, float]) -> tuple[int, int]:
    """A vertex rounded to the nearest pixel (x, y)."""
    return math.floor(point[0] + 0.5), math.floor(point[1] + 0.5)


def paint_shape(mask: np.ndarray, shape: Shape, value: int) -> None:
    """Paint ``shape`` into ``mask`` (uint8 H x W) with ``value``, outline included."""
    if shape.kind == "polygon":
        polygon = np.array([_pixel(p) for p in shape.points], dtype=np.int32)
        cv2.fillPoly(mask, [polygon], int(value))
    elif shape.kind == "rectangle":
        (x0, y0), (x1, y1) = (_pixel(p) for p in shape.points[:2])
        cv2.rectangle(mask, (min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1)), int(value), -1)
    else:  # circle: centre, then a point on the circle
        (cx, cy), (px, py) = shape.points[:2]
        radius = math.floor(math.hypot(px - cx, py - cy) + 0.5)
        cv2.circle(mask, _pixel((cx, cy)), radius, int(value), -1)


@dataclass
class LabelmeImage(AnnotatedImage):
    """A labelme file: shapes painted in file order (later on top)."""

    shapes: list[Shape] = field(default_factory=list)

    def labels(self) -> list[str]:
        return [s.label for s in self.shapes]

    def paint(self, height: int, width: int, classes: ClassMap) -> np.ndarray:
        mask = np.full((height, width), classes.fill, dtype=np.uint8)
        for shape in self.shapes:
            paint_shape(mask, shape, classes.train_id(shape.label, self.source))
        return mask


def _points(raw: Any, where: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y] pairs")
    out = []
    for point in raw:
        if (
            not isinstance(point, (list, tuple))
            or len(point) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
            or not all(math.isfinite(v) for v in point)
        ):
            raise DatasetError(f"{where}: point {point!r} is not an [x, y] pair of numbers")
        out.append((float(point[0]), float(point[1])))
    return tuple(out)


def _size(doc: dict[str, Any], path: Path) -> tuple[int, int] | None:
    height, width = doc.get("imageHeight"), doc.get("imageWidth")
    if height is None and width is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise DatasetError(
            f"imageHeight/imageWidth must be positive integers, got {height!r}/{width!r}: {path}"
        )
    return height, width


def _image_source(doc: dict[str, Any], path: Path) -> ImageSource:
    image_path = doc.get("imagePath")
    embedded = doc.get("imageData")
    if image_path is not None and not isinstance(image_path, str):
        raise DatasetError(f"imagePath must be a string, got {image_path!r}: {path}")
    if image_path:
        resolved = path.parent / image_path.replace("\\", "/")
        if resolved.is_file():
            return ImageSource(path=resolved, annotation=path)
    if isinstance(embedded, str) and embedded:
        return ImageSource(embedded=embedded, annotation=path)
    if not image_path:
        raise DatasetError(f"no imagePath and no imageData: {path}")
    raise DatasetError(
        f"image not found: {path.parent / image_path.replace(chr(92), '/')} "
        f"(imagePath {image_path!r}, no imageData): {path}"
    )


def read_labelme_file(path: Path, skipped: Counter) -> LabelmeImage:
    """Parse and check one labelme JSON file; shapes without an area are counted in
    ``skipped`` (by type).

    Raises:
        DatasetError: one line naming ``path`` (and the shape at fault).
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"not a readable JSON file ({first_line(err)}): {path}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DatasetError(f"not a labelme file (no 'shapes' list): {path}")
    shapes = []
    for index, raw in enumerate(doc["shapes"]):
        if not isinstance(raw, dict):
            raise DatasetError(f"shape {index} is not an object: {path}")
        label, kind = raw.get("label"), raw.get("shape_type") or "polygon"
        where = f"shape {index} ({kind} {label!r}) in {path}"
        if not isinstance(label, str) or not label:
            raise DatasetError(f"{where}: 'label' must be a non-empty string")
        if kind in SKIPPED:
            skipped[kind] += 1
            continue
        if kind not in PAINTED:
            raise DatasetError(
                f"{where}: shape_type {kind!r} is not supported (painted: {', '.join(PAINTED)}; "
                f"skipped: {', '.join(SKIPPED)})"
            )
        points = _points(raw.get("points"), where)
        if len(points) < MIN_POINTS[kind] or (kind != "polygon" and len(points) != 2):
            wanted = "at least 3 points" if kind == "polygon" else "2 points"
            raise DatasetError(f"{where}: a {kind} needs {wanted}, got {len(points)}")
        shapes.append(Shape(label, kind, points))
    return LabelmeImage(
        name=path.stem,
        source=path,
        image=_image_source(doc, path),
        size=_size(doc, path),
        shapes=shapes,
    )


def read_labelme_folder(folder: Path, skipped: Counter) -> list[LabelmeImage]:
    """Every ``*.json`` of ``folder``, sorted by name, as items (see the module rules)."""
    if not folder.is_dir():
        raise DatasetError(f"labelme folder not found: {folder}")
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise DatasetError(f"no labelme JSON files (*.json) in {folder}")
    return [read_labelme_file(p, skipped) for p in files]


def found_labels(items: Sequence[AnnotatedImage]) -> list[str]:
    """The labels of all items, sorted (labelme's default class order)."""
    return sorted({label for item in items for label in item.labels()})

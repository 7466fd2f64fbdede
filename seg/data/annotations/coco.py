"""COCO: an instances or stuff JSON file -> :class:`CocoImage` items.

Rules (data/README.md, "Your own annotations"):

- classes: the ``categories`` in ascending category id; ids need not be contiguous (the
  k-th category by id is class k, after ``background`` with ``unlabelled=background``);
- every entry of ``images`` is one image, annotated or not; its file is ``file_name``
  relative to the ``images`` folder, its output name the file name's stem, and its
  ``height``/``width`` must equal the decoded image's size;
- ``segmentation`` may be polygons (``[[x1, y1, x2, y2, ...], ...]``, 3 points or more
  each), uncompressed RLE (``{"counts": [..], "size": [h, w]}``) or compressed RLE
  (``counts`` a string); all are decoded with pycocotools;
- overlaps: an image's annotations are painted largest first (by decoded pixel area, ties
  in file order), so that a small object lying on a large one stays visible;
- ``iscrowd: 1`` regions are painted with their category like any other
  (``crowd=ignore``: painted 255 instead, in the same order);
- an annotation naming an unknown image or category id, a malformed segmentation or an
  RLE whose size or run lengths do not fit its image is one error line naming the file and
  the annotation id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from seg.data.annotations.classes import ClassMap
from seg.data.annotations.items import AnnotatedImage, ImageSource
from seg.data.labels import IGNORE_INDEX
from seg.errors import ConfigError, DatasetError, first_line

CROWD_CHOICES = ("category", "ignore")


@dataclass(frozen=True)
class Region:
    """One annotation of an image: its category name, segmentation and crowd flag."""

    annotation_id: object
    label: str
    segmentation: Any
    crowd: bool


def rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (6 bits a character, from ``0``; runs
    after the second stored as differences to the run two before).

    Read here only to check a string before pycocotools decodes it: pycocotools trusts the
    runs to add up to the mask size and writes past its buffer when they do not.

    Raises:
        ValueError: a character outside the alphabet or a truncated number.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("truncated run length")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} outside the RLE alphabet")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift  # sign of the last group
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_runs(runs: list[int], height: int, width: int, where: str) -> None:
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise DatasetError(
            f"{where}: RLE run lengths add up to {sum(runs)} (or one is negative), "
            f"not height x width = {height * width}"
        )


def decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """One annotation's segmentation -> bool H x W, through pycocotools.

    Raises:
        DatasetError: a malformed polygon or RLE, naming ``where``.
    """
    if isinstance(segmentation, list):
        polygons = segmentation
        if not polygons:
            raise DatasetError(f"{where}: empty segmentation list")
        for polygon in polygons:
            if not isinstance(polygon, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon
            ):
                raise DatasetError(f"{where}: a polygon must be a flat list of numbers")
            if len(polygon) % 2 or len(polygon) < 6:
                raise DatasetError(
                    f"{where}: polygon with {len(polygon) / 2:g} points (needs 3 or more x, y pairs)"
                )
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and {"counts", "size"} <= set(segmentation):
        size, counts = segmentation["size"], segmentation["counts"]
        if list(size) != [height, width]:
            raise DatasetError(
                f"{where}: RLE size {list(size)} differs from the image's [{height}, {width}]"
            )
        if isinstance(counts, list):  # uncompressed
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise DatasetError(f"{where}: uncompressed RLE counts must be integers")
            _check_runs(counts, height, width, where)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, str):  # compressed
            try:
                runs = rle_string_counts(counts)
            except ValueError as err:
                raise DatasetError(f"{where}: malformed compressed RLE ({err})") from None
            _check_runs(runs, height, width, where)
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            raise DatasetError(f"{where}: RLE counts must be a list or a string")
    else:
        raise DatasetError(f"{where}: segmentation must be polygons or an RLE object")
    return mask_utils.decode(rle).astype(bool)


@dataclass
class CocoImage(AnnotatedImage):
    """A COCO image entry and its annotations: painted largest area first."""

    regions: list[Region] = field(default_factory=list)
    crowd: str = "category"

    def labels(self) -> list[str]:
        return [r.label for r in self.regions if not (r.crowd and self.crowd == "ignore")]

    def paint(self, height: int, width: int, classes: ClassMap) -> np.ndarray:
        masks = []
        for region in self.regions:
            where = f"annotation {region.annotation_id!r} ({region.label!r}) in {self.source}"
            masks.append(decode_segmentation(region.segmentation, height, width, where))
        # Largest first, ties in file order (a stable sort): small objects end on top.
        order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
        label = np.full((height, width), classes.fill, dtype=np.uint8)
        for i in order:
            region = self.regions[i]
            if region.crowd and self.crowd == "ignore":
                value = IGNORE_INDEX
            else:
                value = classes.train_id(region.label, self.source)
            label[masks[i]] = value
        return label


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(f"{where}: '{key}' missing or not {getattr(kind, '__name__', kind)}")
    return value


@dataclass
class CocoFile:
    """A parsed COCO file: ``categories`` as ``(id, name)`` by ascending id, and items."""

    categories: list[tuple[int, str]]
    images: list[CocoImage]


def read_coco_file(path: Path, image_dir: Path | None, crowd: str) -> CocoFile:
    """Parse and check a COCO instances/stuff file (see the module rules).

    Raises:
        ConfigError: no ``images`` folder, a bad ``crowd`` choice.
        DatasetError: one line naming ``path`` and the entry at fault.
    """
    if crowd not in CROWD_CHOICES:
        raise ConfigError(f"crowd must be one of {CROWD_CHOICES}, got {crowd!r}")
    if image_dir is None:
        raise ConfigError(
            f"format=coco needs images=FOLDER (file_name is relative to it) for {path}"
        )
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"not a readable JSON file ({first_line(err)}): {path}") from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"not a COCO file (needs 'images', 'annotations', 'categories' lists): {path}"
        )

    names: dict[int, str] = {}
    for entry in doc["categories"]:
        where = f"category {entry!r} in {path}"
        cid, name = _field(entry, "id", int, where), _field(entry, "name", str, where)
        if cid in names:
            raise DatasetError(f"category id {cid} listed twice in {path}")
        if name in names.values():
            raise DatasetError(f"category name {name!r} used by two ids in {path}")
        names[cid] = name

    images: dict[int, CocoImage] = {}
    for entry in doc["images"]:
        where = f"image {entry.get('id') if isinstance(entry, dict) else entry!r} in {path}"
        image_id = _field(entry, "id", int, where)
        file_name = _field(entry, "file_name", str, where)
        height, width = _field(entry, "height", int, where), _field(entry, "width", int, where)
        if image_id in images:
            raise DatasetError(f"image id {image_id} listed twice in {path}")
        image_path = image_dir / file_name
        if not image_path.is_file():
            raise DatasetError(f"image not found: {image_path} (image id {image_id} in {path})")
        images[image_id] = CocoImage(
            name=Path(file_name).stem,
            source=path,
            image=ImageSource(path=image_path, annotation=path),
            size=(height, width),
            crowd=crowd,
        )

    for entry in doc["annotations"]:
        ann_id = entry.get("id") if isinstance(entry, dict) else None
        where = f"annotation {ann_id!r} in {path}"
        image_id = _field(entry, "image_id", int, where)
        category_id = _field(entry, "category_id", int, where)
        if image_id not in images:
            raise DatasetError(f"{where}: unknown image id {image_id} (not in 'images')")
        if category_id not in names:
            raise DatasetError(f"{where}: unknown category id {category_id} (not in 'categories')")
        if "segmentation" not in entry:
            raise DatasetError(f"{where}: no 'segmentation'")
        crowd_flag = entry.get("iscrowd", 0)
        if crowd_flag not in (0, 1):
            raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {crowd_flag!r}")
        images[image_id].regions.append(
            Region(ann_id, names[category_id], entry["segmentation"], bool(crowd_flag))
        )
    if not images:
        raise DatasetError(f"no entries in 'images': {path}")
    return CocoFile(sorted(names.items()), list(images.values()))


def merge_categories(files: list[tuple[Path, CocoFile]]) -> list[str]:
    """The category names of several COCO files (one per split) in ascending id; the
    files must agree on the name of every id they share.

    Raises:
        DatasetError: two files give one id different names.
    """
    merged: dict[int, tuple[str, Path]] = {}
    for path, coco in files:
        for cid, name in coco.categories:
            if cid in merged and merged[cid][0] != name:
                raise DatasetError(
                    f"category id {cid} is {merged[cid][0]!r} in {merged[cid][1]} but {name!r} in {path}"
                )
            merged.setdefault(cid, (name, path))
    names = [merged[cid][0] for cid in sorted(merged)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"category name {duplicates[0]!r} has two ids across the COCO files")
    return names

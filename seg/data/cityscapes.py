"""Cityscapes in its official layout.

```
<root>/leftImg8bit/<split>/<city>/<base>_leftImg8bit.png
<root>/gtFine/<split>/<city>/<base>_gtFine_labelIds.png       (ids 0..33)
<root>/gtFine/<split>/<city>/<base>_gtFine_labelTrainIds.png  (optional, train ids)
```
Label ids map to the 19 train ids through the 256-entry table of ``seg.data.labels``
(built from ``cityscapesscripts.helpers.labels``; void ids -> 255). When every image of
the split has a ``*_labelTrainIds.png`` (made by cityscapesscripts' createTrainIdLabelImgs)
those are read instead, as they are already train ids. ``train_id_map`` then maps those
19 train ids onto another task's (``seg.data.labels.remap_train_ids``), e.g. road vs
everything else (``configs/experiment/synthcity_road_binary.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from seg.data.folder import PairedDataset, _finish
from seg.data.labels import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_PALETTE,
    cityscapes_lookup_table,
    identity_lookup_table,
    remap_train_ids,
)
from seg.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LAYOUT = f"leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} and gtFine/<split>/<city>/*{LABEL_IDS_SUFFIX}"

LabelType = Literal["auto", "labelIds", "labelTrainIds"]


class CityscapesDataset(PairedDataset):
    """Cityscapes ``train`` / ``val`` / ``test`` split; items follow the data contract.

    Args:
        root: dataset root (relative paths resolve against the working directory).
        split: ``train``, ``val`` or ``test``.
        transform: albumentations pipeline (``seg.data.transforms``) or None.
        label_type: ``auto`` (labelTrainIds when all present, else labelIds) or a fixed kind.
        strict: raise on the first image without a label (False: collect in ``problems``).
        cache, cache_build: decoded cache folder and whether to build it (``PairedDataset``).
        train_id_map: ``{Cityscapes train id: this task's train id or 255}`` for all 19
            ids, or None; with it ``num_classes`` is the new count (``class_names`` and
            ``palette`` stay Cityscapes': the dataset config names the new classes).
    """

    num_classes: ClassVar[int] = len(CITYSCAPES_CLASS_NAMES)
    class_names: ClassVar[tuple[str, ...]] = CITYSCAPES_CLASS_NAMES
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = CITYSCAPES_PALETTE

    def __init__(
        self,
        root: str | Path = "data/cityscapes",
        split: str = "train",
        transform=None,
        label_type: LabelType = "auto",
        strict: bool = True,
        cache: str | Path | None = None,
        cache_build: bool = True,
        train_id_map: Mapping[int, int] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"unknown Cityscapes split {split!r} (expected one of {SPLITS})")
        if label_type not in ("auto", "labelIds", "labelTrainIds"):
            raise ConfigError(
                f"unknown label_type {label_type!r} (expected auto, labelIds or labelTrainIds)"
            )
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(f"dataset root not found: {self.root.resolve()} (expected {LAYOUT})")
        image_root = self.root / "leftImg8bit" / split
        label_root = self.root / "gtFine" / split
        for folder, pattern in (
            (image_root, f"leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}"),
            (label_root, f"gtFine/{split}/<city>/*{LABEL_IDS_SUFFIX}"),
        ):
            if not folder.is_dir():
                raise DatasetError(
                    f"split folder not found: {folder.resolve()} (expected {pattern})"
                )

        images = sorted(image_root.glob(f"*/*{IMAGE_SUFFIX}"))
        bases = [(p, p.parent.name, p.name[: -len(IMAGE_SUFFIX)]) for p in images]
        if label_type == "auto":
            has_train_ids = bool(bases) and all(
                (label_root / city / f"{base}{TRAIN_IDS_SUFFIX}").is_file()
                for _, city, base in bases
            )
            label_type = "labelTrainIds" if has_train_ids else "labelIds"
        self.label_type = label_type
        suffix = TRAIN_IDS_SUFFIX if label_type == "labelTrainIds" else LABEL_IDS_SUFFIX
        lut, valid = (
            identity_lookup_table(self.num_classes)
            if label_type == "labelTrainIds"
            else cityscapes_lookup_table()
        )
        if train_id_map is not None:
            lut, self.num_classes = remap_train_ids(lut, train_id_map, len(CITYSCAPES_CLASS_NAMES))
        pairs, problems = [], []
        for image_path, city, base in bases:
            label_path = label_root / city / f"{base}{suffix}"
            if label_path.is_file():
                pairs.append((image_path, label_path))
            else:
                problems.append(f"image without a label (expected {label_path}): {image_path}")
        _finish(pairs, problems, strict, image_root, f"<city>/*{IMAGE_SUFFIX}")
        super().__init__(
            pairs, lut, valid, transform, problems=problems, cache=cache, cache_build=cache_build
        )

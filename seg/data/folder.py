"""Paired image/label datasets: the shared reading and checking code, and ``FolderDataset``.

``PairedDataset`` holds a list of (image path, label path) pairs and a 256-entry label
lookup table; it reads, validates and maps one pair per item. ``FolderDataset`` (custom
data) and ``CityscapesDataset`` only differ in how they find the pairs.

Cheap checks (folders exist, every image has a label) run when a dataset is built;
decoding problems (corrupt PNG, wrong size, 3-channel label, values or colours outside
the table) are found when an item is read and raised as ``DatasetError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from seg.data.cache import open_cache
from seg.data.colors import ColorTable, read_color_mask
from seg.data.labels import IGNORE_INDEX, build_lookup_table, identity_lookup_table
from seg.data.transforms import DatasetKey, apply_transform, to_sample, unpack_key
from seg.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _read_bytes(path: Path, kind: str) -> np.ndarray:
    try:
        return np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"cannot read {kind} {path}: {err.strerror or err}") from err


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB H x W x 3; ``DatasetError`` if unreadable."""
    data = _read_bytes(path, "image")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DatasetError(f"corrupt, truncated or unsupported image file: {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    """Decode a label PNG to uint8 H x W; ``DatasetError`` if unreadable or not single-channel."""
    data = _read_bytes(path, "label")
    label = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if label is None:
        raise DatasetError(f"corrupt, truncated or unsupported label file: {path}")
    if label.ndim == 3 and label.shape[2] > 1:
        raise DatasetError(
            f"label has {label.shape[2]} channels, expected a single-channel id PNG "
            f"(a colour mask is not a label): {path}"
        )
    if label.ndim == 3:
        label = label[:, :, 0]
    if label.dtype != np.uint8:
        raise DatasetError(f"label must be 8-bit, got {label.dtype}: {path}")
    return label


def check_label_values(label: np.ndarray, valid: np.ndarray, path: Path) -> None:
    """Raise ``DatasetError`` if ``label`` holds values that ``valid`` (bool[256]) rejects."""
    bad = ~valid[label]
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if values.size > 8 else "")
        raise DatasetError(f"label values outside the dataset's table ({shown}): {path}")


class PairedDataset(Dataset):
    """Image/label pairs mapped through a lookup table; items follow the data contract.

    Item: ``{"image": uint8 H x W x 3, "label": uint8 H x W (train ids, 255 ignore),
    "name": file stem}`` after ``transform``. Keys are an index or ``(index, sample_seed)``
    (see ``seg.data.transforms.apply_transform``). With ``cache`` (a folder) items are read
    from the decoded cache of ``seg.data.cache`` instead of the PNGs (same pixels); it is
    validated now, and built or refreshed here when ``cache_build``.
    """

    #: What, beside ``lut``/``valid``, turns a label file into train ids ("" for a plain
    #: id PNG); part of the decoded cache's identity of a split.
    label_source: str = ""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        lut: np.ndarray,
        valid: np.ndarray,
        transform=None,
        names: Sequence[str] | None = None,
        problems: Sequence[str] = (),
        cache: str | Path | None = None,
        cache_build: bool = True,
    ) -> None:
        self.pairs = list(pairs)
        self.lut = lut
        self.valid = valid
        self.transform = transform
        self.names = list(names) if names is not None else [p[0].stem for p in self.pairs]
        # Build-time problems found with strict=False (for tools/check_dataset.py).
        self.problems = list(problems)
        self.cache = None if cache is None else open_cache(self, cache, build=cache_build)

    def __len__(self) -> int:
        return len(self.pairs)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read pair ``index``: (RGB uint8 H x W x 3, raw label uint8 H x W), sizes checked."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = self.read_label_file(label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"label size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]} ({image_path.name}): {label_path}"
            )
        return image, label

    def read_label_file(self, path: Path) -> np.ndarray:
        """Decode one label file to uint8 H x W (the values ``lut`` maps)."""
        return read_label(path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read pair ``index`` and map its label to train ids (values checked)."""
        image, raw = self.load_raw(index)
        check_label_values(raw, self.valid, self.pairs[index][1])
        return image, np.take(self.lut, raw)

    def __getitem__(self, key: DatasetKey) -> dict[str, object]:
        index, seed = unpack_key(key)
        image, label = self.cache.read(index) if self.cache is not None else self.load(index)
        image, label = apply_transform(self.transform, image, label, seed)
        return to_sample(image, label, self.names[index])


def _finish(
    pairs: list[tuple[Path, Path]], problems: list[str], strict: bool, where: Path, pattern: str
) -> None:
    """Raise the first build-time problem (strict) or an empty-dataset error."""
    if strict and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)
    if not pairs and not problems:
        raise DatasetError(f"no images found in {where} (expected {pattern})")


class FolderDataset(PairedDataset):
    """Custom data: ``image_dir/<stem>.<ext>`` paired with ``mask_dir/<stem><mask_suffix>.png``.

    Masks hold train ids ``0..C-1`` and 255 (ignore), or any ids when ``id_to_trainid``
    maps them (ids absent from the map are rejected, map a void id to 255 explicitly), or
    are RGB colour masks when ``color_to_trainid`` lists ``[R, G, B, train id]`` rows
    (``seg.data.colors``; a colour absent from the table is a ``DatasetError`` naming the
    file and the colours). Colour masks are mapped to train ids when read, so
    ``load_raw`` already returns train ids and ``lut`` is the identity.

    Args:
        image_dir, mask_dir: folders (relative paths resolve against the working directory).
        class_names: one name per train id (defines ``num_classes``).
        palette: optional RGB per train id (used for visualisation only).
        id_to_trainid: optional ``{mask value: train id or 255}``.
        color_to_trainid: optional ``[[R, G, B, train id or 255], ...]``: masks are RGB
            colour masks (exclusive with ``id_to_trainid``).
        strict: raise on the first image without a mask (False: collect in ``problems``).
        cache, cache_build: decoded cache folder and whether to build it (``PairedDataset``).
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        class_names: Sequence[str],
        transform=None,
        palette: Sequence[Sequence[int]] | None = None,
        id_to_trainid: Mapping[int, int] | None = None,
        color_to_trainid: Sequence[Sequence[int]] | None = None,
        mask_suffix: str = "",
        image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
        strict: bool = True,
        cache: str | Path | None = None,
        cache_build: bool = True,
    ) -> None:
        self.class_names = [str(n) for n in class_names]
        self.num_classes = len(self.class_names)
        if self.num_classes == 0 or self.num_classes > IGNORE_INDEX:
            raise ConfigError(f"class_names must list 1..255 classes, got {self.num_classes}")
        self.palette = None if palette is None else [tuple(int(v) for v in c) for c in palette]
        if self.palette is not None and (
            len(self.palette) != self.num_classes or any(len(c) != 3 for c in self.palette)
        ):
            raise ConfigError(
                f"palette must hold {self.num_classes} RGB triples (one per class), "
                f"got {len(self.palette)} entries"
            )
        if id_to_trainid is not None and color_to_trainid is not None:
            raise ConfigError(
                "id_to_trainid and color_to_trainid are exclusive (masks hold ids or colours): "
                "set one of them to null"
            )
        self.color_table: ColorTable | None = None
        if color_to_trainid is not None:
            self.color_table = ColorTable(color_to_trainid, self.num_classes)
            self.label_source = f"colors:{self.color_table.describe()}"
        if id_to_trainid is None:
            lut, valid = identity_lookup_table(self.num_classes)
        else:
            lut, valid = build_lookup_table(dict(id_to_trainid), self.num_classes)

        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        for folder, kind in ((image_dir, "image"), (mask_dir, "mask")):
            if not folder.is_dir():
                raise DatasetError(f"{kind} folder not found: {folder.resolve()}")
        suffixes = {s.lower() for s in image_suffixes}
        images = sorted(
            p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes
        )
        pairs: list[tuple[Path, Path]] = []
        problems: list[str] = []
        seen: dict[str, Path] = {}
        for image_path in images:
            if image_path.stem in seen:
                raise DatasetError(
                    f"two images share the stem {image_path.stem!r}: {seen[image_path.stem]} "
                    f"and {image_path}"
                )
            seen[image_path.stem] = image_path
            mask_path = mask_dir / f"{image_path.stem}{mask_suffix}.png"
            if mask_path.is_file():
                pairs.append((image_path, mask_path))
            else:
                problems.append(f"image without a mask (expected {mask_path}): {image_path}")
        _finish(pairs, problems, strict, image_dir, f"<stem>{{{','.join(sorted(suffixes))}}}")
        super().__init__(
            pairs, lut, valid, transform, problems=problems, cache=cache, cache_build=cache_build
        )

    def read_label_file(self, path: Path) -> np.ndarray:
        """An id mask as it is, or a colour mask mapped to train ids (``color_to_trainid``)."""
        if self.color_table is None:
            return read_label(path)
        return self.color_table.to_train_ids(read_color_mask(path), path)

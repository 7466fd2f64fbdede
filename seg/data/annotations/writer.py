"""Writing a converted dataset: all or nothing.

Everything is written into a temporary folder beside the output,
``.<out name>.convert-<pid>``, and renamed to ``out`` once complete; on any error the
temporary folder is removed, so ``out`` is either absent (or its previous content, with
``force=true``) or the whole new dataset. A temporary folder left by a killed conversion
(its process gone) is removed by the next one.

Layout (what ``seg.data.folder.FolderDataset`` reads, paired by stem)::

    out/images/<split>/<name>.<ext>   the image: hard-linked to its source where the file
                                      system allows (``link=true``), else copied; an image
                                      embedded in its annotation, or of a suffix the folder
                                      dataset does not read, is written as PNG
    out/masks/<split>/<name>.png      uint8 single-channel: train ids, 255 ignore
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seg.data.annotations.classes import ClassMap
from seg.data.annotations.items import AnnotatedImage
from seg.data.folder import IMAGE_SUFFIXES
from seg.errors import ConfigError, DatasetError
from seg.fileio import process_alive, write_bytes_atomic, write_png

#: The default training crop's largest side (``SplitStats.default_crop``).
MAX_DEFAULT_CROP = 512


@dataclass
class SplitStats:
    """What was written into one split: images, pixels per train id, RGB sums (0-1)."""

    images: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    channel_sum: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    channel_sq_sum: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    pixels: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) per image

    def default_crop(self, largest: int = MAX_DEFAULT_CROP) -> tuple[int, int]:
        """A training crop for these images: per side, the largest multiple of 32
        (BiSeNetV2's output stride) within the median image size, at most ``largest``.
        A fixed 512x512 crop on 120x160 images pads them to 13x the pixels, all ignored."""
        if not self.sizes:
            return (largest, largest)
        median = np.median(np.asarray(self.sizes), axis=0)
        return tuple(int(max(32, min(largest, side // 32 * 32))) for side in median)  # type: ignore[return-value]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel RGB mean and std of the images, 0-1 scale, 4 decimals."""
        n = max(self.pixels, 1)
        mean = self.channel_sum / n
        std = np.sqrt(np.maximum(self.channel_sq_sum / n - mean**2, 0.0))
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def _temporary_name(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.convert-{pid}"


def _remove_abandoned(out: Path) -> None:
    """Remove temporary folders of conversions into ``out`` whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:convert|old)-(\d+)$")
    for path in out.parent.glob(f".{out.name}.*-*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


class DatasetWriter:
    """Write items into a temporary folder; :meth:`commit` renames it to ``out``.

    Use as a context manager: leaving the block without :meth:`commit` (an error) removes
    the temporary folder.

    Raises:
        ConfigError: ``out`` exists and ``force`` is false.
    """

    def __init__(self, out: Path, force: bool = False, link: bool = True) -> None:
        self.out, self.force, self.link = out, force, link
        if out.exists() and not force:
            raise ConfigError(f"output folder exists: {out} (force=true replaces it)")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output is not a folder: {out}")
        self.tmp = _temporary_name(out, os.getpid())
        self.stats: dict[str, SplitStats] = {}
        self._names: dict[tuple[str, str], AnnotatedImage] = {}
        self._committed = False

    def __enter__(self) -> DatasetWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _put_image(self, item: AnnotatedImage, image: np.ndarray, folder: Path) -> None:
        source = item.image.path
        suffix = source.suffix.lower() if source is not None else ""
        if source is None or suffix not in IMAGE_SUFFIXES:
            write_png(folder / f"{item.name}.png", image[..., ::-1])  # RGB -> BGR
            return
        target = folder / f"{item.name}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.link:
            with contextlib.suppress(OSError):  # another file system, no hard links: copy
                os.link(source, target)
                return
        shutil.copyfile(source, target)

    def write(self, split: str, item: AnnotatedImage, classes: ClassMap) -> None:
        """Decode ``item``'s image, check its size, paint its mask and write both.

        Raises:
            DatasetError: two items of one name in a split, an unreadable image, a size
                that differs from the annotation's, a mask that cannot be painted.
        """
        key = (split, item.name)
        if key in self._names:
            raise DatasetError(
                f"two images would both be {split}/{item.name}: from {self._names[key].source} "
                f"and {item.source} (output names are file stems)"
            )
        self._names[key] = item
        image = item.image.read()
        height, width = image.shape[:2]
        if item.size is not None and item.size != (height, width):
            raise DatasetError(
                f"image {item.image.describe()} is {width}x{height} but {item.source} says "
                f"{item.size[1]}x{item.size[0]} (width x height)"
            )
        label = item.paint(height, width, classes)
        self._put_image(item, image, self.tmp / "images" / split)
        write_png(self.tmp / "masks" / split / f"{item.name}.png", label)

        stats = self.stats.setdefault(split, SplitStats())
        stats.images += 1
        stats.class_pixels += np.bincount(label.ravel(), minlength=256)
        pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
        stats.channel_sum += pixels.sum(0)
        stats.channel_sq_sum += (pixels**2).sum(0)
        stats.pixels += pixels.shape[0]
        stats.sizes.append((height, width))

    def write_text(self, relative: str, text: str) -> Path:
        """Write a text file into the dataset (``relative`` to its root); returns its final path."""
        write_bytes_atomic(self.tmp / relative, text.encode("utf-8"))
        return self.out / relative

    def commit(self) -> None:
        """Rename the complete temporary folder to ``out`` (replacing an old one with force)."""
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if old is not None:  # put the previous dataset back
                os.replace(old, self.out)
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

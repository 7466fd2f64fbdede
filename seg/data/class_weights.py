"""Median-frequency class weights of a split (``loss.class_weight=auto``, tools/check_dataset.py).

Median-frequency balancing (Eigen and Fergus, ICCV 2015; SegNet's CamVid recipe): with
train ids ``c = 0..C-1``,

    freq(c)   = pixels of class c / labelled pixels of the images in which c is present
    weight(c) = median over the present classes of freq / freq(c)

Ignored pixels (train id 255) count nowhere: neither as a class nor in an image's pixels.
A class with no pixel in the split has no frequency: it is left out of the median and gets
weight 0 (no pixel of that split ever carries it; tools/check_dataset.py names it). The
median of an even number of frequencies is the mean of the middle two (``numpy.median``).

:class:`ClassFrequency` gathers the counts from one ``bincount`` per label, so
tools/check_dataset.py adds them during the pass it makes anyway, and
:func:`count_class_frequency` makes the pass over a dataset's labels alone (no image is
decoded) for the training run's ``auto``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from seg.data.folder import PairedDataset, check_label_values, read_label
from seg.data.labels import IGNORE_INDEX
from seg.errors import ConfigError, DatasetError
from seg.tables import markdown_table


@dataclass
class ClassFrequency:
    """Pixel counts of one split per train id (0..254; 255, ignore, is never counted).

    Attributes:
        class_pixels: int64[255], pixels of each train id over the split.
        image_pixels: int64[255], for each train id the labelled (non-ignored) pixels of
            the images in which it is present.
        images: labels added.
    """

    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(IGNORE_INDEX, np.int64))
    image_pixels: np.ndarray = field(default_factory=lambda: np.zeros(IGNORE_INDEX, np.int64))
    images: int = 0

    def add(self, train_id_counts: np.ndarray) -> None:
        """Add one label's pixel count per train id (int, length 256: index 255 = ignore)."""
        counts = np.asarray(train_id_counts, dtype=np.int64)[:IGNORE_INDEX]
        self.class_pixels += counts
        self.image_pixels[counts > 0] += counts.sum()
        self.images += 1

    def merge(self, other: ClassFrequency) -> None:
        """Add another part of the same split (integer sums: the order does not matter)."""
        self.class_pixels += other.class_pixels
        self.image_pixels += other.image_pixels
        self.images += other.images

    def frequencies(self, num_classes: int) -> np.ndarray:
        """float64[num_classes]: freq(c), NaN for a class with no pixel."""
        pixels = self.class_pixels[:num_classes].astype(np.float64)
        totals = self.image_pixels[:num_classes].astype(np.float64)
        return np.divide(pixels, totals, out=np.full(num_classes, np.nan), where=totals > 0)

    def weights(self, num_classes: int) -> np.ndarray:
        """float64[num_classes]: median-frequency weights (module docstring); 0 where absent."""
        return median_frequency_weights(
            self.class_pixels[:num_classes], self.image_pixels[:num_classes]
        )

    def absent(self, num_classes: int) -> list[int]:
        """The train ids below ``num_classes`` with no pixel in the split."""
        return [int(c) for c in np.flatnonzero(self.class_pixels[:num_classes] == 0)]


def median_frequency_weights(class_pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """weight(c) = median(freq) / freq(c), freq(c) = class_pixels[c] / image_pixels[c].

    Args:
        class_pixels: int[C], pixels of each class over the split.
        image_pixels: int[C], labelled pixels of the images in which each class is present.

    Returns:
        float64[C]; a class with no pixel gets 0 and is left out of the median.

    Raises:
        DatasetError: no class has a pixel (every label is ignore).
    """
    pixels = np.asarray(class_pixels, dtype=np.float64)
    totals = np.asarray(image_pixels, dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise DatasetError("no labelled pixel in the split: class weights need at least one")
    freq = pixels[present] / totals[present]
    weights = np.zeros(pixels.shape, dtype=np.float64)
    weights[present] = np.median(freq) / freq
    return weights


def label_train_id_counts(dataset: PairedDataset, index: int) -> np.ndarray:
    """int64[256]: pixels per train id of label ``index`` (255 = ignore); reads the label only
    (or the decoded cache), checks its values like training does."""
    if dataset.cache is not None:
        return np.bincount(dataset.cache.read(index)[1].ravel(), minlength=256)
    path = dataset.pairs[index][1]
    raw = read_label(path)
    check_label_values(raw, dataset.valid, path)
    raw_counts = np.bincount(raw.ravel(), minlength=256)
    return np.bincount(dataset.lut, weights=raw_counts, minlength=256).astype(np.int64)


def count_class_frequency(
    dataset: object, progress: bool | None = None, workers: int | None = None
) -> ClassFrequency:
    """Read every label of ``dataset`` once and gather its :class:`ClassFrequency`.

    ``dataset`` must be one of seg's image/label datasets (``PairedDataset``: Cityscapes,
    SynthCity, folder datasets); its transform is not applied (the weights describe the
    files). Labels are decoded on ``workers`` threads (default: up to 8, one per CPU);
    the counts are integer sums, so the result does not depend on the order. ``progress``:
    a tqdm bar (None: only on a terminal).

    Raises:
        ConfigError: ``dataset`` is not a ``PairedDataset``.
        DatasetError: an unreadable label or a value outside the dataset's table.
    """
    if not isinstance(dataset, PairedDataset):
        raise ConfigError(
            f"class weights from the data (auto) need one of seg's image/label datasets, got "
            f"{type(dataset).__name__}; give loss.class_weight as a list instead"
        )
    workers = workers or min(8, os.cpu_count() or 1)
    frequency = ClassFrequency()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        counts = pool.map(lambda i: label_train_id_counts(dataset, i), range(len(dataset)))
        disable = None if progress is None else not progress
        for one in tqdm(
            counts, total=len(dataset), desc="class weights", unit="label", disable=disable
        ):
            frequency.add(one)
    return frequency


def format_weights(class_names: Sequence[str], weights: Sequence[float]) -> str:
    """``"road 0.2794, sidewalk 1.0000, ..."``: class name and weight, in train-id order."""
    return ", ".join(f"{name} {float(w):.4f}" for name, w in zip(class_names, weights, strict=True))


def weights_report(class_names: Sequence[str], frequency: ClassFrequency, split: str) -> list[str]:
    """Markdown lines for tools/check_dataset.py: freq(c) and weight(c) of every class."""
    num_classes = len(class_names)
    if not frequency.class_pixels[:num_classes].any():
        return [f"{split}: no labelled pixel, so no median-frequency class weights"]
    freq, weights = frequency.frequencies(num_classes), frequency.weights(num_classes)
    rows = [
        [f"{c} {name}", "-" if np.isnan(freq[c]) else f"{freq[c]:.4f}", f"{weights[c]:.4f}"]
        for c, name in enumerate(class_names)
    ]
    lines = [
        f"median-frequency class weights of the {split} split (what loss.class_weight=auto "
        f"trains with; freq = class pixels / labelled pixels of the images holding the class):",
        "",
        markdown_table(["class", "freq", "weight"], rows),
    ]
    absent = frequency.absent(num_classes)
    if absent:
        names = ", ".join(class_names[c] for c in absent)
        lines.append(f"weight 0 for the classes with no {split} pixel: {names}")
    return lines

"""The class list of a converted dataset: annotation labels -> train ids.

Rules (data/README.md, "Your own annotations"):

- the classes are ``classes=[...]`` when given, else those the annotations name: labelme
  labels found in the files, sorted; COCO categories in ascending category id (COCO ids
  are not contiguous: the k-th category by id becomes class k);
- ``unlabelled=background``: pixels no shape covers get train id 0, a class named
  ``background`` put first (a label ``background`` in the annotations is that class);
  ``unlabelled=ignore``: they get 255 and the classes start at train id 0;
- a label that is not a class (only possible with ``classes=[...]`` given) is one error
  line naming the file and the label, or painted 255 with ``unknown_labels=ignore``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from seg.data.labels import IGNORE_INDEX
from seg.errors import ConfigError, DatasetError

BACKGROUND = "background"
UNLABELLED_CHOICES = ("background", "ignore")
UNKNOWN_CHOICES = ("error", "ignore")


@dataclass(frozen=True)
class ClassMap:
    """Train ids of labels; ``fill`` is the train id of pixels no shape covers."""

    names: tuple[str, ...]  # class name per train id 0..C-1
    fill: int  # 0 (background) or 255 (ignore)
    unknown_labels: str  # "error" | "ignore"

    def train_id(self, label: str, source: Path | str) -> int:
        """The train id painted for ``label`` (255 for an unknown label when ignored).

        Raises:
            DatasetError: ``label`` is not a class and ``unknown_labels=error``.
        """
        try:
            return self.names.index(label)
        except ValueError:
            if self.unknown_labels == "ignore":
                return IGNORE_INDEX
        raise DatasetError(
            f"label {label!r} is not one of classes=[{', '.join(self.names)}]: {source} "
            "(add it to classes, or set unknown_labels=ignore to paint it 255)"
        )

    def check(self, labels: Iterable[tuple[str, Path | str]]) -> None:
        """Raise on the first ``(label, file)`` that is not a class (before anything is
        written)."""
        for label, source in labels:
            self.train_id(label, source)


def resolve_classes(
    found: Sequence[str],
    given: Sequence[str] | None,
    unlabelled: str,
    unknown_labels: str,
) -> ClassMap:
    """The class list from the labels ``found`` (in their stated order) or ``given``.

    Raises:
        ConfigError: a bad choice, an empty or duplicated class list, more than 255 classes.
    """
    if unlabelled not in UNLABELLED_CHOICES:
        raise ConfigError(f"unlabelled must be one of {UNLABELLED_CHOICES}, got {unlabelled!r}")
    if unknown_labels not in UNKNOWN_CHOICES:
        raise ConfigError(
            f"unknown_labels must be one of {UNKNOWN_CHOICES}, got {unknown_labels!r}"
        )
    names = [str(n) for n in (given if given is not None else found)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"classes lists {', '.join(map(repr, duplicates))} more than once")
    if unlabelled == "background":
        names = [BACKGROUND, *(n for n in names if n != BACKGROUND)]
    if not names:
        raise ConfigError("no classes: the annotations name none and classes=[...] is not set")
    if len(names) > IGNORE_INDEX:
        raise ConfigError(f"{len(names)} classes: at most 255 fit a uint8 mask beside 255")
    fill = 0 if unlabelled == "background" else IGNORE_INDEX
    return ClassMap(tuple(names), fill, unknown_labels)


def default_palette(num_classes: int, background_first: bool) -> list[tuple[int, int, int]]:
    """Distinct RGB colours, one per class (visualisation only): hues a golden angle apart,
    two brightness levels; black first when class 0 is the background."""
    colours = []
    for k in range(num_classes):
        if background_first and k == 0:
            colours.append((0, 0, 0))
            continue
        hue = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.7, 0.95 if k % 2 else 0.7)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours

"""Label tables: Cityscapes ids -> train ids, class names and palette, generic id maps.

A label PNG holds one uint8 value per pixel. A 256-entry lookup table turns those values
into train ids (0..C-1, 255 = ignore) with one ``np.take``; a second 256-entry boolean
table says which values a dataset may contain at all, so that a stray value (a label
painted with the wrong tool, a colour mask saved as grey) is reported instead of being
silently mapped to ignore.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cityscapesscripts.helpers.labels import labels as _cityscapes_labels

from seg.errors import ConfigError

IGNORE_INDEX = 255

# The 19 evaluated classes, in train-id order, exactly as cityscapesscripts names them.
CITYSCAPES_CLASS_NAMES: tuple[str, ...] = tuple(
    label.name
    for label in sorted(
        (lb for lb in _cityscapes_labels if 0 <= lb.trainId < IGNORE_INDEX),
        key=lambda lb: lb.trainId,
    )
)
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(label.color)
    for label in sorted(
        (lb for lb in _cityscapes_labels if 0 <= lb.trainId < IGNORE_INDEX),
        key=lambda lb: lb.trainId,
    )
)
# label id -> train id for every id that can appear in a uint8 labelIds PNG (0..33).
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    lb.id: (lb.trainId if 0 <= lb.trainId < IGNORE_INDEX else IGNORE_INDEX)
    for lb in _cityscapes_labels
    if lb.id >= 0
}
# Cityscapes label ids by name, e.g. CITYSCAPES_NAME_TO_ID["road"] == 7.
CITYSCAPES_NAME_TO_ID: dict[str, int] = {lb.name: lb.id for lb in _cityscapes_labels}


def build_lookup_table(
    id_to_trainid: Mapping[int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Build ``(lut, valid)``: uint8[256] id -> train id, and bool[256] allowed ids.

    Ids absent from ``id_to_trainid`` are not allowed (``valid`` False) and map to 255.
    Train ids must lie in ``0..num_classes-1`` or be 255 (ignore); -1 is read as 255.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for raw_id, raw_train in id_to_trainid.items():
        label_id, train_id = int(raw_id), int(raw_train)
        if not 0 <= label_id <= 255:
            raise ConfigError(f"label id {label_id} is outside 0..255 (labels are uint8 PNGs)")
        if train_id == -1:
            train_id = IGNORE_INDEX
        if not (0 <= train_id < num_classes or train_id == IGNORE_INDEX):
            raise ConfigError(
                f"label id {label_id} maps to train id {train_id}, outside 0..{num_classes - 1} and 255"
            )
        lut[label_id] = train_id
        valid[label_id] = True
    return lut, valid


def identity_lookup_table(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)`` for masks that already hold train ids: 0..C-1 and 255 allowed."""
    return build_lookup_table({**{c: c for c in range(num_classes)}, 255: 255}, num_classes)


def cityscapes_lookup_table() -> tuple[np.ndarray, np.ndarray]:
    """``(lut, valid)`` for ``*_gtFine_labelIds.png``: ids 0..33 allowed, void ids -> 255."""
    return build_lookup_table(CITYSCAPES_ID_TO_TRAINID, len(CITYSCAPES_CLASS_NAMES))


def remap_train_ids(
    lut: np.ndarray, train_id_map: Mapping[int, int] | Sequence[int], source_classes: int
) -> tuple[np.ndarray, int]:
    """Compose a lookup table with a train-id remap: ``(new lut, new class count)``.

    ``train_id_map`` gives every train id ``0..source_classes-1`` of ``lut`` a train id of
    the new task (or 255, ignore): a list whose i-th value is the new id of train id i
    (``[0, 1, 1, ..., 1]``: road vs everything else), or a mapping ``{0: 0, 1: 1, ...}``.
    Every source id must be given (nothing is dropped silently), and the new ids must be
    ``0..K-1``, each used. Ignored pixels (255) stay ignored.

    Raises:
        ConfigError: a source id missing or unknown, a new id out of range or unused.
    """
    try:
        pairs = (
            enumerate(train_id_map) if isinstance(train_id_map, Sequence) else train_id_map.items()
        )
        mapping = {int(k): int(v) for k, v in pairs}
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(
            f"train_id_map must give each train id a train id ([0, 1, 1, ...] or "
            f"{{0: 0, 1: 1, ...}}), got {train_id_map!r}"
        ) from None
    sources = set(range(source_classes))
    if set(mapping) != sources or len(mapping) != len(train_id_map):  # "18" and 18: twice
        missing, unknown = sorted(sources - set(mapping)), sorted(set(mapping) - sources)
        raise ConfigError(
            f"train_id_map must give each train id 0..{source_classes - 1} once "
            f"(missing {missing}, unknown {unknown}, {len(train_id_map)} given)"
        )
    targets = {v for v in mapping.values() if v != IGNORE_INDEX}
    count = len(targets)
    if count == 0 or targets != set(range(count)):
        raise ConfigError(
            f"train_id_map must map to train ids 0..K-1, each used, or 255 (ignore); "
            f"got {sorted(targets)}"
        )
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table[lut], count

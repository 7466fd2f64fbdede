"""Colour masks: a colour -> train id table and the reading of RGB mask PNGs.

Many datasets and annotation tools store labels as RGB colours (CamVid, Cityscapes'
``*_color.png``, Pascal VOC's palette PNGs). A :class:`ColorTable` maps each listed colour
to a train id (``0..C-1``, or 255 for ignore colours) and refuses any other colour, so that
a mask painted with an unexpected shade is reported instead of silently trained on.

In a config the table is a list of ``[R, G, B, train id]`` rows, one colour per row::

    color_to_trainid:
      - [128, 64, 128, 0]   # road
      - [0, 0, 0, 255]      # void: ignored
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from seg.data.labels import IGNORE_INDEX
from seg.errors import ConfigError, DatasetError

KEY = "color_to_trainid"
SHOWN = 8  # offending colours named in an error line


def _pack(rgb: np.ndarray) -> np.ndarray:
    """uint8 ... x 3 RGB -> int32 ``R << 16 | G << 8 | B`` (one number per colour)."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _unpack(code: int) -> tuple[int, int, int]:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class ColorTable:
    """Colours -> train ids for RGB masks.

    Args:
        rows: ``[R, G, B, train id]`` per colour; R, G, B in 0..255, the train id in
            ``0..num_classes-1`` or 255 (ignore). Several colours may share a train id.
        num_classes: C, the number of classes of the dataset.

    Raises:
        ConfigError: one line naming the row at fault (``color_to_trainid[i]``).
    """

    def __init__(self, rows: Sequence[Sequence[int]], num_classes: int) -> None:
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
            raise ConfigError(
                f"{KEY} must be a non-empty list of [R, G, B, train id] rows, got {rows!r}"
            )
        seen: dict[tuple[int, int, int], int] = {}
        for i, row in enumerate(rows):
            values = list(row) if isinstance(row, Sequence) and not isinstance(row, str) else []
            if len(values) != 4 or not all(_is_int(v) for v in values):
                raise ConfigError(
                    f"{KEY}[{i}] must be [R, G, B, train id] (4 integers), got {row!r}"
                )
            r, g, b, train_id = (int(v) for v in values)
            if not all(0 <= c <= 255 for c in (r, g, b)):
                raise ConfigError(f"{KEY}[{i}] colour {[r, g, b]} has a value outside 0..255")
            if not (0 <= train_id < num_classes or train_id == IGNORE_INDEX):
                raise ConfigError(
                    f"{KEY}[{i}] maps {[r, g, b]} to train id {train_id}, outside "
                    f"0..{num_classes - 1} and 255"
                )
            if (r, g, b) in seen:
                raise ConfigError(f"{KEY}[{i}] lists the colour {[r, g, b]} a second time")
            seen[(r, g, b)] = train_id
        self.rows: list[tuple[int, int, int, int]] = [(*c, t) for c, t in seen.items()]
        codes = _pack(np.array([r[:3] for r in self.rows], dtype=np.uint8))
        order = np.argsort(codes)
        self._codes = codes[order]  # sorted, for searchsorted
        self._ids = np.array([r[3] for r in self.rows], dtype=np.uint8)[order]

    def describe(self) -> str:
        """The table as text, rows sorted (one table, one text whatever the row order); the
        decoded cache's identity of a split."""
        return ";".join(",".join(str(v) for v in row) for row in sorted(self.rows))

    def palette(self, num_classes: int) -> list[tuple[int, int, int] | None]:
        """The first colour listed for each train id (None for an id no colour maps to)."""
        out: list[tuple[int, int, int] | None] = [None] * num_classes
        for r, g, b, train_id in self.rows:
            if train_id < num_classes and out[train_id] is None:
                out[train_id] = (r, g, b)
        return out

    def to_train_ids(self, rgb: np.ndarray, path: Path | str) -> np.ndarray:
        """Map an RGB mask (uint8 H x W x 3) to train ids (uint8 H x W).

        Raises:
            DatasetError: a colour not in the table, naming ``path`` and the first colours.
        """
        codes = _pack(rgb)
        index = np.searchsorted(self._codes, codes).clip(0, len(self._codes) - 1)
        known = self._codes[index] == codes
        if not known.all():
            unknown = np.unique(codes[~known])
            shown = " ".join("[{},{},{}]".format(*_unpack(int(c))) for c in unknown[:SHOWN])
            more = f" and {unknown.size - SHOWN} more" if unknown.size > SHOWN else ""
            raise DatasetError(f"mask colours not in {KEY}: {shown}{more}: {path}")
        return self._ids[index]


def read_color_mask(path: Path) -> np.ndarray:
    """Decode a colour mask (RGB, RGBA, grey or palette PNG) to uint8 RGB H x W x 3.

    Raises:
        DatasetError: the file cannot be read or decoded, naming it.
    """
    try:
        data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"cannot read mask {path}: {err.strerror or err}") from err
    mask = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if mask is None:
        raise DatasetError(f"corrupt, truncated or unsupported mask file: {path}")
    if mask.dtype != np.uint8:
        raise DatasetError(f"colour mask must be 8-bit, got {mask.dtype}: {path}")
    return cv2.cvtColor(mask, cv2.COLOR_BGR2RGB)

"""Which split each converted image goes to.

Rule (data/README.md, "Your own annotations"): an input per split (``input={train: ...,
val: ...}``) keeps its split. One input is split by fraction: its images, sorted by output
name, are shuffled with ``numpy.random.default_rng(seed)``; the first
``round(N x val_fraction)`` (at least 1, at most N - 1) go to ``val``, the others to
``train``. The split depends on the names, ``val_fraction`` and ``seed`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from seg.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test")
T = TypeVar("T")


def split_by_fraction(
    items: Sequence[T], names: Sequence[str], val_fraction: float, seed: int
) -> dict[str, list[T]]:
    """``{"train": [...], "val": [...]}`` of ``items`` (``names[i]`` names ``items[i]``),
    each list in name order.

    Raises:
        ConfigError: ``val_fraction`` outside (0, 1).
        DatasetError: fewer than 2 items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if len(items) < 2:
        raise DatasetError(
            f"{len(items)} image(s): too few to split into train and val "
            "(give input={train: PATH, val: PATH} instead)"
        )
    order = sorted(range(len(items)), key=lambda i: names[i])
    shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_val = min(max(round(len(items) * val_fraction), 1), len(items) - 1)
    val = set(shuffled[:n_val])
    return {
        "train": [items[i] for i in order if i not in val],
        "val": [items[i] for i in order if i in val],
    }

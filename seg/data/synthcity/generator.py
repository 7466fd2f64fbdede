"""SynthCity on disk: every split written in the Cityscapes layout, atomically.

Determinism: image ``i`` of split ``s`` is drawn from ``default_rng([seed, split code, i])``
only, so the bytes depend on the parameters alone (not on generation order).

Writing: :func:`generate_synthcity` writes into a temporary sibling folder and renames it
to ``root`` when complete, with ``synthcity.json`` (the parameters) inside; a half-written
dataset is never at ``root``. :func:`ensure_synthcity` holds an exclusive lock file
(``.<root name>.lock`` beside ``root``) while it checks and generates, so several DDP ranks
on one machine may call it at once: one generates, the others wait and reuse the result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from seg.data.cityscapes import IMAGE_SUFFIX, LABEL_IDS_SUFFIX
from seg.data.synthcity.painter import render_scene
from seg.data.synthcity.params import SynthCityParams
from seg.errors import DatasetError
from seg.fileio import exclusive_lock, write_png

MARKER = "synthcity.json"
FORMAT_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CITIES = {"train": ("anvil", "brook", "cedar", "dune"), "val": ("ember",), "test": ("fjord",)}


def split_sizes(params: SynthCityParams) -> dict[str, int]:
    return {"train": params.num_train, "val": params.num_val, "test": params.num_test}


def iter_split(
    params: SynthCityParams, split: str
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Yield ``(city, base name, image, label ids)`` for every image of ``split``."""
    cities = CITIES[split]
    for index in range(split_sizes(params)[split]):
        rng = np.random.default_rng([params.seed, SPLIT_CODES[split], index])
        image, label = render_scene(params, rng)
        city = cities[index % len(cities)]
        yield city, f"{city}_{index // len(cities):06d}_000019", image, label


def write_dataset(folder: Path, params: SynthCityParams) -> dict[str, float]:
    """Write every split into ``folder`` (Cityscapes layout) plus the marker; return timings."""
    start = time.perf_counter()
    total = 0
    for split in SPLIT_CODES:
        if split_sizes(params)[split] == 0:
            continue
        for city, base, image, label in iter_split(params, split):
            image_dir = folder / "leftImg8bit" / split / city
            label_dir = folder / "gtFine" / split / city
            write_png(image_dir / f"{base}{IMAGE_SUFFIX}", image[..., ::-1])  # RGB -> BGR
            write_png(label_dir / f"{base}{LABEL_IDS_SUFFIX}", label)
            total += 1
    seconds = time.perf_counter() - start
    marker = {"format_version": FORMAT_VERSION, "params": params.as_json(), "images": total}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return {"images": total, "seconds": seconds, "images_per_s": total / max(seconds, 1e-9)}


def read_marker(root: Path) -> dict | None:
    """The marker of a complete dataset at ``root``, or None when there is none."""
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"unreadable SynthCity marker {marker}: {err}") from err


def _check_marker(root: Path, marker: dict, params: SynthCityParams) -> None:
    stored = marker.get("params", {})
    wanted = params.as_json()
    differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if marker.get("format_version") != FORMAT_VERSION or differ:
        what = ", ".join(differ) if differ else "format version"
        raise DatasetError(
            f"{root} holds SynthCity made with other parameters ({what}); delete it or set "
            f"dataset.root to another folder"
        )


def generate_synthcity(root: str | Path, params: SynthCityParams, force: bool = False) -> dict:
    """Generate SynthCity at ``root`` atomically (temp folder + rename) under the lock.

    Returns the timing dict of :func:`write_dataset` (``images``, ``seconds``,
    ``images_per_s``), or ``{"images": 0}`` when a matching dataset already existed.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root.parent / f".{root.name}.lock"):
        marker = read_marker(root)
        if marker is not None and not force:
            _check_marker(root, marker, params)
            return {"images": 0}
        if root.exists() and marker is None:
            raise DatasetError(
                f"{root} exists but is not a complete SynthCity dataset (no {MARKER}); "
                f"delete it or set dataset.root to another folder"
            )
        # Holding the lock, any leftover temp folder is from an interrupted run.
        for stale in root.parent.glob(f".{root.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            stats = write_dataset(tmp, params)
            if force and root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return stats


def ensure_synthcity(root: str | Path, params: SynthCityParams) -> Path:
    """Return ``root`` holding SynthCity made with ``params``, generating it if absent."""
    root = Path(root)
    marker = read_marker(root)
    if marker is not None:
        _check_marker(root, marker, params)
        return root
    generate_synthcity(root, params)
    return root

"""``SynthCityDataset``: the Cityscapes dataset class over SynthCity, made on first use."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from seg.data.cityscapes import CityscapesDataset
from seg.data.synthcity.generator import ensure_synthcity, read_marker
from seg.data.synthcity.params import SynthCityParams
from seg.errors import DatasetError


class SynthCityDataset(CityscapesDataset):
    """A ``CityscapesDataset`` over SynthCity that generates the data on first use.

    Args:
        root: dataset folder (default ``data/synthcity``; relative to the working directory).
        split: ``train``, ``val`` or ``test``.
        transform: albumentations pipeline or None.
        generator: :class:`SynthCityParams` fields (from ``dataset.generator`` in config).
        generate: False raises ``DatasetError`` instead of generating a missing dataset.
        strict, cache, cache_build: as :class:`~seg.data.cityscapes.CityscapesDataset`.
    """

    def __init__(
        self,
        root: str | Path = "data/synthcity",
        split: str = "train",
        transform=None,
        generator: Mapping | None = None,
        generate: bool = True,
        strict: bool = True,
        cache: str | Path | None = None,
        cache_build: bool = True,
    ) -> None:
        params = SynthCityParams.from_mapping(generator)
        self.params = params
        if generate:
            ensure_synthcity(root, params)
        elif read_marker(Path(root)) is None:
            raise DatasetError(
                f"no SynthCity dataset at {Path(root).resolve()} (run tools/make_synthcity.py)"
            )
        super().__init__(
            root,
            split,
            transform=transform,
            label_type="labelIds",
            strict=strict,
            cache=cache,
            cache_build=cache_build,
        )

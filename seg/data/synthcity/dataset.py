"""``SynthCityDataset``: the Cityscapes dataset class over SynthCity.

Generating the data is an explicit step: ``tools/make_synthcity.py``, or training, whose
``dataset.train`` node says ``generate: true`` (configs/dataset/synthcity.yaml) so that a
fresh machine trains with no set-up. Everything else (evaluation, the dataset check, the
configs stored in checkpoints, whose ``dataset.val`` has no ``generate``) only reads, and a
missing root is a ``DatasetError`` saying how to make it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from seg.data.cityscapes import CityscapesDataset
from seg.data.synthcity.generator import MARKER, ensure_synthcity, read_marker
from seg.data.synthcity.params import SynthCityParams
from seg.errors import DatasetError


class SynthCityDataset(CityscapesDataset):
    """A ``CityscapesDataset`` over SynthCity, generated at ``root`` first when asked.

    Args:
        root: dataset folder (default ``data/synthcity``; relative to the working directory).
        split: ``train``, ``val`` or ``test``.
        transform: albumentations pipeline or None.
        generator: :class:`SynthCityParams` fields (from ``dataset.generator`` in config).
        generate: True generates a missing dataset (training's first use); False (the
            default) raises ``DatasetError`` naming the root and the command that makes it.
        strict, cache, cache_build, train_id_map: as
            :class:`~seg.data.cityscapes.CityscapesDataset`.
    """

    def __init__(
        self,
        root: str | Path = "data/synthcity",
        split: str = "train",
        transform=None,
        generator: Mapping | None = None,
        generate: bool = False,
        strict: bool = True,
        cache: str | Path | None = None,
        cache_build: bool = True,
        train_id_map: Mapping[int, int] | None = None,
    ) -> None:
        params = SynthCityParams.from_mapping(generator)
        self.params = params
        if not generate and read_marker(Path(root)) is None:
            raise DatasetError(missing_message(Path(root)))
        ensure_synthcity(root, params)  # checks the recorded parameters; generates if absent
        super().__init__(
            root,
            split,
            transform=transform,
            label_type="labelIds",
            strict=strict,
            cache=cache,
            cache_build=cache_build,
            train_id_map=train_id_map,
        )


def missing_message(root: Path) -> str:
    """One line: no SynthCity at ``root``, and how to make it."""
    what = "is not a complete SynthCity dataset" if root.exists() else "does not exist"
    return (
        f"SynthCity root {root.resolve()} {what} (no {MARKER}): generate it with "
        f"`python tools/make_synthcity.py dataset.root={root}` (and your dataset.generator.* "
        "values), or let training make it on first use; set dataset.root=PATH to use another copy"
    )

"""SynthCity: procedurally drawn street scenes in the exact Cityscapes layout and label ids.

- ``params``: :class:`SynthCityParams`, the size, counts, seed and difficulty knobs;
- ``painter``: :func:`render_scene`, one scene's image and label ids, drawn with
  ``canvas`` (camera, colours, primitives), ``street``, ``objects`` and ``finish``;
- ``generator``: :func:`generate_synthcity` / :func:`ensure_synthcity`, the dataset on disk;
- ``dataset``: :class:`SynthCityDataset`, the training/evaluation dataset (configs name it
  ``seg.data.synthcity.SynthCityDataset``, as checkpoints' stored configs do).
"""

from seg.data.synthcity.dataset import SynthCityDataset
from seg.data.synthcity.generator import (
    MARKER,
    ensure_synthcity,
    generate_synthcity,
    iter_split,
    read_marker,
    write_dataset,
)
from seg.data.synthcity.painter import render_scene
from seg.data.synthcity.params import SynthCityParams

__all__ = [
    "MARKER",
    "SynthCityDataset",
    "SynthCityParams",
    "ensure_synthcity",
    "generate_synthcity",
    "iter_split",
    "read_marker",
    "render_scene",
    "write_dataset",
]

"""The dataset config a conversion writes: a folder dataset that trains as it is.

The text mirrors ``configs/dataset/folder_example.yaml``: ``train``/``val`` nodes of
``seg.data.folder.FolderDataset`` over ``${dataset.root}/images/<split>`` and
``${dataset.root}/masks/<split>``; the masks already hold train ids, so ``id_to_trainid``
and ``color_to_trainid`` are null. ``mean``/``std`` are those of the converted train
images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

#: The first line of every config this module writes: a config without it is never
#: replaced by a conversion, whatever ``force`` says.
MARKER = "# Written by tools/convert_annotations.py"


def _flow(values: Sequence[object]) -> str:
    """A YAML flow list (JSON is YAML): ``["a", "b"]``, ``[0.5, 0.25]``."""
    return json.dumps(list(values))


def dataset_config_text(
    name: str,
    root: str,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    mean: Sequence[float],
    std: Sequence[float],
    crop_size: Sequence[int],
    origin: str,
) -> str:
    """YAML of the dataset config ``name`` for the converted data at ``root``."""
    palette_rows = "\n".join(
        f"  - {_flow(list(colour))}  # {json.dumps(class_name)}"
        for colour, class_name in zip(palette, class_names, strict=True)
    )
    node = """\
  _target_: seg.data.folder.FolderDataset
  image_dir: ${{dataset.root}}/images/{split}
  mask_dir: ${{dataset.root}}/masks/{split}
  class_names: ${{dataset.class_names}}
  palette: ${{dataset.palette}}
  id_to_trainid: ${{dataset.id_to_trainid}}
  color_to_trainid: ${{dataset.color_to_trainid}}
  cache: ${{dataset.cache}}
  cache_build: ${{dataset.cache_build}}"""
    return f"""{MARKER} from {origin}.
# Images and single-channel train-id masks (255 = ignore) under root, one folder per split:
#   <root>/images/<split>/<name>.<ext>   <root>/masks/<split>/<name>.png
# Use it with dataset={name} (data/README.md, "Your own annotations").
name: {name}
root: {json.dumps(root)}  # relative paths resolve against the working directory
num_classes: {len(class_names)}
ignore_index: 255
class_names: {_flow(class_names)}
palette:  # RGB per train id (visualisation only)
{palette_rows}
mean: {_flow(mean)}  # RGB, 0-1 scale: the converted train images
std: {_flow(std)}
crop_size: {_flow(crop_size)}  # [h, w]
scale_range: [0.5, 2.0]
split: val
cache: null
cache_build: true
id_to_trainid: null  # the masks hold train ids
color_to_trainid: null
train:
{node.format(split="train")}
  transform:
    _target_: seg.data.transforms.build_train_transform
    crop_size: ${{dataset.crop_size}}
    scale_range: ${{dataset.scale_range}}
    ignore_index: ${{dataset.ignore_index}}
val:
{node.format(split="${dataset.split}")}
  transform:
    _target_: seg.data.transforms.build_eval_transform
    resize: null
"""

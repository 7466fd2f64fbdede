"""Users' own annotations (labelme, COCO, colour masks) -> a folder dataset.

``convert_annotations(ConversionSettings(...))`` writes images, single-channel train-id
masks and a dataset config that ``seg.data.folder.FolderDataset`` reads;
``tools/convert_annotations.py`` is its command line. One module per format
(``labelme.py``, ``coco.py``, ``color.py``) reads into :class:`AnnotatedImage` items;
``classes.py`` (class list), ``splits.py`` (split rule), ``writer.py`` (all-or-nothing
output) and ``dataset_config.py`` are shared; ``convert.py`` orders the steps.
"""

from seg.data.annotations.convert import ConversionResult, convert, convert_annotations
from seg.data.annotations.items import AnnotatedImage
from seg.data.annotations.settings import ConversionSettings, Source

__all__ = [
    "AnnotatedImage",
    "ConversionResult",
    "ConversionSettings",
    "Source",
    "convert",
    "convert_annotations",
]

"""Users' annotations -> a folder dataset: the order of the steps.

1. read and check every input (``labelme.py``, ``coco.py``, ``color.py``): a malformed
   file is one error line before anything is written;
2. resolve the class list (``classes.py``) and check every label against it;
3. assign splits (``splits.py``);
4. write images, masks, the dataset config and ``conversion.json`` into a temporary
   folder and rename it to ``out`` (``writer.py``): all or nothing;
5. with ``write_config=true``, also write ``configs/dataset/<name>.yaml``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from seg.cli import CONFIG_DIR
from seg.data.annotations.classes import ClassMap, default_palette, resolve_classes
from seg.data.annotations.coco import CocoFile, merge_categories, read_coco_file
from seg.data.annotations.color import read_color_folder
from seg.data.annotations.dataset_config import MARKER, dataset_config_text
from seg.data.annotations.items import AnnotatedImage
from seg.data.annotations.labelme import found_labels, read_labelme_folder
from seg.data.annotations.settings import ConversionSettings, Source
from seg.data.annotations.splits import SPLITS, split_by_fraction
from seg.data.annotations.writer import DatasetWriter, SplitStats
from seg.data.colors import ColorTable
from seg.errors import ConfigError
from seg.fileio import write_text_atomic


@dataclass
class ConversionResult:
    """What a conversion wrote."""

    out: Path
    name: str
    class_names: list[str]
    stats: dict[str, SplitStats]
    config_files: list[Path]  # the copy in out, then configs/dataset/<name>.yaml if written
    skipped_shapes: Counter = field(default_factory=Counter)

    def next_commands(self) -> list[str]:
        """The commands that check and train on the converted data."""
        extra = "" if len(self.config_files) > 1 else f" 'hydra.searchpath=[file://{self.out}]'"
        return [
            f"python tools/check_dataset.py dataset={self.name}{extra}",
            f"python tools/train.py dataset={self.name}{extra}",
        ]

    def describe(self) -> str:
        """A few lines for the console: what was written and what to run next."""
        counts = " + ".join(f"{s.images} {split}" for split, s in self.stats.items())
        lines = [
            f"wrote {self.out}: {counts} images, {len(self.class_names)} classes "
            f"({', '.join(self.class_names)})",
            *[f"dataset config: {p}" for p in self.config_files],
        ]
        if self.skipped_shapes:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped_shapes.items()))
            total = sum(self.skipped_shapes.values())
            lines.append(f"warning: skipped {total} shape(s) without an area ({kinds})")
        for split, s in self.stats.items():
            absent = [n for k, n in enumerate(self.class_names) if s.class_pixels[k] == 0]
            if absent:
                lines.append(f"note: {split} has no pixel of {', '.join(absent)}")
        lines += ["next:", *[f"  {c}" for c in self.next_commands()]]
        return "\n".join(lines)


def _read_source(
    settings: ConversionSettings, source: Source, table: ColorTable | None, skipped: Counter
) -> tuple[list[AnnotatedImage], CocoFile | None]:
    if settings.format == "labelme":
        return list(read_labelme_folder(source.input, skipped)), None
    if settings.format == "coco":
        coco = read_coco_file(source.input, source.images, settings.crowd)
        return list(coco.images), coco
    assert table is not None
    return list(read_color_folder(source.input, source.images, table)), None


def _class_map(
    settings: ConversionSettings,
    read: Sequence[tuple[Source, list[AnnotatedImage], CocoFile | None]],
) -> ClassMap:
    if settings.format == "color":
        assert settings.classes is not None
        return ClassMap(settings.classes, 255, "error")  # the colour table holds every id
    if settings.format == "coco":
        found = merge_categories([(s.input, c) for s, _, c in read if c is not None])
    else:
        found = found_labels([item for _, items, _ in read for item in items])
    classes = resolve_classes(found, settings.classes, settings.unlabelled, settings.unknown_labels)
    classes.check(
        (label, item.source) for _, items, _ in read for item in items for label in item.labels()
    )
    return classes


def _config_target(settings: ConversionSettings, config_dir: Path) -> Path | None:
    """``configs/dataset/<name>.yaml`` when asked for, checked before anything is written."""
    if not settings.write_config:
        return None
    target = config_dir / "dataset" / f"{settings.name}.yaml"
    if target.exists():
        try:
            ours = target.read_text(encoding="utf-8").startswith(MARKER)
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(
                f"{target} exists and was not written by this tool: choose another name=NAME"
            )
        if not settings.force:
            raise ConfigError(f"{target} exists (force=true replaces it)")
    return target


def _origin(settings: ConversionSettings) -> str:
    inputs = ", ".join(
        f"{s.split or 'split by val_fraction'}: {s.input}"
        + (f" (images {s.images})" if s.images else "")
        for s in settings.sources
    )
    return f"format={settings.format} input {inputs}"


def _manifest(settings: ConversionSettings, result: ConversionResult) -> str:
    record: dict[str, Any] = {
        "format": settings.format,
        "inputs": [
            {
                "split": s.split,
                "input": str(s.input),
                "images": None if s.images is None else str(s.images),
            }
            for s in settings.sources
        ],
        "split_rule": (
            {"val_fraction": settings.val_fraction, "seed": settings.seed}
            if settings.split_by_fraction
            else "one input per split"
        ),
        "class_names": result.class_names,
        "unlabelled": settings.unlabelled if settings.format != "color" else None,
        "unknown_labels": settings.unknown_labels if settings.format != "color" else None,
        "crowd": settings.crowd if settings.format == "coco" else None,
        "skipped_shapes": dict(result.skipped_shapes),
        "splits": {
            split: {
                "images": s.images,
                "class_pixels": {
                    name: int(s.class_pixels[k]) for k, name in enumerate(result.class_names)
                }
                | {"ignore (255)": int(s.class_pixels[255])},
            }
            for split, s in result.stats.items()
        },
    }
    return json.dumps(record, indent=2) + "\n"


def convert_annotations(
    settings: ConversionSettings, config_dir: Path = CONFIG_DIR
) -> ConversionResult:
    """Convert the inputs of ``settings`` into a folder dataset at ``settings.out``.

    Raises:
        ConfigError: a bad setting, an existing output (without force).
        DatasetError: a malformed input file, in one line naming it; nothing is left at
            ``out`` (nor in a temporary folder).
    """
    table = None
    if settings.color_to_trainid is not None:
        assert settings.classes is not None
        table = ColorTable(settings.color_to_trainid, len(settings.classes))
    config_target = _config_target(settings, config_dir)
    skipped: Counter = Counter()
    read = [(s, *_read_source(settings, s, table, skipped)) for s in settings.sources]
    classes = _class_map(settings, read)
    if settings.split_by_fraction:
        items = read[0][1]
        splits = split_by_fraction(
            items, [i.name for i in items], settings.val_fraction, settings.seed
        )
    else:
        splits = {s.split: items for s, items, _ in read if s.split is not None}

    names = list(classes.names)
    if table is not None:
        generated = default_palette(len(names), background_first=False)
        palette = [c or generated[k] for k, c in enumerate(table.palette(len(names)))]
    else:
        palette = default_palette(len(names), background_first=classes.fill == 0)

    with DatasetWriter(settings.out, force=settings.force, link=settings.link) as writer:
        for split in SPLITS:
            for item in splits.get(split, []):
                writer.write(split, item, classes)
        mean, std = writer.stats["train"].mean_std()
        text = dataset_config_text(
            settings.name,
            str(settings.out),
            names,
            palette,
            mean,
            std,
            settings.crop_size or writer.stats["train"].default_crop(),
            _origin(settings),
        )
        copy = writer.write_text(f"dataset/{settings.name}.yaml", text)
        result = ConversionResult(settings.out, settings.name, names, writer.stats, [copy], skipped)
        writer.write_text("conversion.json", _manifest(settings, result))
        writer.commit()
    if config_target is not None:
        write_text_atomic(config_target, text)
        result.config_files.append(config_target)
    return result


def convert(cfg: DictConfig) -> int:
    """``tools/convert_annotations.py``'s work (configs/convert_annotations.yaml)."""
    options = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(options, dict)
    result = convert_annotations(ConversionSettings.from_config(options))
    print(result.describe())
    return 0

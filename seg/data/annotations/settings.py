"""The conversion's settings (configs/convert_annotations.yaml), checked once.

Every value a user types becomes a typed field here or one ``ConfigError`` line naming
the key; nothing below reads the raw config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seg.data.annotations.classes import UNKNOWN_CHOICES, UNLABELLED_CHOICES
from seg.data.annotations.coco import CROWD_CHOICES
from seg.data.annotations.splits import SPLITS
from seg.errors import ConfigError
from seg.values import bool_setting, float_setting, int_setting, pair_setting

FORMATS = ("labelme", "coco", "color")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Source:
    """One input: for a split (``split``), or to be split by fraction (``split`` None)."""

    split: str | None
    input: Path  # labelme: JSON folder; coco: the JSON file; color: the mask folder
    images: Path | None  # coco: file_name's folder; color: the image folder


@dataclass(frozen=True)
class ConversionSettings:
    """What ``convert_annotations`` does; see configs/convert_annotations.yaml."""

    format: str
    sources: tuple[Source, ...]
    out: Path
    name: str
    classes: tuple[str, ...] | None = None
    unknown_labels: str = "error"
    unlabelled: str = "background"
    crowd: str = "category"
    color_to_trainid: tuple[tuple[int, ...], ...] | None = None
    val_fraction: float = 0.2
    seed: int = 0
    link: bool = True
    force: bool = False
    write_config: bool = False
    crop_size: tuple[int, int] | None = None  # None: from the train images' sizes

    @property
    def split_by_fraction(self) -> bool:
        return len(self.sources) == 1 and self.sources[0].split is None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ConversionSettings:
        """Check and type a plain (resolved) config mapping."""
        fmt = _choice(cfg.get("format"), "format", FORMATS)
        out = _path(cfg.get("out"), "out")
        name = cfg.get("name") or out.name
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(
                f"name must be letters, digits, '_' or '-' (a config file name), got {name!r}"
            )
        classes = cfg.get("classes")
        if classes is not None:
            if isinstance(classes, str) or not isinstance(classes, Sequence) or not classes:
                raise ConfigError(f"classes must be a non-empty list of names, got {classes!r}")
            classes = tuple(str(c) for c in classes)
        rows = cfg.get("color_to_trainid")
        if fmt == "color":
            if classes is None:
                raise ConfigError("format=color needs classes=[...] (one name per train id)")
            if rows is None:
                raise ConfigError("format=color needs color_to_trainid=[[R,G,B,train id],...]")
        elif rows is not None:
            raise ConfigError(f"color_to_trainid is for format=color, not format={fmt}")
        if fmt == "labelme" and cfg.get("images") is not None:
            raise ConfigError(
                "images= is not used by format=labelme (each JSON's imagePath names its image)"
            )
        crop = pair_setting(cfg.get("crop_size"), "crop_size")
        return cls(
            format=fmt,
            sources=_sources(cfg.get("input"), cfg.get("images")),
            out=out,
            name=name,
            classes=classes,
            unknown_labels=_choice(
                cfg.get("unknown_labels", "error"), "unknown_labels", UNKNOWN_CHOICES
            ),
            unlabelled=_choice(
                cfg.get("unlabelled", "background"), "unlabelled", UNLABELLED_CHOICES
            ),
            crowd=_choice(cfg.get("crowd", "category"), "crowd", CROWD_CHOICES),
            color_to_trainid=None if rows is None else tuple(tuple(r) for r in _rows(rows)),
            val_fraction=float_setting(cfg.get("val_fraction", 0.2), "val_fraction"),
            seed=int_setting(cfg.get("seed", 0), "seed"),
            link=bool_setting(cfg.get("link", True), "link"),
            force=bool_setting(cfg.get("force", False), "force"),
            write_config=bool_setting(cfg.get("write_config", False), "write_config"),
            crop_size=crop,
        )


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _path(value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path, got {value!r}")
    return Path(value)


def _rows(rows: Any) -> list[Sequence[Any]]:
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise ConfigError(
            f"color_to_trainid must be a list of [R, G, B, train id] rows, got {rows!r}"
        )
    return [r if isinstance(r, Sequence) and not isinstance(r, str) else [r] for r in rows]


def _sources(inputs: Any, images: Any) -> tuple[Source, ...]:
    """``input`` (and ``images``): one path each, or one per split."""
    if isinstance(inputs, Mapping):
        unknown = sorted(set(inputs) - set(SPLITS))
        if unknown:
            raise ConfigError(f"input has split {unknown[0]!r}; splits are {', '.join(SPLITS)}")
        if not {"train", "val"} <= set(inputs):
            raise ConfigError("input={...} needs a train and a val entry (test is optional)")
        if isinstance(images, Mapping) and set(images) != set(inputs):
            raise ConfigError(
                f"images={{...}} must name the same splits as input ({', '.join(inputs)})"
            )
        return tuple(
            Source(
                split,
                _path(inputs[split], f"input.{split}"),
                _images(
                    images[split] if isinstance(images, Mapping) else images, f"images.{split}"
                ),
            )
            for split in SPLITS
            if split in inputs
        )
    if isinstance(images, Mapping):
        raise ConfigError("images={...} per split needs input={...} per split too")
    return (Source(None, _path(inputs, "input"), _images(images, "images")),)


def _images(value: Any, key: str) -> Path | None:
    return None if value is None else _path(value, key)

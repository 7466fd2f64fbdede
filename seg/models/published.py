"""Write a seg checkpoint from a published BiSeNetV2 file (CoinCheung/BiSeNet, mmsegmentation).

The checkpoint is what ``tools/eval.py``, ``tools/predict.py``, ``tools/export.py`` and
``model.weights=`` read: a dict with

- ``model``: the state dict in seg's names, checked by a strict load into the model the
  config describes (every key and shape);
- ``config``: plain containers with the sections those tools read: ``model``
  (``_target_`` BiSeNetV2, ``num_classes`` from the checkpoint, the BGA settings that
  reproduce the source), ``dataset`` (name, classes, ignore index, class names, palette,
  the normalisation the source was trained with, and the ``val`` dataset node), ``eval``
  (``configs/eval/whole.yaml``), ``loader``, and ``source`` (what was converted). They are
  composed from ``configs/train.yaml`` with Hydra and resolved, as the trainer stores them.

Dataset configs (``dataset_config``): ``cityscapes`` composes
``configs/dataset/cityscapes.yaml``; ``folder`` composes ``configs/dataset/folder_example.yaml``
(a folder of images and masks) with the class count of the checkpoint. ``auto`` picks
``cityscapes`` for 19 classes, else ``folder``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seg.checkpoint import save_checkpoint
from seg.errors import CheckpointError, ConfigError
from seg.models.bisenetv2 import BiSeNetV2
from seg.models.convert import Conversion, convert_state_dict
from seg.models.weights import load_into, read_weights_file, state_dict_of
from seg.visualize import generated_palette

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DATASET_CONFIGS = ("auto", "cityscapes", "folder")
#: Dataset names by class count, for the folder dataset node (both projects publish these).
DATASET_NAMES = {19: "cityscapes", 150: "ade20k", 171: "cocostuff"}
#: CoinCheung/BiSeNet's normalisation per dataset (lib/data/*.py: RGB, 0-1 scale).
COINCHEUNG_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cityscapes": ((0.3257, 0.3690, 0.3223), (0.2112, 0.2148, 0.2115)),
    "ade20k": ((0.49343230, 0.46819794, 0.43106043), (0.25680755, 0.25506608, 0.27422913)),
    "cocostuff": ((0.46962251, 0.4464104, 0.40718787), (0.27469736, 0.27012361, 0.28515933)),
}
#: mmsegmentation's normalisation in all its BiSeNetV2 configs: mean (123.675, 116.28,
#: 103.53) and std (58.395, 57.12, 57.375) on the 0-255 scale after BGR -> RGB, i.e. the
#: ImageNet statistics, here on seg's RGB 0-1 scale.
MMSEG_NORMALISATION = (
    tuple(v / 255.0 for v in (123.675, 116.28, 103.53)),
    tuple(v / 255.0 for v in (58.395, 57.12, 57.375)),
)


@dataclass
class ConvertSummary:
    """What :func:`convert_checkpoint` read and wrote."""

    src: Path
    out: Path
    conversion: Conversion
    config: dict[str, Any]

    def describe(self) -> str:
        conv, model, dataset = self.conversion, self.config["model"], self.config["dataset"]
        lines = [
            f"converted {len(conv.mapped)} tensors of {self.src} ({conv.source_format} layout)",
            f"model: {model['num_classes']} classes, auxiliary heads "
            f"{'kept' if model['aux_heads'] else 'absent'}, bga_upsample={model['bga_upsample']}, "
            f"bga_pointwise_bias={str(model['bga_pointwise_bias']).lower()}",
            f"dataset: {dataset['name']}, mean {dataset['mean']}, std {dataset['std']}",
        ]
        if conv.dropped:
            reasons = sorted({why for _, why in conv.dropped})
            lines.append(f"dropped {len(conv.dropped)} tensors: {'; '.join(reasons)}")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def source_normalisation(conversion: Conversion, dataset_name: str) -> tuple[list, list] | None:
    """The RGB 0-1 mean and std the source was trained with; None where unknown."""
    if conversion.source_format == "mmseg":
        mean, std = MMSEG_NORMALISATION
    elif dataset_name in COINCHEUNG_NORMALISATION:
        mean, std = COINCHEUNG_NORMALISATION[dataset_name]
    else:
        return None
    return [float(v) for v in mean], [float(v) for v in std]


def _compose_train(overrides: Sequence[str]) -> Any:
    """Compose ``configs/train.yaml`` with ``overrides``.

    Inside a running Hydra app (``tools/convert_weights.py``, whose search path is
    ``configs/``) the app's Hydra is used; elsewhere ``configs/`` is initialised here.
    """
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name="train", overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"cannot compose the checkpoint's config {list(overrides)}: {first}"
        ) from None


def _three_floats(value: Sequence[float], key: str) -> list[float]:
    try:
        floats = [float(v) for v in value]
    except (TypeError, ValueError):
        floats = []
    if len(floats) != 3 or (key == "std" and min(floats) <= 0):
        raise ConfigError(
            f"{key} must be 3 numbers (RGB, 0-1 scale{', > 0' if key == 'std' else ''}), got {value!r}"
        )
    return floats


def build_config(
    conversion: Conversion,
    *,
    dataset_config: str = "auto",
    dataset_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The resolved ``config`` of the converted checkpoint (see the module docstring).

    Raises:
        ConfigError: an unknown ``dataset_config``, a dataset whose class count differs
            from the checkpoint's, class names of the wrong count, bad mean/std, or a source
            whose normalisation is unknown and not given.
    """
    if dataset_config not in DATASET_CONFIGS:
        raise ConfigError(
            f"dataset_config must be one of {list(DATASET_CONFIGS)}, got {dataset_config!r}"
        )
    num_classes = conversion.num_classes
    dataset = dataset_config
    if dataset == "auto":
        dataset = "cityscapes" if num_classes == 19 else "folder"
    if dataset == "cityscapes" and num_classes != 19:
        raise ConfigError(
            f"dataset_config=cityscapes has 19 classes, the checkpoint predicts {num_classes}"
        )
    settings = conversion.model_settings()
    overrides = [
        f"dataset={'cityscapes' if dataset == 'cityscapes' else 'folder_example'}",
        f"model.aux_heads={str(settings['aux_heads']).lower()}",
        f"model.bga_upsample={settings['bga_upsample']}",
        f"model.bga_pointwise_bias={str(settings['bga_pointwise_bias']).lower()}",
    ]
    cfg = _compose_train(overrides)
    dataset_name = dataset_name or (
        "cityscapes" if dataset == "cityscapes" else DATASET_NAMES.get(num_classes, "custom")
    )
    node = cfg.dataset
    node.name = dataset_name
    if dataset == "folder":
        node.root = f"data/{dataset_name}"
        node.num_classes = num_classes
        node.class_names = [f"class_{i}" for i in range(num_classes)]
        node.palette = generated_palette(num_classes)
        # ADE20K masks hold 0 for "other" and 1..150 for the classes (both sources train so).
        node.id_to_trainid = (
            {0: 255, **{i: i - 1 for i in range(1, 151)}} if dataset_name == "ade20k" else None
        )
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ConfigError(
                f"class_names has {len(class_names)} names, the checkpoint predicts {num_classes} classes"
            )
        node.class_names = [str(n) for n in class_names]
    known = source_normalisation(conversion, dataset_name)
    if (mean is None or std is None) and known is None:
        raise ConfigError(
            f"the normalisation a {conversion.source_format} model with {num_classes} classes "
            f"({dataset_name}) was trained with is not known: pass mean=[r,g,b] std=[r,g,b] (0-1 scale)"
        )
    node.mean = _three_floats(mean, "mean") if mean is not None else known[0]
    node.std = _three_floats(std, "std") if std is not None else known[1]
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the checkpoint's config: {error}") from None
    assert isinstance(resolved, dict)
    config = {key: resolved[key] for key in ("model", "dataset", "eval", "loader")}
    config["source"] = {
        "format": conversion.source_format,
        "file": source,
        "tensors_mapped": len(conversion.mapped),
        "tensors_dropped": len(conversion.dropped),
        "dropped_reasons": sorted({why for _, why in conversion.dropped}),
    }
    return config


def convert_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    source_format: str = "auto",
    dataset_config: str = "auto",
    dataset_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> ConvertSummary:
    """Convert the published BiSeNetV2 file ``src`` into the seg checkpoint ``out``.

    ``src`` is read without running code in it; ``out`` is written atomically, and only
    after every key has been mapped (or dropped with a reason) and loaded strictly.

    Raises:
        CheckpointError: ``src`` is unreadable, not a state dict, or not a BiSeNetV2 of a
            known layout.
        ConfigError: a bad setting, or ``out`` cannot be written (nothing is left behind).
    """
    src, out = Path(src), Path(out)
    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"out={out} is the source file itself: choose another path")
    if source_format not in ("auto", "coincheung", "mmseg"):
        raise ConfigError(f"format must be auto, coincheung or mmseg, got {source_format!r}")
    payload = read_weights_file(src)
    if {"detail", "segment"} <= set(payload) and "head.conv.conv.weight" not in payload:
        raise CheckpointError(
            f"{src} is a backbone file (detail and segment branches only): load it with "
            f"model.backbone_weights={src} for training, it has no head to evaluate"
        )
    conversion = convert_state_dict(state_dict_of(payload, src), source_format, str(src))
    model = BiSeNetV2(**conversion.model_settings())
    load_into(model, conversion.state, src, strict=True)  # every key and shape checked
    config = build_config(
        conversion,
        dataset_config=dataset_config,
        dataset_name=dataset_name,
        mean=mean,
        std=std,
        class_names=class_names,
        source=src.name,
    )
    # An unwritable out= is one CheckpointError line naming the file and the reason.
    save_checkpoint(out, {"model": model.state_dict(), "config": config})
    return ConvertSummary(src=src, out=out, conversion=conversion, config=config)

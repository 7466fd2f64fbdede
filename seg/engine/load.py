"""From a checkpoint file to a model ready for inference: the one loader of eval, predict
and export.

The model is built from the checkpoint's config (``config["model"]``), through the
allow-list of ``seg.instantiate`` (every ``_target_`` of the stored config is checked first,
so that a checkpoint cannot make the loader import or call anything else), without its
auxiliary heads and without pretrained-weight files (the checkpoint holds every weight),
its weights are loaded strictly (aux-head entries dropped), and it is put in eval mode.
A checkpoint of a run with ``trainer.ema`` on holds the moving average of the weights
(``"ema"``); those are the weights its evaluations scored, and they are loaded instead of
the raw ones unless ``ema=False``.
The dataset facts a user of the model needs (class count and names, palette, the RGB
normalisation) come from ``config["dataset"]`` and are checked here, once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg import dist
from seg.checkpoint import load_checkpoint
from seg.errors import CheckpointError
from seg.instantiate import build_from_checkpoint, check_targets
from seg.models.inference_model import InferenceModel
from seg.models.onnx_model import load_onnx_inference_model
from seg.models.weights import WEIGHT_FILE_ARGUMENTS, load_into
from seg.values import int_setting
from seg.visualize import generated_palette, palette_array

#: Keys that make ``hydra.utils.instantiate`` build something else than ``_target_(**node)``.
HYDRA_DIRECTIVES = ("_partial_", "_args_", "_recursive_", "_convert_")


def dataset_info(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """num_classes, mean, std, class_names and palette from ``config["dataset"]``, checked."""
    dataset = config.get("dataset")
    if not isinstance(dataset, Mapping):
        raise CheckpointError(f"checkpoint {path}: config has no 'dataset' section")
    try:
        num_classes = int(dataset["num_classes"])
        mean = [float(v) for v in dataset["mean"]]
        std = [float(v) for v in dataset["std"]]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path}: config.dataset needs num_classes, mean and std ({error!r})"
        ) from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(
            f"checkpoint {path}: config.dataset mean/std must be 3 values (std > 0), "
            f"got {mean} / {std}"
        )
    if not 1 <= num_classes <= 255:
        # Label maps are uint8 PNGs with 255 kept for "ignore".
        raise CheckpointError(
            f"checkpoint {path}: num_classes must lie in 1..255, got {num_classes}"
        )
    names = dataset.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    palette = dataset.get("palette") or generated_palette(num_classes)
    if len(names) != num_classes:
        raise CheckpointError(
            f"checkpoint {path}: config.dataset.class_names has {len(names)} entries "
            f"for {num_classes} classes"
        )
    if len(palette) < num_classes:
        raise CheckpointError(
            f"checkpoint {path}: config.dataset.palette has {len(palette)} colours "
            f"for {num_classes} classes"
        )
    try:
        palette_array(palette)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: config.dataset.palette: {error}") from None
    return {
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "class_names": [str(n) for n in names],
        "palette": [[int(c) for c in rgb] for rgb in palette[:num_classes]],
    }


def check_class_count(config: Mapping[str, Any], path: Path) -> None:
    """One line when the model's class count (``model.num_classes``) is not the dataset's
    (``dataset.num_classes``, e.g. overridden at evaluation), naming both values."""
    model, dataset = config.get("model"), config.get("dataset")
    if not isinstance(model, Mapping) or not isinstance(dataset, Mapping):
        return  # dataset_info and build_inference_model report missing sections
    if model.get("num_classes") is None or dataset.get("num_classes") is None:
        return
    predicted = int_setting(model["num_classes"], "model.num_classes", minimum=1)
    expected = int_setting(dataset["num_classes"], "dataset.num_classes", minimum=1)
    if predicted != expected:
        raise CheckpointError(
            f"checkpoint {path} predicts {predicted} classes but dataset.num_classes is {expected}"
        )


def check_stored_config(config: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose stored config could act when it is used (one line each).

    - every ``_target_`` must be one of seg's own classes (``seg.instantiate``), and no
      other Hydra directive (``_partial_``, ``_args_``, ...) may appear;
    - no string may hold an interpolation (``${...}``): the trainer stores its config
      resolved, and resolving a planted one could read the environment (``oc.env``) into
      reports;
    - the evaluation dataset may not generate data (:func:`check_read_only`).

    Raises:
        ConfigError: a refused ``_target_``.
        CheckpointError: an interpolation or a generating ``dataset.val``.
    """
    check_targets(config, f"from checkpoint {path}")
    directive = find_key(config, HYDRA_DIRECTIVES)
    if directive is not None:
        raise CheckpointError(
            f"checkpoint {path}: config.{directive} is a Hydra directive that seg's configs "
            "never use (refused: it would change what the stored config builds)"
        )
    found = find_interpolation(config)
    if found is not None:
        key, value = found
        raise CheckpointError(
            f"checkpoint {path}: config.{key}={value[:80]!r} is an interpolation; a stored "
            "config is saved resolved, so this one was altered (refused: resolving it could "
            "read the environment)"
        )
    check_read_only(config, path)


def find_key(node: Any, keys: tuple[str, ...], prefix: str = "") -> str | None:
    """The dotted path of the first key of ``node`` (any depth) that is one of ``keys``."""
    items = node.items() if isinstance(node, Mapping) else None
    if items is None and isinstance(node, list | tuple):
        items = enumerate(node)
    for key, value in items or ():
        if key in keys:
            return f"{prefix}{key}"
        found = find_key(value, keys, f"{prefix}{key}.")
        if found is not None:
            return found
    return None


def find_interpolation(node: Any, prefix: str = "") -> tuple[str, str] | None:
    """The first ``(dotted key, string)`` in ``node`` holding ``${``, or None."""
    if isinstance(node, str):
        return (prefix.rstrip("."), node) if "${" in node else None
    items = node.items() if isinstance(node, Mapping) else None
    if items is None and isinstance(node, list | tuple):
        items = enumerate(node)
    for key, value in items or ():
        if isinstance(key, str) and "${" in key:
            return f"{prefix}{key}", key
        found = find_interpolation(value, f"{prefix}{key}.")
        if found is not None:
            return found
    return None


def check_read_only(config: Mapping[str, Any], path: Path) -> None:
    """Refuse a config whose evaluation dataset would write data (SynthCity's ``generate``).

    Training's ``dataset.train`` may generate SynthCity on first use; what is rebuilt from a
    checkpoint (eval's ``dataset.val``) only reads, so a stored config cannot make a tool
    write a dataset where it says.
    """
    dataset = config.get("dataset")
    val = dataset.get("val") if isinstance(dataset, Mapping) else None
    if isinstance(val, Mapping) and val.get("generate"):
        raise CheckpointError(
            f"checkpoint {path}: config.dataset.val.generate={val.get('generate')!r}: evaluating "
            "a checkpoint never generates data (make SynthCity with tools/make_synthcity.py)"
        )


def build_inference_model(model_config: Any, path: Path | str) -> nn.Module:
    """Instantiate ``model_config`` (a ``_target_`` node) without aux heads or weight files."""
    if not isinstance(model_config, Mapping) or "_target_" not in model_config:
        raise CheckpointError(f"checkpoint {path}: config.model is not a node with a _target_")
    node = dict(model_config)
    for key in WEIGHT_FILE_ARGUMENTS:  # the checkpoint holds every weight
        if key in node:
            node[key] = None
    node["aux_heads"] = False
    model = build_from_checkpoint(node, f"model of checkpoint {path} (config.model)")
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"checkpoint {path}: config.model builds a {type(model).__name__}, not a model"
        )
    return model


def is_onnx(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an exported ONNX model (by its suffix) rather than a checkpoint."""
    return Path(path).suffix.lower() == ".onnx"


def load_inference_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    *,
    checkpoint: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    ema: bool = True,
    onnx_threads: int | None = None,
) -> InferenceModel:
    """Load ``path`` and return its model in eval mode on ``device``, aux heads dropped.

    An ``.onnx`` file written by ``tools/export.py`` (fp32 or int8) loads as an
    :class:`seg.models.onnx_model.OnnxModel` run by onnxruntime on the CPU (``device`` is
    then ignored), its dataset facts read from the file's metadata.

    Args:
        path: the checkpoint file, or an exported ``.onnx`` model.
        device: a device, or a setting such as ``"auto"``/``"cuda"`` (``seg.dist``).
        checkpoint: the file's contents when the caller has read it already.
        config: the config to build from, when the caller changed the stored one (the
            evaluation tool's overrides); defaults to ``checkpoint["config"]``.
        ema: load the EMA weights when the checkpoint has them (False: the raw weights).
        onnx_threads: onnxruntime intra-op threads for an ``.onnx`` (None: PyTorch's).
    """
    path = Path(path)
    if is_onnx(path):
        return load_onnx_inference_model(path, threads=onnx_threads)
    device = dist.resolve_device(device) if isinstance(device, str) else device
    if checkpoint is None:
        checkpoint = load_checkpoint(path, map_location="cpu")
    # Checkpoints are data: the whole stored config is checked before anything is built
    # (eval builds its dataset and evaluator from it too), then the one built from.
    check_stored_config(checkpoint["config"], path)
    config = dict(config if config is not None else checkpoint["config"])
    check_targets(config, f"from checkpoint {path}")
    check_class_count(config, path)
    info = dataset_info(config, path)
    model = build_inference_model(config.get("model"), path)
    weights, state, source = "model", checkpoint["model"], f"checkpoint {path}"
    averaged = checkpoint.get("ema") if ema else None
    if averaged is not None:
        if not isinstance(averaged, Mapping) or not isinstance(averaged.get("model"), Mapping):
            raise CheckpointError(f"checkpoint {path}: 'ema' holds no 'model' state dict")
        weights, state, source = "ema", averaged["model"], f"checkpoint {path} (EMA weights)"
    load_into(model, state, source)
    model.eval().to(device)
    return InferenceModel(
        model=model, config=config, device=device, path=path, weights=weights, **info
    )

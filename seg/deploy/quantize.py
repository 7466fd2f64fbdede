"""Static int8 quantization of an exported fp32 model with onnxruntime's own tools.

The steps are the ones onnxruntime's quantization guide gives for a CNN on a CPU:

1. pre-processing (``quant_pre_process``): ONNX shape inference and onnxruntime's basic
   graph optimisations (constant folding, Conv+BatchNorm fusion). Symbolic shape inference
   is skipped: it is meant for transformers, and it stops on this graph's size arithmetic
   (the in-graph pad to a multiple of 32), while ONNX shape inference types every tensor;
2. calibration (``quantize_static`` with a ``CalibrationDataReader``): the fp32 model runs
   on N images of the training dataset, normalised as in training, one image per batch at
   its own size, and each activation's range is recorded (MinMax by default);
3. QDQ format: QuantizeLinear/DequantizeLinear pairs around the quantized operators, which
   the CPU execution provider fuses into integer kernels (QLinearConv, QLinearAdd, ...).
   Weights are int8, symmetric, per output channel; activations uint8, asymmetric, per
   tensor: the pairing onnxruntime recommends for x86 CPUs, where VNNI (and, with
   ``reduce_range``, 7-bit weights on CPUs without VNNI) avoids the overflow of u8 x s8
   products.

Operators in the module scopes of ``float_scopes`` stay float. A scope is a module path of
the PyTorch model, e.g. ``head.classifier``; the exporter records every node's module
path in its metadata (``pkg.torch.onnx.name_scopes``). Scopes are matched in the export
and the nodes excluded by name, which pre-processing keeps (its node metadata it may not).
:data:`DEFAULT_FLOAT_SCOPES` holds the measured choice; docs/deploy.md gives the
measurements behind it.

The int8 file keeps the fp32 file's metadata (mean, std, class names, palette) and adds
``precision`` (``int8``), ``quantization`` (the settings, JSON), ``calibration_images``
(the names of the calibration images, JSON) and ``calibration_source``.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg.checkpoint import load_checkpoint
from seg.data.batch import normalize_images
from seg.data.build import build_dataset
from seg.errors import CheckpointError, ConfigError, DatasetError, first_line
from seg.extras import require_deploy
from seg.fileio import write_bytes_atomic
from seg.models.onnx_model import INPUT_NAME, DeployMetadata, parse_metadata

#: Module scopes of BiSeNetV2 kept in float by default (see docs/deploy.md for why).
DEFAULT_FLOAT_SCOPES: tuple[str, ...] = ("head.classifier",)
#: Calibration methods of onnxruntime.quantization.CalibrationMethod, by setting value.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Where the exporter records a node's module path (a Python list literal of scopes).
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: The exported graph wraps the network as ``DeployModel.model``: scopes start with this.
ROOT_SCOPE = "model"
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------- calibration


@dataclass
class CalibrationSet:
    """Calibration images: ``images[i]`` is uint8 H x W x 3 RGB, named ``names[i]``."""

    names: list[str]
    images: list[torch.Tensor]
    source: str = ""


def pick_calibration_images(dataset: Any, count: int, source: str) -> CalibrationSet:
    """``count`` images spread evenly over ``dataset`` (first, then every len/count-th).

    ``dataset`` yields items ``{"image": uint8 H x W x 3, "name": str, ...}`` (the data
    contract); give it without random augmentation, so that calibration sees what
    deployment sees. ``source`` names the dataset in messages and in the model's metadata.

    Raises:
        ConfigError: ``count`` < 1.
        DatasetError: the dataset has fewer than ``count`` images.
    """
    if isinstance(count, bool) or int(count) < 1:
        raise ConfigError(f"calibration_images must be a positive integer, got {count}")
    count, size = int(count), len(dataset)
    if size < count:
        raise DatasetError(
            f"calibration_images={count} but {source} has only {size} image(s); "
            f"ask for at most {size}"
        )
    indices = [(i * size) // count for i in range(count)]
    names, images = [], []
    for index in indices:
        item = dataset[index]
        image = item["image"]
        image = torch.as_tensor(image)
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise DatasetError(
                f"{source}: item {index} is not a uint8 H x W x 3 image "
                f"({image.dtype} {tuple(image.shape)}); give the dataset without a transform "
                "that normalises"
            )
        names.append(str(item["name"]))
        images.append(image)
    return CalibrationSet(names=names, images=images, source=source)


def calibration_from_checkpoint(
    ckpt: str | os.PathLike[str], count: int, root: str | os.PathLike[str] | None = None
) -> CalibrationSet:
    """``count`` images of the training split named in the checkpoint's config.

    The split is ``config["dataset"]["train"]`` without its transform (no random crops or
    flips: calibration should see what deployment sees); ``root`` replaces its ``root``
    (the dataset may live elsewhere than where the model was trained).

    Raises:
        CheckpointError: the checkpoint has no ``dataset.train`` node.
        ConfigError: ``root`` is given for a dataset node without a ``root`` key.
        DatasetError: the split is missing or has fewer than ``count`` images.
    """
    path = Path(ckpt)
    config = load_checkpoint(path, map_location="cpu").get("config") or {}
    dataset_config = config.get("dataset") or {}
    node = dataset_config.get("train")
    if not isinstance(node, dict) or "_target_" not in node:
        raise CheckpointError(
            f"checkpoint {path}: config.dataset.train is not a dataset node; int8 "
            "calibration reads its images from the training split"
        )
    node = {**node, "transform": None}
    if root is not None:
        if "root" not in node:
            raise ConfigError(
                f"calibration_root: the checkpoint's dataset.train ({node['_target_']}) has no "
                "root key to replace"
            )
        node["root"] = str(root)
    dataset = build_dataset(node, "calibration dataset (the checkpoint's dataset.train)")
    where = node.get("root") or node.get("image_dir") or "?"
    source = f"{dataset_config.get('name', 'dataset')} training split at {where}"
    return pick_calibration_images(dataset, count, source)


def default_int8_path(fp32_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model_int8.onnx`` (beside it)."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}_int8{path.suffix or '.onnx'}")


def calibration_batches(
    calibration: CalibrationSet, mean: Sequence[float], std: Sequence[float]
) -> Iterator[dict[str, np.ndarray]]:
    """One feed per image: ``{"images": float32 1 x 3 x H x W}``, normalised as in training."""
    for image in calibration.images:
        normalised = normalize_images(image.unsqueeze(0), mean, std)
        yield {INPUT_NAME: normalised.contiguous().numpy()}


def _reader(batches: Iterator[dict[str, np.ndarray]]) -> Any:
    """Wrap ``batches`` in onnxruntime's ``CalibrationDataReader`` interface."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    return _Reader()


# --------------------------------------------------------------------------- float scopes


def node_scopes(node: Any) -> list[str]:
    """The module paths a node was traced in, outermost first (empty when unrecorded)."""
    for entry in node.metadata_props:
        if entry.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes] if isinstance(scopes, list) else []
    return []


def nodes_in_scopes(model: Any, scopes: Sequence[str]) -> dict[str, list[str]]:
    """Node names per module scope (``head.classifier`` -> nodes traced inside it).

    Quantize/Dequantize nodes are never listed. Raises ConfigError for a scope that
    matches no node, naming it and the top-level scopes there are.
    """
    found: dict[str, list[str]] = {scope: [] for scope in scopes}
    top: set[str] = set()
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        paths = node_scopes(node)
        top.update(p.split(".")[1] for p in paths if p.startswith(f"{ROOT_SCOPE}."))
        for scope in scopes:
            if f"{ROOT_SCOPE}.{scope}" in paths:
                found[scope].append(node.name)
    empty = [scope for scope, names in found.items() if not names]
    if empty:
        raise ConfigError(
            f"float_scopes {empty} match no node of the model (module paths such as "
            f"'head.classifier'; top-level modules here: {sorted(top) or 'none recorded'})"
        )
    return found


# --------------------------------------------------------------------------- quantization


@dataclass
class QuantizeSummary:
    """What :func:`quantize_int8` wrote."""

    path: Path
    calibration_count: int
    float_nodes: dict[str, list[str]]
    op_counts: dict[str, int]
    conv_int8: int
    conv_float: int
    settings: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        floats = ", ".join(f"{s} ({len(n)} node(s))" for s, n in self.float_nodes.items())
        return (
            f"wrote {self.path} (int8 QDQ, {self.settings['weights']} weights, "
            f"{self.settings['activations']} activations, {self.settings['calibration']} "
            f"calibration on {self.calibration_count} image(s); Conv: {self.conv_int8} int8, "
            f"{self.conv_float} float; kept float: {floats or 'nothing'})"
        )


def _load_fp32(onnx: Any, path: Path) -> tuple[Any, DeployMetadata]:
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({first_line(error, limit=200)})"
        ) from None
    metadata = parse_metadata({p.key: p.value for p in model.metadata_props}, path)
    if metadata.precision != "fp32" or any(n.op_type in _QDQ_OPS for n in model.graph.node):
        raise ConfigError(f"{path} is already quantized; quantize the fp32 export")
    return model, metadata


def _conv_counts(model: Any) -> tuple[int, int]:
    """(Conv nodes whose weight comes through a DequantizeLinear, the other Conv nodes)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8 = sum(1 for n in convs if n.input[1] in dequantized)
    return int8, len(convs) - int8


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration: CalibrationSet,
    *,
    float_scopes: Sequence[str] = DEFAULT_FLOAT_SCOPES,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = False,
) -> QuantizeSummary:
    """Write a statically quantized int8 (QDQ) copy of the fp32 export ``fp32_path``.

    Args:
        fp32_path: an fp32 ``.onnx`` written by this project's export (metadata checked).
        out_path: the int8 file to write (atomically).
        calibration: the images that set the activation ranges.
        float_scopes: module scopes whose nodes stay float (see the module docstring).
        method: ``minmax``, ``entropy`` or ``percentile`` calibration.
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights, for x86 CPUs without VNNI.

    Raises:
        CheckpointError: ``fp32_path`` is missing, unreadable or not this project's export.
        ConfigError: already quantized, an unknown method, or a scope that matches nothing.
    """
    onnx, ort = require_deploy()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"calibration method must be one of {list(CALIBRATION_METHODS)}, got {method!r}"
        )
    if not calibration.images:
        raise DatasetError("the calibration set is empty")
    source, target = Path(fp32_path), Path(out_path)
    model, metadata = _load_fp32(onnx, source)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    settings = {
        "tool": "onnxruntime.quantization.quantize_static",
        "onnxruntime": ort.__version__,
        "format": "QDQ",
        "weights": ("int8 per-channel" if per_channel else "int8 per-tensor")
        + (" 7-bit" if reduce_range else ""),
        "activations": "uint8 per-tensor",
        "calibration": method,
        "float_scopes": list(float_scopes),
    }
    with tempfile.TemporaryDirectory(prefix="seg-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        # Scopes are read from the export: pre-processing may drop node metadata, but it
        # keeps the names of the nodes it does not fuse away.
        present = {node.name for node in onnx.load(str(prepared)).graph.node}
        float_nodes = {
            scope: [name for name in names if name in present]
            for scope, names in nodes_in_scopes(model, list(float_scopes)).items()
        }
        quantize_static(
            str(prepared),
            str(quantized),
            _reader(calibration_batches(calibration, metadata.mean, metadata.std)),
            quant_format=QuantFormat.QDQ,
            per_channel=bool(per_channel),
            reduce_range=bool(reduce_range),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[name for names in float_nodes.values() for name in names],
            calibrate_method=methods[method],
            # CalibMaxIntermediateOutputs is left unset: onnxruntime 1.32 drops the batches
            # collected before each flush instead of merging their ranges.
            extra_options={
                "WeightSymmetric": True,
                "ActivationSymmetric": False,
                # A standalone BatchNormalization (the context embedding's, after the global
                # pool) has rank-1 weights: their channel axis is 0, not Conv's 1.
                "QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0},
            },
        )
        result = onnx.load(str(quantized))
    stored = {p.key: p.value for p in model.metadata_props}
    stored.update(
        precision="int8",
        quantization=json.dumps(settings),
        calibration_images=json.dumps(calibration.names),
        calibration_source=calibration.source,
        source_model=source.name,
    )
    del result.metadata_props[:]
    for key, value in stored.items():
        entry = result.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(result)
    write_bytes_atomic(target, result.SerializeToString())
    conv_int8, conv_float = _conv_counts(result)
    return QuantizeSummary(
        path=target,
        calibration_count=len(calibration.images),
        float_nodes=float_nodes,
        op_counts=dict(collections.Counter(n.op_type for n in result.graph.node)),
        conv_int8=conv_int8,
        conv_float=conv_float,
        settings=settings,
    )

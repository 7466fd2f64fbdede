"""Run an ONNX model written by this project's export (fp32 or int8) like the PyTorch model.

:class:`OnnxModel` is an ``nn.Module`` with the contract of the eval-mode PyTorch model:
``forward(images float32 N x 3 x H x W, normalised) -> logits float32 N x C x H x W``, so
the evaluator (:class:`seg.engine.evaluator.Evaluator`) and test-time inference
(:func:`seg.engine.inference.predict_probs`) use it as they use the PyTorch model. It holds
no parameters: onnxruntime runs the graph on the CPU and the logits come back as a CPU
tensor (moved to the input's device).

The file must carry the metadata that :func:`seg.export.onnx_metadata` writes (mean, std,
class_names, palette, num_classes, as JSON strings); a file without it, or one that
onnxruntime cannot read, is a :class:`CheckpointError` naming the file.

Threads are set explicitly (``intra_op_num_threads``; one inter-op thread, sequential
execution), so that timings name what they measured; the default is PyTorch's thread
count, so both runtimes get the same cores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg.errors import CheckpointError, ConfigError, first_line
from seg.extras import require_deploy
from seg.models.inference_model import InferenceModel

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: Metadata keys every exported model carries (seg.export.onnx_metadata).
REQUIRED_KEYS = ("mean", "std", "class_names", "palette", "num_classes")


@dataclass(frozen=True)
class DeployMetadata:
    """The dataset facts stored in an exported model, checked.

    ``mean``/``std``: RGB normalisation on the 0-1 scale; ``palette``: one RGB triple per
    class; ``extra``: every other metadata entry as stored (e.g. ``source_checkpoint``,
    ``precision``, ``calibration_images``).
    """

    num_classes: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    palette: list[list[int]]
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """``"int8"`` for a model written by :mod:`seg.deploy.quantize`, else ``"fp32"``."""
        return self.extra.get("precision", "fp32")


def _decode(raw: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(raw[key])
    except json.JSONDecodeError:
        raise CheckpointError(
            f"{path}: metadata {key!r} is not valid JSON: {raw[key][:80]!r}"
        ) from None


def parse_metadata(raw: Mapping[str, str], path: str | os.PathLike[str]) -> DeployMetadata:
    """Check and decode the metadata of an exported model (``metadata_props`` as strings).

    Raises:
        CheckpointError: a required key is missing or holds a value that does not fit,
            naming the file and the key.
    """
    path = Path(path)
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(
            f"{path}: not an ONNX model exported by seg (metadata lacks {', '.join(missing)}); "
            "export it with tools/export.py"
        )
    values = {key: _decode(raw, key, path) for key in REQUIRED_KEYS}
    num_classes = values["num_classes"]
    if not isinstance(num_classes, int) or not 1 <= num_classes <= 255:
        # Label maps are uint8 PNGs with 255 kept for "ignore".
        raise CheckpointError(f"{path}: metadata num_classes must lie in 1..255, got {num_classes}")
    mean, std = values["mean"], values["std"]
    if not (_numbers(mean, 3) and _numbers(std, 3)) or min(std) <= 0:
        raise CheckpointError(
            f"{path}: metadata mean/std must be 3 numbers each (std > 0), got {mean} / {std}"
        )
    names = values["class_names"]
    if not isinstance(names, list) or len(names) != num_classes:
        raise CheckpointError(
            f"{path}: metadata class_names must list {num_classes} names, got {names!r:.120}"
        )
    palette = values["palette"]
    if (
        not isinstance(palette, list)
        or len(palette) < num_classes
        or not all(_numbers(rgb, 3) and all(0 <= c <= 255 for c in rgb) for rgb in palette)
    ):
        raise CheckpointError(
            f"{path}: metadata palette must hold {num_classes} RGB triples in 0..255, "
            f"got {palette!r:.120}"
        )
    return DeployMetadata(
        num_classes=num_classes,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        class_names=[str(n) for n in names],
        palette=[[int(c) for c in rgb] for rgb in palette[:num_classes]],
        extra={k: v for k, v in raw.items() if k not in REQUIRED_KEYS},
    )


def _numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def resolve_threads(threads: int | None) -> int:
    """onnxruntime's intra-op thread count: ``threads``, or PyTorch's when None."""
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or int(threads) < 1:
        raise ConfigError(
            f"threads must be a positive integer (or null for PyTorch's), got {threads}"
        )
    return int(threads)


def create_session(path: str | os.PathLike[str], threads: int) -> Any:
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads.

    Raises:
        CheckpointError: the file is missing or onnxruntime cannot load it (first line of
            onnxruntime's reason).
    """
    _, ort = require_deploy()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the NCHWc notices are noise for users
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own classes for every kind of failure
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({first_line(error, limit=200)})"
        ) from None


class OnnxModel(nn.Module):
    """An exported model run by onnxruntime on the CPU, with the PyTorch model's contract.

    ``forward(images float32 N x 3 x H x W, normalised as (x / 255 - mean) / std)`` ->
    ``logits float32 N x C x H x W`` on the input's device. ``metadata`` holds the dataset
    facts (mean, std, class names, palette) read from the file.

    Args:
        path: an ``.onnx`` file written by ``tools/export.py`` (fp32 or int8).
        threads: onnxruntime intra-op threads; None uses PyTorch's thread count.

    Raises:
        CheckpointError: missing, unreadable, or not this project's export (no metadata,
            no ``images`` input or ``logits`` output).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = resolve_threads(threads)
        self.session = create_session(self.path, self.threads)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise CheckpointError(
                f"{self.path}: not an ONNX model exported by seg (inputs {inputs}, outputs "
                f"{outputs}; expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r})"
            )
        raw = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = parse_metadata(raw, self.path)

    @property
    def num_classes(self) -> int:
        return self.metadata.num_classes

    @property
    def precision(self) -> str:
        return self.metadata.precision

    def runtime_settings(self) -> dict[str, Any]:
        """What the session runs with, for reports: versions, provider, threads."""
        _, ort = require_deploy()
        return {
            "onnxruntime": ort.__version__,
            "provider": self.session.get_providers()[0],
            "intra_op_threads": self.threads,
            "inter_op_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization": "all",
        }

    def describe(self) -> str:
        """One line: file, precision and threads."""
        return (
            f"{self.path} ({self.precision}, {self.num_classes} classes) on onnxruntime "
            f"CPU, {self.threads} intra-op thread(s)"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits float32 N x C x H x W for normalised images float32 N x 3 x H x W."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images N x 3 x H x W, got {tuple(images.shape)}")
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(images.device)


def load_onnx_inference_model(
    path: str | os.PathLike[str], threads: int | None = None
) -> InferenceModel:
    """An exported ``.onnx`` as an :class:`InferenceModel` (CPU), the dataset facts from its
    metadata, so that eval and predict use it as they use a checkpoint."""
    net = OnnxModel(path, threads=threads)
    facts = net.metadata
    dataset = {
        "num_classes": facts.num_classes,
        "mean": facts.mean,
        "std": facts.std,
        "class_names": facts.class_names,
        "palette": facts.palette,
    }
    return InferenceModel(
        model=net,
        config={"dataset": dataset},
        device=torch.device("cpu"),
        path=net.path,
        **dataset,
    )

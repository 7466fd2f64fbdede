"""Export a checkpoint to ONNX and check the exported model against PyTorch.

The exported graph is the eval-mode model without auxiliary heads:

- input ``images``: float32 N x 3 x H x W, RGB, normalised as ``(x / 255 - mean) / std``;
- output ``logits``: float32 N x C x H x W;
- output ``labels`` (with ``argmax=True``): int64 N x H x W train ids.

Batch, height and width are dynamic (any H and W: the model pads to a multiple of 32
inside the graph and crops back). The dataset's mean, std, class names and palette are
stored in the ONNX ``metadata_props`` as JSON strings, so that a deployment needs only the
``.onnx`` file.

The exporter is ``torch.onnx.export(dynamo=True)`` (torch.export based): it traces with
symbolic sizes, so size-dependent code either stays general or fails loudly, where the
legacy TorchScript tracer would silently bake in the sample's size. Its lowest opset is
18. onnx, onnxscript and onnxruntime come from the ``deploy`` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from seg.engine.load import load_inference_model
from seg.errors import ConfigError, SegError, first_line
from seg.extras import require_deploy
from seg.fileio import partial_path, remove_stale_partials, write_bytes_atomic
from seg.models.inference_model import InferenceModel
from seg.values import bool_setting, int_setting

#: Lowest opset the torch.export-based exporter writes without a failing down-conversion.
MIN_OPSET = 18
#: Inputs of the parity check: one size without padding, one odd size that needs it.
CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 256, 512), (2, 200, 300))
#: Tracing input (batch 2: torch.export specialises dimensions of size 1).
SAMPLE_SIZE = (2, 3, 128, 256)
#: Loggers of the exporter's graph passes: one INFO line per pass, noise for users.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir")


class ExportError(SegError):
    """The export failed, or the exported model does not match PyTorch."""


class DeployModel(nn.Module):
    """The graph that gets exported: logits, plus their argmax when ``argmax`` is set.

    ``forward(images N x 3 x H x W)`` -> ``logits N x C x H x W`` or
    ``(logits, labels int64 N x H x W)``.
    """

    def __init__(self, model: nn.Module, argmax: bool = False) -> None:
        super().__init__()
        self.model = model
        self.argmax = argmax

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        if isinstance(logits, dict):
            logits = logits["main"]
        if self.argmax:
            return logits, logits.argmax(dim=1)
        return logits


@contextlib.contextmanager
def _quiet_graph_passes() -> Iterator[None]:
    """Raise the graph-pass loggers to WARNING for the duration of an export."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def onnx_metadata(net: InferenceModel) -> dict[str, str]:
    """Metadata stored in the ONNX file: what a deployment needs besides the graph."""
    return {
        "mean": json.dumps(net.mean),
        "std": json.dumps(net.std),
        "class_names": json.dumps(net.class_names),
        "palette": json.dumps(net.palette),
        "num_classes": str(net.num_classes),
        "input": "images: float32 N x 3 x H x W, RGB, (pixel / 255 - mean) / std",
        "source_checkpoint": net.path.name,
    }


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    opset: int = MIN_OPSET,
    argmax: bool = False,
    metadata: Mapping[str, str] | None = None,
    optimize: bool = True,
) -> Path:
    """Export ``model`` (eval mode, on CPU) to ``path`` with dynamic batch, height and width.

    ``optimize`` runs the exporter's graph clean-up (constant folding, dead-node removal;
    slower to export, tidier graph). The file is written atomically. Returns the path.
    """
    opset, argmax, _ = check_export_settings(opset, argmax, True)
    onnx, _ = require_deploy()
    wrapper = DeployModel(model, argmax=argmax).eval()
    sample = torch.zeros(SAMPLE_SIZE)
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height"),
        3: torch.export.Dim("width"),
    }
    outputs = ["logits", "labels"] if argmax else ["logits"]
    try:
        with _quiet_graph_passes():
            program = torch.onnx.export(
                wrapper,
                (sample,),
                dynamo=True,
                opset_version=int(opset),
                input_names=["images"],
                output_names=outputs,
                dynamic_shapes=(dims,),
                external_data=False,
                optimize=optimize,
                verbose=False,
            )
    except Exception as error:
        first = first_line(error)
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {first[:300]}") from None
    proto = program.model_proto
    _name_output_dims(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path = Path(path)
    write_bytes_atomic(path, proto.SerializeToString())
    return path


def _name_output_dims(proto: Any) -> None:
    """Call the outputs' symbolic sizes batch/height/width, like the input's.

    The exporter names them after its symbolic arithmetic (the pad to a multiple of 32
    and the crop back, e.g. ``Min(height, 8*(...))``), which always equals the input size.
    """
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        names = ["batch", *([None] * (len(dims) - 3)), "height", "width"]
        for dim, name in zip(dims, names, strict=True):
            if name is not None and dim.dim_param:
                dim.dim_param = name


@dataclass
class ParityResult:
    """Largest |ONNX - PyTorch| logit difference for one input shape (N, 3, H, W)."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float
    label_mismatches: int | None = None  # argmax outputs only; ties within tolerance excluded


def check_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    sizes: Sequence[Sequence[int]] = CHECK_SIZES,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> list[ParityResult]:
    """Run the ONNX file with onnxruntime (CPU, fp32) and compare it with ``model``.

    ``sizes`` are (N, H, W) of random normal inputs. With an argmax output, its labels must
    equal PyTorch's argmax wherever the top two PyTorch logits differ by more than
    ``2 * tolerance`` (closer pairs may swap within the allowed logit error).

    Raises:
        ExportError: a logit difference above ``tolerance`` or a label mismatch, with the
            measured values.
    """
    _, ort = require_deploy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    results = []
    model = model.eval()
    # On a terminal only (tqdm's disable=None); erased when done.
    checks = tqdm(sizes, desc="onnxruntime check", unit="shape", leave=False, disable=None)
    for n, h, w in checks:
        images = torch.randn((n, 3, h, w), generator=generator)
        with torch.inference_mode():
            expected = model(images).float()
        outputs = dict(
            zip(output_names, session.run(None, {"images": images.numpy()}), strict=True)
        )
        logits = outputs["logits"]
        if logits.shape != tuple(expected.shape):
            raise ExportError(
                f"ONNX logits have shape {logits.shape}, PyTorch {tuple(expected.shape)} "
                f"for input {n}x3x{h}x{w}"
            )
        result = ParityResult((n, 3, h, w), float(np.abs(logits - expected.numpy()).max()))
        if "labels" in outputs:
            top2 = expected.topk(2, dim=1).values if expected.shape[1] > 1 else None
            clear = (top2[:, 0] - top2[:, 1] > 2 * tolerance).numpy() if top2 is not None else True
            differs = outputs["labels"] != expected.argmax(dim=1).numpy()
            result.label_mismatches = int((differs & clear).sum())
        results.append(result)
    failures = [r for r in results if r.max_abs_diff > tolerance or (r.label_mismatches or 0) > 0]
    if failures:
        raise ExportError(
            f"the ONNX model does not match PyTorch (tolerance {tolerance:g}): "
            + "; ".join(_describe(r) for r in failures)
        )
    return results


def _describe(result: ParityResult) -> str:
    text = f"input {'x'.join(map(str, result.shape))}: max |diff| {result.max_abs_diff:.3g}"
    if result.label_mismatches is not None:
        text += f", {result.label_mismatches} label mismatches"
    return text


@dataclass
class ExportSummary:
    """What :func:`export_checkpoint` wrote and measured."""

    path: Path
    opset: int
    argmax: bool
    parity: list[ParityResult]

    def describe(self) -> str:
        outputs = "logits + labels" if self.argmax else "logits"
        lines = [f"wrote {self.path} (opset {self.opset}, outputs: {outputs})"]
        lines += [f"onnxruntime vs PyTorch, {_describe(r)}" for r in self.parity]
        return "\n".join(lines)


def export_checkpoint(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = MIN_OPSET,
    argmax: bool = False,
    check: bool = True,
    tolerance: float = 1e-4,
    sizes: Sequence[Sequence[int]] = CHECK_SIZES,
    optimize: bool = True,
) -> ExportSummary:
    """Export ``ckpt`` to ONNX at ``out`` (fp32, CPU), then check parity with onnxruntime.

    Raises:
        ConfigError: a setting of the wrong type or range (one line naming it).
    """
    opset, argmax, check = check_export_settings(opset, argmax, check)
    tolerance = _tolerance(tolerance)
    require_deploy()
    net = load_inference_model(ckpt, device="cpu")
    target = Path(out)
    remove_stale_partials(target.parent)  # temporary files of a killed earlier export
    # Export next to the target and move it there only once it has passed the check.
    unchecked = partial_path(target)
    try:
        export_onnx(
            net.model,
            unchecked,
            opset=opset,
            argmax=argmax,
            metadata=onnx_metadata(net),
            optimize=optimize,
        )
        parity: list[ParityResult] = []
        if check:
            try:
                parity = check_onnx(net.model, unchecked, sizes=sizes, tolerance=float(tolerance))
            except ExportError as error:
                raise ExportError(
                    f"{error}; {target} not written (check=false skips the check)"
                ) from None
        os.replace(unchecked, target)
    finally:
        unchecked.unlink(missing_ok=True)
    return ExportSummary(path=target, opset=int(opset), argmax=bool(argmax), parity=parity)


def check_export_settings(opset: Any, argmax: Any, check: Any) -> tuple[int, bool, bool]:
    """``(opset, argmax, check)`` checked: a whole opset >= ``MIN_OPSET``, two booleans."""
    opset = int_setting(opset, "opset")
    if opset < MIN_OPSET:
        raise ConfigError(
            f"opset must be >= {MIN_OPSET} (the torch.export-based ONNX exporter's lowest), got {opset}"
        )
    return opset, bool_setting(argmax, "argmax"), bool_setting(check, "check")


def _tolerance(value: Any) -> float:
    try:
        tolerance = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"tolerance must be a positive number, got {value!r}") from None
    if not tolerance > 0:
        raise ConfigError(f"tolerance must be a positive number, got {value!r}")
    return tolerance


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata :func:`export_onnx` stored, JSON values decoded (for tests and users)."""
    onnx, _ = require_deploy()
    model = onnx.load(str(path), load_external_data=False)
    decoded: dict[str, Any] = {}
    for entry in model.metadata_props:
        try:
            decoded[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            decoded[entry.key] = entry.value
    return decoded

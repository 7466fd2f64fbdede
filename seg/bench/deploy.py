"""Deployment benchmark section: PyTorch eager fp32, ONNX Runtime fp32 and int8 on the CPU.

A randomly initialised BiSeNetV2 (19 classes, no aux heads) is exported to ONNX
(:func:`seg.export.export_onnx`) and quantized to int8 (:func:`seg.deploy.quantize.quantize_int8`,
the default settings, calibrated on a few synthetic images), then the three runtimes are
timed side by side (interleaved, see ``seg.bench.timing``) at batch 1 for each input size.
Latency depends on the graph and the tensor sizes, not on the weights' values, so random
weights time the same as trained ones; the accuracy of int8 is measured separately with
the evaluator (docs/deploy.md).

The section always runs on the CPU (onnxruntime's CPU execution provider), with the same
thread count for PyTorch and onnxruntime (PyTorch's), and reports the settings and the
load average, since the machines here are shared. Without the ``deploy`` extra the
section is skipped with a note.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from seg.bench.timing import BenchOptions, Section, Timing, time_side_by_side
from seg.deploy.quantize import CalibrationSet, quantize_int8
from seg.export import export_onnx
from seg.extras import DeployDependencyError, require_deploy
from seg.models.bisenetv2 import BiSeNetV2
from seg.models.onnx_model import OnnxModel
from seg.tables import markdown_table

NUM_CLASSES = 19
FULL_SIZES = ((512, 1024), (1024, 2048))
QUICK_SIZES = ((64, 128),)
#: Synthetic calibration images (only the int8 graph's structure matters for timing).
CALIBRATION_COUNT = 4
CALIBRATION_SIZE = (128, 256)
RUNTIMES = ("PyTorch eager fp32", "ORT fp32", "ORT int8")
TITLE = "Deployment on the CPU (PyTorch vs ONNX Runtime fp32 / int8)"


def synthetic_metadata(num_classes: int) -> dict[str, str]:
    """The metadata an exported model carries, with neutral values (mean 0.5, std 0.25)."""
    return {
        "mean": json.dumps([0.5, 0.5, 0.5]),
        "std": json.dumps([0.25, 0.25, 0.25]),
        "class_names": json.dumps([f"class_{i}" for i in range(num_classes)]),
        "palette": json.dumps([[i, i, i] for i in range(num_classes)]),
        "num_classes": str(num_classes),
        "source_checkpoint": "random initialisation (benchmark)",
    }


def build_models(folder: Path) -> tuple[torch.nn.Module, Path, Path, dict[str, float]]:
    """The PyTorch model, its fp32 and int8 ONNX files in ``folder``, and the build seconds."""
    torch.manual_seed(0)
    model = BiSeNetV2(NUM_CLASSES, aux_heads=False).eval()
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    start = time.perf_counter()
    export_onnx(model, fp32, metadata=synthetic_metadata(NUM_CLASSES))
    exported = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (*CALIBRATION_SIZE, 3), dtype=torch.uint8, generator=generator)
        for _ in range(CALIBRATION_COUNT)
    ]
    calibration = CalibrationSet(
        names=[f"random_{i}" for i in range(CALIBRATION_COUNT)],
        images=images,
        source="uniform random images (benchmark)",
    )
    quantize_int8(fp32, int8, calibration)
    seconds = {
        "export_s": exported - start,
        "quantize_s": time.perf_counter() - exported,
    }
    return model, fp32, int8, seconds


def run(options: BenchOptions) -> Section:
    """Run the deployment section on the CPU; see the module docstring."""
    try:
        require_deploy()
    except DeployDependencyError as error:
        return Section(title=TITLE, markdown="Not run.", skipped=[str(error)])
    skipped: list[str] = []
    if torch.device(options.device).type != "cpu":
        skipped.append(f"device {options.device}: this section runs on the CPU only")
    sizes = QUICK_SIZES if options.quick else FULL_SIZES
    repeats = min(options.repeats, 3) if options.quick else options.repeats
    warmup = min(options.warmup, 1) if options.quick else options.warmup
    threads = torch.get_num_threads()
    records: list[dict[str, object]] = []
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="seg-bench-deploy-") as tmp:
        model, fp32_path, int8_path, build_seconds = build_models(Path(tmp))
        fp32 = OnnxModel(fp32_path, threads=threads)
        int8 = OnnxModel(int8_path, threads=threads)
        settings = fp32.runtime_settings()
        load_before = os.getloadavg()
        for height, width in sizes:
            images = torch.randn(1, 3, height, width)
            runners: dict[str, Callable[[], torch.Tensor]] = {}
            for name, net in zip(RUNTIMES, (model, fp32, int8), strict=True):
                runners[name] = _runner(net, images)
            timings = time_side_by_side(runners, repeats=repeats, warmup=warmup)
            rows += _rows(timings, height, width)
            for timing in timings.values():
                record = timing.as_dict()
                record.update(
                    metric="deploy_latency",
                    size=[1, 3, height, width],
                    images_per_s=1.0 / timing.median_s,
                    threads=threads,
                )
                records.append(record)
        load_after = os.getloadavg()
    records.append(
        {"metric": "deploy_settings", **settings, "torch_threads": threads, **build_seconds}
    )
    records.append({"metric": "load_average", "before": load_before, "after": load_after})
    markdown = "\n\n".join(
        [
            f"BiSeNetV2, {NUM_CLASSES} classes, eval mode without aux heads, batch 1, CPU; "
            f"median of {repeats} runs after {warmup} warm-up runs, the three runtimes "
            "interleaved. int8: static QDQ (seg.deploy.quantize defaults), calibrated on "
            f"{CALIBRATION_COUNT} synthetic images.",
            f"Threads: PyTorch {threads}; onnxruntime {settings['onnxruntime']} "
            f"{settings['provider']}, intra-op {settings['intra_op_threads']}, inter-op "
            f"{settings['inter_op_threads']}, {settings['execution_mode']} execution, graph "
            f"optimisation level {settings['graph_optimization']}. Load average (1/5/15 min) "
            f"before {_load(load_before)}, after {_load(load_after)}.",
            markdown_table(
                [
                    "input",
                    "runtime",
                    "median ms",
                    "images/s",
                    "speed-up vs PyTorch",
                    "speed-up vs ORT fp32",
                ],
                rows,
            ),
        ]
    )
    return Section(title=TITLE, markdown=markdown, records=records, skipped=skipped)


def _runner(net: torch.nn.Module, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return net(images)

    return run


def _rows(timings: dict[str, Timing], height: int, width: int) -> list[list[object]]:
    eager, ort_fp32 = timings[RUNTIMES[0]], timings[RUNTIMES[1]]
    return [
        [
            f"1x3x{height}x{width}",
            name,
            timing.median_ms,
            1.0 / timing.median_s,
            eager.median_s / timing.median_s,
            ort_fp32.median_s / timing.median_s,
        ]
        for name, timing in timings.items()
    ]


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)

"""Which BiSeNetV2 modules should stay float in the int8 model: accuracy and speed per choice.

Quantizes one fp32 export several times, each with other module scopes kept float, and
reports for each: mIoU on the validation split (the project's Evaluator), argmax agreement
with the fp32 model (% of pixels) and latency at batch 1 next to ORT fp32 (timed
interleaved in one run). The figures in docs/deploy.md come from this script:

    python docs/deploy/float_scopes_study.py --ckpt CKPT.pt --fp32 model.onnx \\
        --dataset-root data/synthcity --calibration-images 100 --out study.md

Needs the deploy extra. Nothing here is used by the package; it documents a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from seg.bench.timing import time_side_by_side
from seg.checkpoint import load_checkpoint
from seg.data.build import build_dataset
from seg.data.loader import build_eval_loader
from seg.deploy.quantize import calibration_from_checkpoint, quantize_int8
from seg.engine.eval_run import AgreementCounter
from seg.engine.evaluator import Evaluator
from seg.engine.load import load_inference_model
from seg.fileio import write_text_atomic
from seg.models.bisenetv2 import BiSeNetV2
from seg.models.onnx_model import OnnxModel
from seg.tables import markdown_table


def depthwise_scopes() -> list[str]:
    """The ConvBN blocks of BiSeNetV2 whose convolution is depthwise (groups > 1).

    The exporter folds each BN into its conv and records the block's path for the fused
    node, so the block (the conv's parent module) is the scope to name.
    """
    model = BiSeNetV2(19, aux_heads=False)
    return [
        name.rsplit(".", 1)[0]
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups > 1
    ]


#: The choices compared: a name and the module scopes kept float.
CHOICES: dict[str, list[str]] = {
    "all int8": [],
    "classifier float": ["head.classifier"],
    "classifier + context embedding float": ["head.classifier", "semantic.s5_5"],
    "classifier + aggregation (BGA) float": ["head.classifier", "bga"],
    "classifier + depthwise convs float": ["head.classifier", *depthwise_scopes()],
    "whole head float": ["head"],
}
SIZES = ((512, 1024), (1024, 2048))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the trained checkpoint")
    parser.add_argument("--fp32", type=Path, required=True, help="its fp32 export")
    parser.add_argument("--dataset-root", type=Path, required=True)
    parser.add_argument("--calibration-images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="markdown report to write")
    args = parser.parse_args()

    config = load_checkpoint(args.ckpt, map_location="cpu")["config"]
    val_node = {**config["dataset"]["val"], "root": str(args.dataset_root)}
    val = build_dataset(val_node)
    calibration = calibration_from_checkpoint(args.ckpt, args.calibration_images, args.dataset_root)
    reference = load_inference_model(args.fp32)  # the fp32 OnnxModel with its dataset facts
    fp32 = reference.model
    evaluator = Evaluator(
        fp32.num_classes,
        ignore_index=int(config["dataset"]["ignore_index"]),
        mean=fp32.metadata.mean,
        std=fp32.metadata.std,
    )
    loader = build_eval_loader(val, batch_size=1, num_workers=0)
    device = torch.device("cpu")
    fp32_miou = evaluator.evaluate(fp32, loader, device, progress=False)["mIoU"]

    rows, models = [], {"ORT fp32": fp32}
    with tempfile.TemporaryDirectory() as tmp:
        for name, scopes in CHOICES.items():
            path = Path(tmp) / f"{len(models)}.onnx"
            summary = quantize_int8(args.fp32, path, calibration, float_scopes=scopes)
            net = OnnxModel(path)
            agreement = AgreementCounter(reference, evaluator, device)
            miou = evaluator.evaluate(net, loader, device, progress=False, on_prediction=agreement)
            models[name] = net
            rows.append(
                [
                    name,
                    ", ".join(scopes[:3]) + (f" (+{len(scopes) - 3})" if len(scopes) > 3 else "")
                    or "-",
                    summary.conv_float,
                    100 * miou["mIoU"],
                    100 * (miou["mIoU"] - fp32_miou),
                    100 * agreement.fraction(),
                ]
            )
        load_before = os.getloadavg()
        speed_rows = []
        for height, width in SIZES:
            images = torch.randn(1, 3, height, width)

            def runner(net: OnnxModel, images: torch.Tensor = images):
                return lambda: net(images)

            timings = time_side_by_side(
                {name: runner(net) for name, net in models.items()},
                repeats=args.repeats,
                warmup=args.warmup,
            )
            base = timings["ORT fp32"].median_s
            speed_rows += [
                [f"1x3x{height}x{width}", name, t.median_ms, base / t.median_s]
                for name, t in timings.items()
            ]
        load_after = os.getloadavg()

    report = "\n\n".join(
        [
            f"# int8 float-scope study ({dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})",
            f"checkpoint {args.ckpt}, fp32 {args.fp32} (mIoU {100 * fp32_miou:.2f}), "
            f"{len(val)} val images, {len(calibration.images)} calibration images, "
            f"onnxruntime {fp32.runtime_settings()['intra_op_threads']} intra-op threads; "
            f"load average before {load_before}, after {load_after}",
            markdown_table(
                ["choice", "float scopes", "float Conv", "mIoU", "vs fp32", "agreement %"], rows
            ),
            f"Latency, batch 1, median of {args.repeats} (interleaved):",
            markdown_table(["input", "model", "median ms", "speed-up vs ORT fp32"], speed_rows),
        ]
    )
    write_text_atomic(args.out, report + "\n")
    print(report)


if __name__ == "__main__":
    main()

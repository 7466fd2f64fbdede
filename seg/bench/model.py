"""Model benchmark section: parameter counts, convolution FLOPs and inference latency.

Latency is measured in eval mode at batch 1 (the deployment case: auxiliary heads not
built), for each input size, with the variants side by side (interleaved, see
``seg.bench.timing``): fp32 NCHW, fp32 channels_last, ``torch.compile`` (channels_last),
and autocast bf16 / fp16. On CUDA (full runs) fp16 is also compiled, once with the default
mode and once with ``mode="reduce-overhead"`` (CUDA graphs: at batch 1 the launch overhead
of a few hundred small kernels is a large share of the time), and cuDNN benchmark mode is
on, as for a fixed-size deployment. On CPU, fp16 autocast is skipped (CUDA only) and bf16 is
measured when the CPU kernels accept it. A variant that fails to run is reported as skipped.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from seg.bench.timing import BenchOptions, Section, Timing, time_side_by_side
from seg.models.bisenetv2 import BiSeNetV2
from seg.models.flops import count_flops, count_parameters
from seg.tables import markdown_table

NUM_CLASSES = 19  # Cityscapes, the setting of the published reference figures
FULL_SIZES = ((512, 1024), (1024, 2048))
QUICK_SIZES = ((64, 128),)
FLOP_SIZES = ((512, 1024), (1024, 2048))


@dataclass
class Variant:
    """One way of running the model: memory format, autocast dtype, compiled or not."""

    name: str
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    compiled: bool = False
    compile_mode: str | None = None  # torch.compile mode; None: the default


def _variants(device: torch.device, quick: bool) -> tuple[list[Variant], list[str]]:
    """The variants to time on ``device`` and the reasons for those left out."""
    variants = [Variant("fp32 NCHW"), Variant("fp32 channels_last", channels_last=True)]
    skipped: list[str] = []
    if quick:
        skipped.append("torch.compile: skipped in --quick mode (compilation takes minutes)")
    else:
        variants.append(Variant("fp32 channels_last compiled", channels_last=True, compiled=True))
    variants.append(
        Variant("bf16 autocast channels_last", channels_last=True, autocast_dtype=torch.bfloat16)
    )
    if device.type == "cuda":
        fp16 = torch.float16
        variants.append(
            Variant("fp16 autocast channels_last", channels_last=True, autocast_dtype=fp16)
        )
        if not quick:
            variants += [
                Variant("fp16 channels_last compiled", True, fp16, compiled=True),
                Variant(
                    "fp16 channels_last compiled, CUDA graphs",
                    True,
                    fp16,
                    compiled=True,
                    compile_mode="reduce-overhead",
                ),
            ]
    else:
        skipped.append("fp16 autocast: CUDA only (no fp16 autocast speed-up on CPU)")
    return variants, skipped


def build_runner(
    models: dict[bool, nn.Module], variant: Variant, images: torch.Tensor, device: torch.device
) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one inference of ``variant`` on ``images``.

    ``models`` maps channels_last (bool) to a copy of the model in that memory format, so
    that no weight conversion happens inside the timed calls.
    """
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    net = models[variant.channels_last]
    if variant.compiled:
        net = torch.compile(net, dynamic=False, mode=variant.compile_mode)
    inputs = images.contiguous(memory_format=memory_format)

    def run() -> torch.Tensor:
        autocast = (
            torch.autocast(device.type, dtype=variant.autocast_dtype)
            if variant.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return net(inputs)

    return run


def _count_rows() -> tuple[list[list[object]], list[dict[str, object]]]:
    """Parameter and FLOP counts as table rows and JSON records."""
    with_aux = BiSeNetV2(NUM_CLASSES, aux_heads=True)
    without_aux = BiSeNetV2(NUM_CLASSES, aux_heads=False)
    rows: list[list[object]] = [
        ["parameters, with aux heads", f"{count_parameters(with_aux):,}", "5,231,487"],
        ["parameters, without aux heads", f"{count_parameters(without_aux):,}", "3,358,627"],
    ]
    records: list[dict[str, object]] = [
        {"metric": "parameters_with_aux", "value": count_parameters(with_aux)},
        {"metric": "parameters_without_aux", "value": count_parameters(without_aux)},
    ]
    references = {(512, 1024): "49.2 G", (1024, 2048): "196.8 G"}
    for height, width in FLOP_SIZES:
        flops = count_flops(without_aux, (1, 3, height, width))
        size = f"1x3x{height}x{width}, eval"
        rows.append(
            [f"FLOPs (2 x MACs) {size}", f"{flops / 1e9:.1f} G", references[(height, width)]]
        )
        rows.append([f"MACs ('FLOPs' in most papers) {size}", f"{flops / 2e9:.1f} G", "-"])
        records.append({"metric": "flops", "size": [1, 3, height, width], "value": flops})
        records.append({"metric": "macs", "size": [1, 3, height, width], "value": flops // 2})
    return rows, records


def run(options: BenchOptions) -> Section:
    """Run the model section on ``options.device``; see the module docstring."""
    device = torch.device(options.device)
    count_rows, records = _count_rows()
    variants, skipped = _variants(device, options.quick)
    sizes = QUICK_SIZES if options.quick else FULL_SIZES
    repeats = min(options.repeats, 3) if options.quick else options.repeats
    warmup = min(options.warmup, 1) if options.quick else options.warmup

    torch.manual_seed(0)
    saved_cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input sizes, as deployed
    try:
        latency_rows = _time_variants(variants, sizes, device, repeats, warmup, records, skipped)
    finally:
        torch.backends.cudnn.benchmark = saved_cudnn_benchmark
    markdown = "\n\n".join(
        [
            markdown_table(["quantity", "measured", "reference"], count_rows),
            f"Inference, eval mode, batch 1, {NUM_CLASSES} classes, no aux heads, "
            f"median of {repeats} runs after {warmup} warm-up runs on `{device}`"
            f"{' (cuDNN benchmark mode on)' if device.type == 'cuda' else ''}:",
            markdown_table(
                ["input", "variant", "median ms", "images/s", "speed-up vs fp32 NCHW"], latency_rows
            ),
        ]
    )
    return Section(title="Model (BiSeNetV2)", markdown=markdown, records=records, skipped=skipped)


def _time_variants(
    variants: list[Variant],
    sizes: tuple[tuple[int, int], ...],
    device: torch.device,
    repeats: int,
    warmup: int,
    records: list[dict[str, object]],
    skipped: list[str],
) -> list[list[object]]:
    """Time every variant at every size; appends JSON records and skip notes in place."""
    model = BiSeNetV2(NUM_CLASSES, aux_heads=False).to(device).eval()
    models = {False: model, True: copy.deepcopy(model).to(memory_format=torch.channels_last)}
    latency_rows: list[list[object]] = []
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, device=device)
        runners: dict[str, Callable[[], torch.Tensor]] = {}
        first_call_s: dict[str, float] = {}
        for variant in variants:
            runner = build_runner(models, variant, images, device)
            start = time.perf_counter()
            try:
                runner()  # compiles where needed; also proves the variant runs here
            except Exception as error:  # an unsupported dtype/kernel on this device
                skipped.append(
                    f"{variant.name} at {height}x{width}: {type(error).__name__}: {error}"
                )
                continue
            first_call_s[variant.name] = time.perf_counter() - start
            runners[variant.name] = runner
        timings: dict[str, Timing] = time_side_by_side(
            runners, repeats=repeats, warmup=warmup, device=device
        )
        baseline = timings.get("fp32 NCHW")
        for name, timing in timings.items():
            speedup = baseline.median_s / timing.median_s if baseline is not None else float("nan")
            latency_rows.append(
                [f"1x3x{height}x{width}", name, timing.median_ms, 1.0 / timing.median_s, speedup]
            )
            record = timing.as_dict()
            record.update(
                metric="latency",
                size=[1, 3, height, width],
                images_per_s=1.0 / timing.median_s,
                first_call_s=first_call_s[name],
                device=str(device),
            )
            records.append(record)
    return latency_rows

"""Profile section (opt-in: ``sections=[profile]``): where the time of inference and of the
training step goes, by torch.profiler.

Two workloads, each run ``warmup`` times, then ``repeats`` times under the profiler:

- ``inference``: BiSeNetV2 in eval mode, batch 1, fp16 autocast, channels_last, eager
  (1x3x1024x2048 on CUDA, 1x3x256x512 on CPU, smaller with ``quick``);
- ``train step ohem x5`` and ``train step ce x5``: the trainer's tuned step
  (``seg.bench.train_step``) at that section's size.

For each it reports the wall time per run, the device (kernel) time per run, their ratio
(a ratio well below 1 means the GPU waits for the host: launch overhead), the kernel
launches per run, and the operators with the most self time. It answers "what holds a
target back" when a timing section misses one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from seg.bench import model as model_bench
from seg.bench.timing import BenchOptions, Section, synchronize
from seg.bench.train_step import (
    CPU_SIZE,
    CUDA_SIZE,
    NUM_CLASSES,
    QUICK_SIZE,
    Variant,
    build_step,
    make_batch,
)
from seg.models.bisenetv2 import BiSeNetV2
from seg.tables import markdown_table

TOP_OPS = 12  # operators listed per workload


def _inference(device: torch.device, size: tuple[int, int]) -> Callable[[], object]:
    """One eager batch-1 inference as the model section runs it: channels_last, fp16
    autocast on CUDA (float32 on CPU)."""
    model = BiSeNetV2(NUM_CLASSES, aux_heads=False).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    variant = model_bench.Variant(
        "inference",
        channels_last=True,
        autocast_dtype=torch.float16 if device.type == "cuda" else None,
    )
    images = torch.randn(1, 3, *size, device=device)
    return model_bench.build_runner({True: model}, variant, images, device)


def _profile(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> dict[str, Any]:
    """Profile ``repeats`` runs of ``fn``; per-run wall and device milliseconds, launches and
    the top operators by self time (device time on CUDA, CPU time on CPU)."""
    on_cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)  # the wall time includes the queued kernels
        wall_s = time.perf_counter() - start
    events = prof.key_averages()
    # Kernel and copy events carry the device time; operator events carry the time of the
    # kernels they launched as their own "self device" time (summing both would count twice).
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in device_events) if on_cuda else None
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    operators = [e for e in events if e.device_type == DeviceType.CPU]
    sort_key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    top = sorted(operators, key=lambda e: getattr(e, sort_key), reverse=True)[:TOP_OPS]
    return {
        "wall_ms": 1000.0 * wall_s / repeats,
        "device_ms": None if device_us is None else device_us / 1000.0 / repeats,
        "kernel_launches": launches / repeats if on_cuda else None,
        "top": [
            {
                "op": e.key,
                "calls": e.count / repeats,
                "self_ms": getattr(e, sort_key) / 1000.0 / repeats,
            }
            for e in top
        ],
    }


def run(options: BenchOptions) -> Section:
    """Profile inference and the OHEM / CE training steps on ``options.device``."""
    device = torch.device(options.device)
    on_cuda = device.type == "cuda"
    if options.quick:
        infer_size, step_size = (64, 128), QUICK_SIZE
    else:
        infer_size, step_size = ((1024, 2048), CUDA_SIZE) if on_cuda else ((256, 512), CPU_SIZE)
    repeats = min(options.repeats, 2) if options.quick else options.repeats
    warmup = min(options.warmup, 1) if options.quick else options.warmup
    torch.manual_seed(0)
    state = BiSeNetV2(NUM_CLASSES).state_dict()
    saved_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on_cuda
    workloads: dict[str, Callable[[], object]] = {
        f"inference 1x3x{infer_size[0]}x{infer_size[1]}": _inference(device, infer_size),
    }
    batch = make_batch(step_size, options.device)
    for loss in ("ohem", "ce"):
        step = build_step(Variant(f"{loss} x5", loss=loss), options.device, state)
        workloads[
            f"train step {loss} x5, batch {step_size[0]} at {step_size[1]}x{step_size[2]}"
        ] = lambda step=step: step(batch)
    try:
        results = {name: _profile(fn, device, repeats, warmup) for name, fn in workloads.items()}
    finally:
        torch.backends.cudnn.benchmark = saved_flag
    parts: list[str] = []
    summary_rows = []
    records = []
    for name, result in results.items():
        busy = result["device_ms"] / result["wall_ms"] if result["device_ms"] is not None else None
        summary_rows.append(
            [
                name,
                result["wall_ms"],
                "n/a" if result["device_ms"] is None else result["device_ms"],
                "n/a" if busy is None else busy,
                "n/a" if result["kernel_launches"] is None else result["kernel_launches"],
            ]
        )
        records.append({"metric": "profile", "workload": name, **result})
    parts.append(
        markdown_table(
            ["workload", "wall ms/run", "kernel ms/run", "kernel/wall", "launches/run"],
            summary_rows,
        )
    )
    time_kind = "device" if on_cuda else "CPU"
    for name, result in results.items():
        rows = [[t["op"], t["calls"], t["self_ms"]] for t in result["top"]]
        parts.append(f"{name}: top operators by self {time_kind} time per run")
        parts.append(markdown_table(["operator", "calls/run", f"self {time_kind} ms/run"], rows))
    title = f"Profile (torch.profiler, {repeats} runs after {warmup} warm-up, {options.device})"
    return Section(title=title, markdown="\n\n".join(parts), records=records)

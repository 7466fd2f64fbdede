"""Training-step benchmark: images/s and peak memory of the trainer's own step.

Every variant runs ``seg.engine.step.TrainStep`` (uint8 batch to the device, normalise
there, forward, five-head loss, backward, SGD, LR schedule) on the same synthetic batch,
timed side by side (interleaved) in one run:

- ``loss``: OHEM on all five heads vs cross-entropy on all five, both with the settings
  ``tools/train.py`` uses on the device (channels_last, fp16 AMP on CUDA, fused SGD);
- ``tuning``: a plain eager step (float32, NCHW, for-loop SGD, no skip guard, cuDNN's
  heuristic algorithms) vs that tuned step, and the tuned step with the heads' logits
  upsampled by matrix products (``model.head_upsample=matmul``); on CUDA also the tuned
  step without cuDNN benchmark mode and (full runs only) the tuned step under
  ``torch.compile``;
- ``cpu_layout`` (CPU only): float32 NCHW vs float32 channels_last vs bf16 autocast, the
  figures behind ``trainer.channels_last: auto`` and ``trainer.amp=bf16`` on CPUs;
- ``head_upsample`` (only when asked for): the tuned step with the heads' logits upsampled
  by ``F.interpolate`` vs by matrix products, nothing else changed.

Default sizes: CUDA batch 8 at 1024x1024 (as many pixels as the Cityscapes recipe's batch 16
at 512x1024); CPU batch 4 at 256x512; ``quick`` batch 2 at 64x128. ``train_step.sizes``
(configs/benchmark.yaml) times other batches and crops, e.g. CamVid's 16 x 352x480, and
``train_step.groups`` picks the comparisons. Peak memory is
``torch.cuda.max_memory_allocated`` over one step (CUDA only; CPU memory is not reported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seg.bench.timing import BenchOptions, Section, synchronize, time_side_by_side
from seg.engine.amp import build_grad_scaler, resolve_amp
from seg.engine.build import use_channels_last, use_cudnn_benchmark
from seg.engine.optim import build_sgd
from seg.engine.schedule import WarmupPolyLR
from seg.engine.step import TrainStep
from seg.errors import ConfigError
from seg.losses import CrossEntropyLoss, MultiHeadLoss, OhemCELoss
from seg.models.bisenetv2 import BiSeNetV2
from seg.tables import markdown_table

NUM_CLASSES = 19
HEADS = ("main", "aux2", "aux3", "aux4", "aux5_4")
MEAN = (0.3257, 0.3690, 0.3223)
STD = (0.2112, 0.2148, 0.2115)
CUDA_SIZE = (8, 1024, 1024)  # batch, height, width
CPU_SIZE = (4, 256, 512)
QUICK_SIZE = (2, 64, 128)


@dataclass
class Variant:
    """One way of running the training step."""

    name: str
    loss: str = "ohem"  # "ohem" | "ce"
    tuned: bool = True  # the trainer's settings for the device; False: plain eager fp32 NCHW
    compile: bool = False
    amp: str | None = None  # override the tuned step's precision ("off" | "fp16" | "bf16")
    channels_last: bool | None = None  # override the tuned step's memory format
    cudnn_benchmark: bool | None = None  # override the tuned step's cuDNN benchmark mode
    head_upsample: str = "interpolate"  # model.head_upsample: "interpolate" | "matmul"

    def uses_cudnn_benchmark(self, device: str) -> bool:
        """Whether ``torch.backends.cudnn.benchmark`` is on while this variant runs."""
        if not self.tuned:
            return False
        if self.cudnn_benchmark is not None:
            return self.cudnn_benchmark
        return use_cudnn_benchmark("auto", torch.device(device))


def make_batch(size: tuple[int, int, int], device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated uint8 batch as the loader gives it (pinned on CUDA machines).

    Labels are blocks of 32x32 pixels with random classes and an ignored (255) band at the
    bottom, so that OHEM sees regions rather than per-pixel noise.
    """
    n, h, w = size
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    blocks = torch.randint(0, NUM_CLASSES, (n, 1, -(-h // 32), -(-w // 32)), generator=gen)
    label = nn.functional.interpolate(blocks.float(), scale_factor=32, mode="nearest")[:, 0, :h, :w]
    label = label.to(torch.uint8)
    label[:, h - max(1, h // 10) :, :] = 255
    batch = {"image": image, "label": label}
    if torch.device(device).type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def _loss(kind: str) -> MultiHeadLoss:
    make = OhemCELoss if kind == "ohem" else CrossEntropyLoss
    return MultiHeadLoss({h: {"loss": make(num_classes=NUM_CLASSES)} for h in HEADS})


def build_step(variant: Variant, device: str, state: dict[str, torch.Tensor]) -> TrainStep:
    """A ``TrainStep`` for ``variant`` with a fresh BiSeNetV2 holding ``state``."""
    dev = torch.device(device)
    model = BiSeNetV2(NUM_CLASSES, head_upsample=variant.head_upsample)
    model.load_state_dict(state)
    channels_last = use_channels_last("auto", dev) if variant.tuned else False
    if variant.tuned and variant.channels_last is not None:
        channels_last = variant.channels_last
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = resolve_amp((variant.amp or "fp16") if variant.tuned else "off", dev)
    optimizer = build_sgd(model, lr=0.01, impl="auto" if variant.tuned else "plain")
    scheduler = WarmupPolyLR(optimizer, max_iters=10**9, warmup_iters=0)
    forward: nn.Module = torch.compile(model) if variant.compile else model
    return TrainStep(
        forward,
        _loss(variant.loss).to(dev),
        optimizer,
        scheduler,
        build_grad_scaler(amp),
        amp,
        MEAN,
        STD,
        dev,
        channels_last=channels_last,
        buffers_of=model if variant.tuned else None,
    )


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory (MiB) allocated while ``fn`` runs once; None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _with_cudnn_benchmark(
    step: TrainStep, batch: dict[str, torch.Tensor], flag: bool
) -> Callable[[], object]:
    """``step(batch)`` with cuDNN benchmark mode set as the variant wants (a global switch,
    so it is set before every call of the interleaved timing)."""

    def run_once() -> object:
        torch.backends.cudnn.benchmark = flag
        return step(batch)

    return run_once


def _compare(
    group: str,
    variants: list[Variant],
    options: BenchOptions,
    size: tuple[int, int, int],
    repeats: int,
    warmup: int,
    state: dict[str, torch.Tensor],
) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    batch = make_batch(size, options.device)
    steps = {v.name: build_step(v, options.device, state) for v in variants}
    fns = {
        v.name: _with_cudnn_benchmark(steps[v.name], batch, v.uses_cudnn_benchmark(options.device))
        for v in variants
    }
    saved_flag = torch.backends.cudnn.benchmark
    try:
        timings = time_side_by_side(fns, repeats=repeats, warmup=warmup, device=options.device)
        memories = {name: peak_memory_mib(fn, options.device) for name, fn in fns.items()}
    finally:
        torch.backends.cudnn.benchmark = saved_flag
    baseline = timings[variants[0].name]
    rows, records = [], []
    for variant in variants:
        timing = timings[variant.name]
        memory = memories[variant.name]
        images_per_s = size[0] / timing.median_s
        speedup = baseline.median_s / timing.median_s
        amp_name = steps[variant.name].amp.name
        rows.append(
            [
                f"{size[0]} x {size[1]}x{size[2]}",
                group,
                variant.name,
                amp_name,
                timing.median_ms,
                images_per_s,
                speedup,
                "n/a" if memory is None else memory,
            ]
        )
        timing.extra = {
            "group": group,
            "batch": size[0],
            "height": size[1],
            "width": size[2],
            "device": options.device,
            "precision": amp_name,
            "channels_last": steps[variant.name].channels_last,
            "cudnn_benchmark": variant.uses_cudnn_benchmark(options.device),
            "images_per_s": images_per_s,
            f"speed_vs_{variants[0].name}": speedup,
            "peak_memory_mib": memory,
        }
        records.append(timing.as_dict())
    del steps, fns
    if torch.device(options.device).type == "cuda":
        torch.cuda.empty_cache()
    return rows, records


#: The comparisons of this section, in the order they run. ``head_upsample`` (the heads'
#: bilinear upsampling by F.interpolate vs by matrix products, nothing else changed) is a
#: subset of ``tuning`` for focused runs, so it runs only when asked for.
GROUPS = ("loss", "tuning", "head_upsample", "cpu_layout")
DEFAULT_GROUPS = ("loss", "tuning", "cpu_layout")


def parse_groups(groups: Sequence[str] | None) -> tuple[str, ...]:
    """The comparisons to run: ``None`` -> :data:`DEFAULT_GROUPS`; names checked."""
    if groups is None:
        return DEFAULT_GROUPS
    names = tuple(str(g) for g in groups)
    unknown = [g for g in names if g not in GROUPS]
    if unknown or not names:
        raise ConfigError(
            f"unknown train_step group(s) {unknown or list(names)!r}; choose from {', '.join(GROUPS)}"
        )
    return names


def parse_sizes(sizes: Sequence[Sequence[int]] | None) -> tuple[tuple[int, int, int], ...] | None:
    """``[[16, 352, 480], ...]`` -> tuples of (batch, height, width), each value >= 1."""
    if sizes is None:
        return None
    parsed = []
    for size in sizes:
        values = tuple(int(v) for v in size)
        if len(values) != 3 or min(values) < 1:
            raise ConfigError(
                f"train_step.sizes entries must be [batch, height, width] of positive ints, "
                f"got {list(size)!r}"
            )
        parsed.append(values)
    if not parsed:
        raise ConfigError("train_step.sizes is empty; give [[batch, height, width], ...] or null")
    return tuple(parsed)  # type: ignore[return-value]


def _variants(group: str, on_cuda: bool, quick: bool) -> tuple[list[Variant], list[str]]:
    """The variants of one comparison on this device, and what it leaves out and why."""
    if group == "loss":
        return [Variant("ce x5", loss="ce"), Variant("ohem x5", loss="ohem")], []
    if group == "head_upsample":
        return [
            Variant("tuned, interpolate head upsampling"),
            Variant("tuned, matmul head upsampling", head_upsample="matmul"),
        ], []
    if group == "cpu_layout":
        if on_cuda:
            return [], ["cpu layout/precision: CPU only"]
        # The CPU choices of the trainer (layout, float32 unless asked) against the alternatives.
        return [
            Variant("tuned fp32 NCHW", channels_last=False),
            Variant("tuned fp32 channels_last", channels_last=True),
            Variant("tuned bf16 autocast channels_last", amp="bf16", channels_last=True),
        ], []
    skipped = []
    tuning = [
        Variant("plain eager fp32 NCHW", tuned=False),
        Variant("tuned (trainer)"),
        Variant("tuned, matmul head upsampling", head_upsample="matmul"),
    ]
    if on_cuda:
        tuning.append(Variant("tuned, cuDNN benchmark off", cudnn_benchmark=False))
    else:
        skipped.append("cuDNN benchmark variant: CUDA only")
    if on_cuda and not quick:
        tuning.append(Variant("tuned + torch.compile", compile=True))
    else:
        skipped.append("torch.compile variant: CUDA full runs only (compilation takes minutes)")
    return tuning, skipped


def run(options: BenchOptions) -> Section:
    """The chosen comparisons (default: OHEM vs CE, plain vs tuned, and on CPU the layouts)
    at each size, every comparison timed interleaved."""
    on_cuda = torch.device(options.device).type == "cuda"
    default_size = QUICK_SIZE if options.quick else (CUDA_SIZE if on_cuda else CPU_SIZE)
    sizes = parse_sizes(options.train_step_sizes) or (default_size,)
    groups = parse_groups(options.train_step_groups)
    if options.train_step_groups is None and options.quick:
        groups = tuple(g for g in groups if g != "cpu_layout")  # smoke runs: the two main ones
    repeats = min(options.repeats, 2) if options.quick else options.repeats
    warmup = min(options.warmup, 1) if options.quick else options.warmup
    torch.manual_seed(0)
    state = BiSeNetV2(NUM_CLASSES).state_dict()
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    for size in sizes:
        for group in groups:
            variants, left_out = _variants(group, on_cuda, options.quick)
            skipped += [note for note in left_out if note not in skipped]
            if not variants:
                continue
            label = "cpu layout/precision" if group == "cpu_layout" else group
            more_rows, more_records = _compare(
                label, variants, options, size, repeats, warmup, state
            )
            rows += more_rows
            records += more_records
    if not on_cuda:
        skipped.append("peak memory: reported on CUDA only")
    header = [
        "batch x crop",
        "comparison",
        "step",
        "precision",
        "ms/step (median)",
        "images/s",
        "x first",
        "peak MiB",
    ]
    shown = ", ".join(f"batch {n} at {h}x{w}" for n, h, w in sizes)
    title = f"Training step: BiSeNetV2, five heads, {shown} ({options.device})"
    return Section(
        title=title, markdown=markdown_table(header, rows), records=records, skipped=skipped
    )

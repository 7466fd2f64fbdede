"""Loader throughput per worker process at Cityscapes size: PNG vs decoded cache, old vs
new train pipeline, side by side.

Writes a few SynthCity scenes at 1024x2048 (Cityscapes size and layout, so PNG decoding
costs what it costs on Cityscapes) to a temporary folder and builds their decoded cache
(``seg.data.cache``) there. Each variant is the full training path through
``build_train_loader`` with ONE worker process (read, label lookup or cache map, random
scale, pad, crop, flip, colour jitter, collate, hand-over to the main process):

- source: ``png`` (decode the PNGs) or ``cache`` (memory-mapped uint8 arrays);
- pipeline: ``old`` (resize the whole image, pad, crop: ``crop_first=False``) or ``new``
  (resize only the kept region: ``RandomScaleCrop``); both draw the same augmentations.

for two settings: crop 512x1024 with scale 0.25-2.0 and crop 1024x1024 with scale 0.5-2.0
(the Cityscapes recipe of ``configs/experiment/cityscapes_*.yaml``). One measurement is a
fresh loader: warm-up batches, then the batches the worker had queued ahead (they come back
at once and are not timed), then at least ``--repeats`` batches and 1.5 s; the rates are
images per wall-clock second and images per CPU-second of that one worker (the second
holds up better when other jobs share the machine). Variants are measured in turn, round
after round (no idle worker of another variant competes for the CPU), and each figure is
the median over the rounds; ratios are against ``png``/``old``, the loader as it was.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from seg.bench.timing import BenchOptions, Section
from seg.data.cache import build_cache
from seg.data.cityscapes import CityscapesDataset
from seg.data.loader import build_train_loader
from seg.data.synthcity import SynthCityParams, write_dataset
from seg.data.transforms import build_train_transform
from seg.tables import markdown_table

SOURCES = ("png", "cache")
PIPELINES = ("old", "new")
#: (crop [h, w], scale range) at full size; halved crops on the --quick 256x512 images.
SETTINGS = (((512, 1024), (0.25, 2.0)), ((1024, 1024), (0.5, 2.0)))


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_worker(
    dataset: CityscapesDataset, warmup: int, min_batches: int, min_seconds: float
) -> tuple[float, float | None]:
    """Steady-state rate of ONE loader worker (batches of 1 image).

    Returns ``(images per wall-clock second, images per CPU-second of the worker process)``;
    the second is what the worker would deliver with a core to itself, so it moves less
    than the first when other jobs share the machine (None where /proc is absent).
    At least ``min_batches`` batches and ``min_seconds`` are timed.
    """
    loader = build_train_loader(dataset, batch_size=1, num_workers=1, seed=0, pin_memory=False)
    batch_iter = iter(loader)
    for _ in range(warmup):
        next(batch_iter)
    # Persistent workers: torch keeps its iterator (and its private list of worker processes)
    # on the loader once the first batch is drawn.
    workers = getattr(getattr(loader, "_iterator", None), "_workers", [])
    pid = workers[0].pid if len(workers) == 1 else None
    for _ in range(3):  # prefetch_factor 2, plus the one in flight: already made, not timed
        next(batch_iter)
    start, cpu_start = time.perf_counter(), _cpu_seconds(pid) if pid else None
    count = 0
    while count < min_batches or time.perf_counter() - start < min_seconds:
        next(batch_iter)
        count += 1
    wall = time.perf_counter() - start
    cpu_end = _cpu_seconds(pid) if pid else None
    del batch_iter, loader  # stop the worker before the next measurement
    # The worker runs ahead by the queue it refills, the same amount at start and end.
    per_cpu = None
    if cpu_start is not None and cpu_end is not None and cpu_end > cpu_start:
        per_cpu = count / (cpu_end - cpu_start)
    return count / wall, per_cpu


def run(options: BenchOptions) -> Section:
    """Measure images/s per worker for every (setting, source, pipeline)."""
    height, width = (256, 512) if options.quick else (1024, 2048)
    factor = 4 if options.quick else 1
    num_images = 2 if options.quick else 4
    min_batches = 4 if options.quick else max(options.repeats, 8)
    min_seconds = 0.1 if options.quick else 1.5
    rounds = 1 if options.quick else 5
    warmup = max(options.warmup, 1)
    records = []
    with tempfile.TemporaryDirectory(prefix="seg-bench-loader-") as tmp:
        root = Path(tmp) / "data"
        params = SynthCityParams(height=height, width=width, num_train=num_images, num_val=0)
        write_dataset(root, params)
        build_cache(CityscapesDataset(root, "train"), Path(tmp) / "cache", progress=False)
        for crop, scale in SETTINGS:
            crop = (crop[0] // factor, crop[1] // factor)
            datasets = {
                (source, pipeline): CityscapesDataset(
                    root,
                    "train",
                    transform=build_train_transform(crop, scale, crop_first=pipeline == "new"),
                    cache=Path(tmp) / "cache" if source == "cache" else None,
                    cache_build=False,
                )
                for source in SOURCES
                for pipeline in PIPELINES
            }
            wall: dict[tuple[str, str], list[float]] = {key: [] for key in datasets}
            cpu: dict[tuple[str, str], list[float]] = {key: [] for key in datasets}
            for _ in range(rounds):
                for key, dataset in datasets.items():
                    per_s, per_cpu_s = measure_worker(dataset, warmup, min_batches, min_seconds)
                    wall[key].append(per_s)
                    if per_cpu_s is not None:
                        cpu[key].append(per_cpu_s)
            base = statistics.median(wall[("png", "old")])
            base_cpu = statistics.median(cpu[("png", "old")]) if cpu[("png", "old")] else None
            for (source, pipeline), values in wall.items():
                median = statistics.median(values)
                cpu_values = cpu[(source, pipeline)]
                cpu_median = statistics.median(cpu_values) if cpu_values else None
                records.append(
                    {
                        "crop": list(crop),
                        "scale_range": list(scale),
                        "source": source,
                        "pipeline": pipeline,
                        "images_per_s_per_worker": median,
                        "runs": values,
                        "vs_png_old": median / base,
                        "images_per_worker_cpu_s": cpu_median,
                        "cpu_runs": cpu_values,
                        "cpu_vs_png_old": cpu_median / base_cpu
                        if cpu_median and base_cpu
                        else None,
                        "image_size": [height, width],
                        "min_batches": min_batches,
                        "min_seconds": min_seconds,
                        "rounds": rounds,
                    }
                )
    rows = [
        [
            f"{r['crop'][0]}x{r['crop'][1]}, {r['scale_range'][0]}-{r['scale_range'][1]}",
            r["source"],
            r["pipeline"],
            r["images_per_s_per_worker"],
            r["vs_png_old"],
            "-" if r["images_per_worker_cpu_s"] is None else r["images_per_worker_cpu_s"],
            "-" if r["cpu_vs_png_old"] is None else r["cpu_vs_png_old"],
        ]
        for r in records
    ]
    header = [
        "crop, scale",
        "source",
        "pipeline",
        "images/s per worker",
        "x png/old",
        "images per worker CPU-s",
        "x png/old (CPU)",
    ]
    return Section(
        title=f"Loader throughput per worker, train pipeline on {height}x{width} images "
        f"(medians of {rounds} rounds)",
        markdown=markdown_table(header, rows),
        records=records,
    )

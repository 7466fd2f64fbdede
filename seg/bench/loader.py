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
at once and are not timed), then the timed batches; the rate is images/s of that one
worker. Variants are measured in turn, round after round (no idle worker of another
variant competes for the CPU), and each figure is the median over the rounds; ratios are
against ``png``/``old``, the loader as it was.
"""

from __future__ import annotations

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


def images_per_s(dataset: CityscapesDataset, warmup: int, batches: int) -> float:
    """Steady-state images/s of one loader worker over ``batches`` timed batches of 1."""
    loader = build_train_loader(dataset, batch_size=1, num_workers=1, seed=0, pin_memory=False)
    batch_iter = iter(loader)
    for _ in range(warmup):
        next(batch_iter)
    queued = 3  # prefetch_factor 2 per worker, plus the one in flight: come back at once
    stamps = []
    for _ in range(queued + batches):
        next(batch_iter)
        stamps.append(time.perf_counter())
    del batch_iter, loader  # stop the worker before the next measurement
    return (batches - 1) / (stamps[-1] - stamps[queued])


def run(options: BenchOptions) -> Section:
    """Measure images/s per worker for every (setting, source, pipeline)."""
    height, width = (256, 512) if options.quick else (1024, 2048)
    factor = 4 if options.quick else 1
    num_images = 2 if options.quick else 4
    batches = 4 if options.quick else max(options.repeats, 8)
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
            rates: dict[tuple[str, str], list[float]] = {key: [] for key in datasets}
            for _ in range(rounds):
                for key, dataset in datasets.items():
                    rates[key].append(images_per_s(dataset, warmup, batches))
            base = statistics.median(rates[("png", "old")])
            for (source, pipeline), values in rates.items():
                median = statistics.median(values)
                records.append(
                    {
                        "crop": list(crop),
                        "scale_range": list(scale),
                        "source": source,
                        "pipeline": pipeline,
                        "images_per_s_per_worker": median,
                        "runs": values,
                        "vs_png_old": median / base,
                        "image_size": [height, width],
                        "batches": batches,
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
        ]
        for r in records
    ]
    header = ["crop, scale", "source", "pipeline", "images/s per worker (median)", "x png/old"]
    return Section(
        title=f"Loader throughput per worker, train pipeline on {height}x{width} images",
        markdown=markdown_table(header, rows),
        records=records,
    )

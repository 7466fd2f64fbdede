"""Loader throughput: the Cityscapes train pipeline on Cityscapes-size PNGs, per worker count.

Writes a few SynthCity scenes at 1024x2048 (Cityscapes size and layout, so PNG decoding
costs what it costs on Cityscapes) to a temporary folder, then times the full training
path (PNG decode, label lookup, random scale 0.25-2.0, pad, 1024x1024 crop, flip, colour
jitter, collate) through ``build_train_loader`` with 0, 1 and 2 workers. Reported:
images/s and images/s per worker (0 workers counts as one: the main process), measured
after the batches the workers had queued ahead, so the figure is the steady-state rate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from seg.bench.timing import BenchOptions, Section
from seg.data.cityscapes import CityscapesDataset
from seg.data.loader import build_train_loader
from seg.data.synthcity import SynthCityParams, write_dataset
from seg.data.transforms import build_train_transform
from seg.tables import markdown_table

WORKER_COUNTS = (0, 1, 2)


def run(options: BenchOptions) -> Section:
    """Measure images/s of the train pipeline for each worker count in ``WORKER_COUNTS``."""
    height, width, crop = (256, 512, 256) if options.quick else (1024, 2048, 1024)
    num_images = 2 if options.quick else 4
    batches = 8 if options.quick else max(options.repeats, 8)
    records = []
    with tempfile.TemporaryDirectory(prefix="seg-bench-loader-") as tmp:
        root = Path(tmp)
        params = SynthCityParams(height=height, width=width, num_train=num_images, num_val=0)
        write_dataset(root, params)
        dataset = CityscapesDataset(
            root, "train", transform=build_train_transform([crop, crop], [0.25, 2.0])
        )
        for workers in WORKER_COUNTS:
            loader = build_train_loader(
                dataset, batch_size=1, num_workers=workers, seed=0, pin_memory=False
            )
            batch_iter = iter(loader)
            for _ in range(options.warmup):
                next(batch_iter)
            # Batches already queued by the workers (prefetch_factor 2) come back at once;
            # the rate is measured over the batches after them (steady state).
            queued = 2 * workers + 1
            stamps = []
            for _ in range(queued + batches):
                next(batch_iter)
                stamps.append(time.perf_counter())
            del batch_iter, loader  # stop persistent workers before the next count
            per_s = (batches - 1) / (stamps[-1] - stamps[queued])
            records.append(
                {
                    "workers": workers,
                    "images_per_s": per_s,
                    "images_per_s_per_worker": per_s / max(workers, 1),
                    "image_size": [height, width],
                    "crop": [crop, crop],
                    "batches": batches,
                }
            )
    rows = [[r["workers"], r["images_per_s"], r["images_per_s_per_worker"]] for r in records]
    title = f"Loader throughput, train pipeline on {height}x{width} PNGs (crop {crop}x{crop})"
    return Section(
        title=title,
        markdown=markdown_table(["workers", "images/s", "images/s per worker"], rows),
        records=records,
    )

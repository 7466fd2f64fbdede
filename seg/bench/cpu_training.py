"""A training run's iteration on this machine's CPU cores: loader workers x torch threads.

On a small CPU the loader's worker processes and the training step's compute threads share
the same few cores, and a thread pool whose threads are preempted waits at every barrier of
every parallel operator. This section measures what a training run costs per iteration
with each split of the cores, using the parts ``tools/train.py`` builds
(``seg.engine.build.build_parts`` from ``configs/train.yaml`` with the demo's overrides:
SynthCity at its default size, its batch and crop, OHEM on five heads, the CPU's
defaults for layout and precision):

- ``iteration``: ``next(loader)`` then ``TrainStep`` (copy, normalise, forward, loss,
  backward, SGD, schedule), timed as a training run does it, for each number of loader
  workers (``loader.num_workers``) and torch threads (``torch.set_num_threads``);
- ``evaluation``: one pass of the periodic evaluation over the validation split with the
  same loader setting (a fresh loader's first pass: its workers start, as at a run's first
  evaluation).

Variants run in turn within a round (a fresh loader each, its workers started and warmed
up untimed), rounds repeat, and each figure is the median over the rounds; the ratio is
against the trainer's defaults (``loader.num_workers=2``, all of torch's threads).
Opt-in (``sections=[cpu_training]``): it times minutes of training, on the CPU only.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict

from seg.bench.timing import BenchOptions, Section
from seg.cli import compose_tool_config
from seg.engine.build import TrainParts, build_datasets, build_parts, parse_settings
from seg.tables import markdown_table

#: The experiment whose settings are timed (the demo's, ``make demo``).
EXPERIMENT = "synthcity_ohem"
#: Loader workers and torch threads tried (the second: 1 and all of the machine's).
WORKERS = (0, 1, 2)
#: The trainer's defaults, the baseline of the ratios.
DEFAULT_WORKERS = 2


def thread_counts() -> tuple[int, ...]:
    """1 and torch's default thread count (what a training run uses unless told)."""
    return tuple(sorted({1, torch.get_num_threads()}))


def compose_run(root: Path, workers: int, overrides: Sequence[str]) -> Any:
    """The task config ``tools/train.py +experiment=synthcity_ohem`` would get, on CPU.

    Inside ``tools/benchmark.py`` Hydra is initialised on ``configs/`` already, so the
    train config is composed there; from Python, :func:`seg.cli.compose_tool_config`.
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    task = [
        f"+experiment={EXPERIMENT}",
        f"dataset.root={root}",
        f"loader.num_workers={workers}",
        "trainer.device=cpu",
        *overrides,
    ]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=task)
    cfg = compose_tool_config("train", task)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def time_variant(
    cfg: Any, datasets: tuple[Any, Any], threads: int, iterations: int, warmup: int
) -> tuple[float, float]:
    """(seconds per training iteration, seconds per evaluation pass) of one setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        parts: TrainParts = build_parts(cfg, parse_settings(cfg), datasets)
        batches = iter(parts.train_loader)
        for _ in range(warmup):  # workers start, queues fill, allocator warms
            parts.step(next(batches))
        start = time.perf_counter()
        for _ in range(iterations):
            parts.step(next(batches))
        per_iteration = (time.perf_counter() - start) / iterations
        start = time.perf_counter()
        parts.evaluator.evaluate(parts.eval_model, parts.val_loader, "cpu", progress=False)
        per_evaluation = time.perf_counter() - start
        del batches
        return per_iteration, per_evaluation
    finally:
        torch.set_num_threads(previous)


def run(options: BenchOptions) -> Section:
    """Measure every (workers, threads) split of the CPU; see the module docstring."""
    if options.device != "cpu":
        return Section(
            title="CPU training iteration",
            markdown="Not run.",
            skipped=[f"cpu_training times the CPU; device is {options.device}"],
        )
    quick = options.quick
    iterations = 2 if quick else max(options.repeats // 2, 4)
    warmup = 1 if quick else max(options.warmup, 2)
    rounds = 1 if quick else 3
    size = ["loader.batch_size=2", "dataset.crop_size=[64,128]"] if quick else []
    generator = [
        "dataset.generator.num_train=32" if quick else "dataset.generator.num_train=96",
        "dataset.generator.num_val=4" if quick else "dataset.generator.num_val=100",
    ]
    variants = [(w, t) for w in WORKERS for t in thread_counts()]
    per_iteration: dict[tuple[int, int], list[float]] = {v: [] for v in variants}
    per_evaluation: dict[tuple[int, int], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="seg-bench-cpu-training-") as tmp:
        configs = {w: compose_run(Path(tmp) / "synthcity", w, [*size, *generator]) for w in WORKERS}
        datasets = build_datasets(configs[0])  # generates the scenes once
        for _ in range(rounds):
            for workers, threads in variants:
                it_s, eval_s = time_variant(configs[workers], datasets, threads, iterations, warmup)
                per_iteration[(workers, threads)].append(it_s)
                per_evaluation[(workers, threads)].append(eval_s)
        batch = int(configs[0].loader.batch_size)
        crop = list(OmegaConf.to_container(configs[0].dataset.crop_size))
        num_val = len(datasets[1])
    default = (DEFAULT_WORKERS, torch.get_num_threads())
    base_it = statistics.median(per_iteration[default])
    records = []
    for workers, threads in variants:
        it_median = statistics.median(per_iteration[(workers, threads)])
        records.append(
            {
                "num_workers": workers,
                "torch_threads": threads,
                "s_per_iteration": it_median,
                "iteration_runs": per_iteration[(workers, threads)],
                "vs_default": base_it / it_median,
                "s_per_evaluation": statistics.median(per_evaluation[(workers, threads)]),
                "evaluation_runs": per_evaluation[(workers, threads)],
                "batch_size": batch,
                "crop": crop,
                "val_images": num_val,
                "iterations": iterations,
                "rounds": rounds,
            }
        )
    rows = [
        [
            r["num_workers"],
            r["torch_threads"],
            r["s_per_iteration"],
            r["vs_default"],
            r["s_per_evaluation"],
        ]
        for r in records
    ]
    header = [
        "loader workers",
        "torch threads",
        "s / iteration",
        "speed x default",
        f"s / evaluation ({num_val} images)",
    ]
    return Section(
        title=f"CPU training iteration ({EXPERIMENT}, batch {batch} x {crop[0]}x{crop[1]}; "
        f"medians of {rounds} rounds of {iterations} iterations; default = "
        f"{DEFAULT_WORKERS} workers, {torch.get_num_threads()} threads)",
        markdown=markdown_table(header, rows),
        records=records,
    )

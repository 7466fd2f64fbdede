"""Timing helpers for benchmarks: warm-up, repeated runs, medians, side-by-side rows.

Machines here are shared and noisy, so every figure is a median over repeats, and
comparisons are measured interleaved in one run (A, B, A, B, ...) so that drift in the
machine's load hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs of one callable."""

    name: str
    seconds: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_ms(self) -> float:
        return 1000.0 * self.median_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_ms"] = self.median_ms
        return out


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so that wall-clock times include it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], object],
    *,
    name: str,
    repeats: int = 10,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(name=name, seconds=seconds)


def time_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time several callables interleaved (round-robin) so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(name=name, seconds=s) for name, s in seconds.items()}


def ratio(numerator: Timing, denominator: Timing) -> float:
    """Ratio of medians, e.g. OHEM time / CE time."""
    return numerator.median_s / denominator.median_s


@dataclass
class BenchOptions:
    """Options shared by every benchmark section (set by ``tools/benchmark.py``)."""

    device: str = "cpu"
    repeats: int = 10
    warmup: int = 3
    quick: bool = False  # smaller sizes and fewer repeats, for smoke tests
    # The train_step section's batch sizes and crops ((batch, height, width) each; None: the
    # device's default) and which of its comparisons to run (None: all that apply).
    train_step_sizes: tuple[tuple[int, int, int], ...] | None = None
    train_step_groups: tuple[str, ...] | None = None


@dataclass
class Section:
    """What one benchmark section returns: a markdown table, JSON records, and what it skipped.

    Each ``seg/bench/<area>.py`` exposes ``run(options: BenchOptions) -> Section``.
    """

    title: str
    markdown: str
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

"""Smoke test of the CPU training-iteration benchmark section (tiny crops, one round)."""

from __future__ import annotations

import pytest
import torch

from seg.bench.cpu_training import WORKERS, run, thread_counts
from seg.bench.timing import BenchOptions


@pytest.mark.slow
def test_cpu_training_section_times_every_split_of_the_cores() -> None:
    threads_before = torch.get_num_threads()
    section = run(BenchOptions(device="cpu", quick=True, repeats=1, warmup=0))
    assert torch.get_num_threads() == threads_before  # each variant restores the setting
    assert {(r["num_workers"], r["torch_threads"]) for r in section.records} == {
        (w, t) for w in WORKERS for t in thread_counts()
    }
    for record in section.records:
        assert record["s_per_iteration"] > 0 and record["s_per_evaluation"] > 0
        assert record["batch_size"] == 2 and record["crop"] == [64, 128]
        assert record["val_images"] == 4
    (default,) = [
        r for r in section.records if (r["num_workers"], r["torch_threads"]) == (2, threads_before)
    ]
    assert default["vs_default"] == pytest.approx(1.0)
    assert "| loader workers | torch threads |" in section.markdown


def test_cpu_training_section_is_cpu_only() -> None:
    section = run(BenchOptions(device="cuda", quick=True))
    assert section.records == [] and "times the CPU" in section.skipped[0]

"""The training-step benchmark section runs (quick sizes) and reports what it measured."""

from __future__ import annotations

import pytest

from seg.bench.timing import BenchOptions
from seg.bench.train_step import make_batch, run


def test_bench_batch_is_loader_like() -> None:
    batch = make_batch((2, 64, 96), "cpu")
    assert batch["image"].dtype == batch["label"].dtype
    assert tuple(batch["image"].shape) == (2, 64, 96, 3)
    assert tuple(batch["label"].shape) == (2, 64, 96)
    assert int(batch["label"][:, -1].min()) == 255 and int(batch["label"][:, 0].max()) < 19


@pytest.mark.slow
def test_train_step_section_quick_cpu() -> None:
    section = run(BenchOptions(device="cpu", repeats=1, warmup=1, quick=True))
    names = [r["name"] for r in section.records]
    assert names == [
        "ce x5",
        "ohem x5",
        "plain eager fp32 NCHW",
        "tuned (trainer)",
        "tuned, matmul head upsampling",
    ]
    assert all(r["extra"]["images_per_s"] > 0 for r in section.records)
    assert "ohem x5" in section.markdown and "images/s" in section.markdown
    assert any("peak memory" in note for note in section.skipped)
    assert any("cuDNN benchmark variant" in note for note in section.skipped)
    assert not any(r["extra"]["cudnn_benchmark"] for r in section.records)


@pytest.mark.gpu
def test_train_step_section_quick_cuda() -> None:
    section = run(BenchOptions(device="cuda", repeats=1, warmup=1, quick=True))
    by_name = {r["name"]: r["extra"] for r in section.records}
    assert by_name["tuned (trainer)"]["cudnn_benchmark"] is True
    assert by_name["tuned, cuDNN benchmark off"]["cudnn_benchmark"] is False
    assert by_name["plain eager fp32 NCHW"]["precision"] == "fp32"
    assert by_name["tuned, matmul head upsampling"]["precision"] == "fp16"
    assert all(extra["peak_memory_mib"] > 0 for extra in by_name.values())

"""The training-step benchmark section runs (quick sizes) and reports what it measured."""

from __future__ import annotations

import pytest

from seg.bench.timing import BenchOptions
from seg.bench.train_step import make_batch, parse_groups, parse_sizes, run
from seg.errors import ConfigError


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


def test_sizes_and_groups_are_checked() -> None:
    assert parse_sizes(None) is None
    assert parse_sizes([[16, 352, 480], [8, 1024, 1024]]) == ((16, 352, 480), (8, 1024, 1024))
    assert parse_groups(None) == ("loss", "tuning", "cpu_layout")
    with pytest.raises(ConfigError, match=r"\[batch, height, width\].*\[16, 352\]"):
        parse_sizes([[16, 352]])
    with pytest.raises(ConfigError, match="positive"):
        parse_sizes([[0, 352, 480]])
    with pytest.raises(ConfigError, match=r"'upsample'.*head_upsample"):
        parse_groups(["upsample"])


def test_chosen_groups_at_chosen_sizes() -> None:
    """Only the asked-for comparison, once per size, each row naming its batch and crop."""
    options = BenchOptions(
        device="cpu",
        repeats=1,
        warmup=0,
        quick=True,
        train_step_sizes=((2, 32, 64), (3, 64, 32)),
        train_step_groups=("head_upsample",),
    )
    section = run(options)
    shapes = [
        (r["extra"]["batch"], r["extra"]["height"], r["extra"]["width"]) for r in section.records
    ]
    assert shapes == [(2, 32, 64), (2, 32, 64), (3, 64, 32), (3, 64, 32)]
    assert [r["name"] for r in section.records] == [
        "tuned, interpolate head upsampling",
        "tuned, matmul head upsampling",
    ] * 2
    assert "2 x 32x64" in section.markdown and "3 x 64x32" in section.markdown
    assert "batch 2 at 32x64, batch 3 at 64x32" in section.title

"""Smoke test of the benchmark tool: the model section in quick mode, outputs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seg.bench.report import main as benchmark_main
from seg.bench.report import parse_sections
from seg.errors import ConfigError


def test_quick_model_benchmark_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    code = benchmark_main(["quick=true", "sections=[model]", "device=cpu", f"out={out}"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["device"] == "cpu"
    assert results["machine"]["torch"] == torch.__version__
    (section,) = results["sections"]
    by_metric: dict[str, list[dict]] = {}
    for record in section["records"]:
        by_metric.setdefault(record["metric"], []).append(record)
    assert by_metric["parameters_without_aux"][0]["value"] == pytest.approx(3_358_627, rel=0.01)
    assert by_metric["parameters_with_aux"][0]["value"] == pytest.approx(5_231_487, rel=0.01)
    flops = {tuple(r["size"]): r["value"] for r in by_metric["flops"]}
    macs = {tuple(r["size"]): r["value"] for r in by_metric["macs"]}
    assert flops[(1, 3, 1024, 2048)] == pytest.approx(196.8e9, rel=0.02)
    assert macs[(1, 3, 1024, 2048)] == flops[(1, 3, 1024, 2048)] // 2
    variants = {r["name"] for r in by_metric["latency"]}
    assert {"fp32 NCHW", "fp32 channels_last"} <= variants
    for record in by_metric["latency"]:
        assert len(record["seconds"]) >= 1
        assert record["median_ms"] > 0
        assert record["images_per_s"] == pytest.approx(1000.0 / record["median_ms"])
    # What was not measured on CPU is said, not silently dropped.
    assert any("fp16" in reason for reason in section["skipped"])
    assert any("compile" in reason for reason in section["skipped"])
    markdown = (out / "results.md").read_text()
    assert "fp32 channels_last" in markdown
    assert f"cpu: {results['machine']['cpu']}" in markdown
    assert "Skipped" in markdown
    assert "fp32 NCHW" in capsys.readouterr().out


def test_bad_arguments_exit_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert benchmark_main(["sections=[model,bogus]", f"out={tmp_path}"]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        parse_sections("")
    if not torch.cuda.is_available():
        assert benchmark_main(["device=cuda", "sections=[model]", f"out={tmp_path}"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_profile_section_is_opt_in_and_reports_each_workload(tmp_path: Path) -> None:
    assert "profile" not in parse_sections(None)
    assert parse_sections("profile") == ["profile"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert (
        benchmark_main([f"device={device}", "sections=[profile]", "quick=true", f"out={tmp_path}"])
        == 0
    )
    section = json.loads((tmp_path / "results.json").read_text())["sections"][0]
    workloads = [r["workload"] for r in section["records"]]
    assert workloads[0].startswith("inference") and len(workloads) == 3
    assert any("ohem" in w for w in workloads) and any("ce x5" in w for w in workloads)
    for record in section["records"]:
        assert record["wall_ms"] > 0 and len(record["top"]) > 0
        if device == "cuda":  # kernel time is at most the wall time it was measured in
            assert 0 < record["device_ms"] <= record["wall_ms"] * 1.05
            assert record["kernel_launches"] > 0

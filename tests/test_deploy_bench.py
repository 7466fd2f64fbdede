"""Deployment benchmark section: PyTorch eager, ORT fp32 and ORT int8 side by side."""

from __future__ import annotations

import pytest
import torch

from seg.bench import deploy
from seg.bench.timing import BenchOptions
from seg.extras import DeployDependencyError


@pytest.mark.slow
def test_deploy_section_times_three_runtimes_with_thread_settings() -> None:
    section = deploy.run(BenchOptions(device="cpu", repeats=2, warmup=1, quick=True))
    latencies = [r for r in section.records if r["metric"] == "deploy_latency"]
    assert [r["name"] for r in latencies] == list(deploy.RUNTIMES)
    for record in latencies:
        assert record["size"] == [1, 3, 64, 128]
        assert len(record["seconds"]) == 2 and min(record["seconds"]) > 0
    settings = next(r for r in section.records if r["metric"] == "deploy_settings")
    assert settings["intra_op_threads"] == torch.get_num_threads() == settings["torch_threads"]
    assert settings["provider"] == "CPUExecutionProvider"
    assert settings["export_s"] > 0 and settings["quantize_s"] > 0
    assert "| 1x3x64x128 | ORT int8 |" in section.markdown
    assert f"intra-op {torch.get_num_threads()}" in section.markdown
    assert section.skipped == []


def test_deploy_section_without_the_extra_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise DeployDependencyError("ONNX export needs the 'deploy' extra (onnx is not installed)")

    monkeypatch.setattr(deploy, "require_deploy", missing)
    section = deploy.run(BenchOptions(device="cpu", quick=True))
    assert section.records == []
    assert section.skipped == ["ONNX export needs the 'deploy' extra (onnx is not installed)"]

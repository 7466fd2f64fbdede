"""Smoke test of the loss benchmark section (tiny tensors)."""

from __future__ import annotations

import pytest

from seg.bench.loss import make_batch, run
from seg.bench.timing import BenchOptions
from seg.losses import OhemCELoss


def test_loss_benchmark_quick_section() -> None:
    section = run(BenchOptions(quick=True, repeats=1, warmup=0))
    assert "forward + backward" in section.title
    names = {(r["extra"]["regime"], r["name"]) for r in section.records}
    assert names == {
        (regime, loss)
        for regime in ("random", "confident")
        for loss in ("ce", "ohem", "ohem[device]", "focal", "torch_ce")
    }
    for record in section.records:
        assert record["median_ms"] > 0 and len(record["seconds"]) == 1
        if record["name"] == "ce":
            assert record["extra"]["ratio_vs_ce"] == pytest.approx(1.0)
    kept = {r["extra"]["regime"]: r["extra"]["ohem_kept_fraction"] for r in section.records}
    assert kept["random"] > 0.5  # threshold path: most pixels hard
    assert kept["confident"] == pytest.approx(1 / 16, abs=1e-3)  # top-n_min path
    assert "| confident | ohem |" in section.markdown


def test_bench_regimes_take_the_intended_ohem_path() -> None:
    for regime, hard in (("random", True), ("confident", False)):
        logits, labels = make_batch(regime, (1, 19, 32, 64), "cpu")
        _, stats = OhemCELoss().forward_with_stats(logits.detach(), labels)
        assert (stats["kept_fraction"].item() > 1 / 16) is hard
    with pytest.raises(ValueError, match="unknown regime"):
        make_batch("easy", (1, 19, 8, 8), "cpu")

"""The loss comparison: planning, statistics, verdicts, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from seg.compare import (
    RunResult,
    plan_runs,
    rare_classes,
    summarize,
    train_overrides,
    verdicts,
)
from seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def result(loss: str, seed: int, miou: float, class_iou: list[float]) -> RunResult:
    return RunResult(
        loss, seed, f"runs/{loss}-seed{seed}", 10, miou, class_iou, [(5, miou / 2), (10, miou)], 0.5
    )


def test_plan_interleaves_losses_and_names_run_dirs(tmp_path: Path) -> None:
    specs = plan_runs(["ohem", "ce"], [0, 1], tmp_path)
    assert [s.name for s in specs] == ["ohem-seed0", "ce-seed0", "ohem-seed1", "ce-seed1"]
    assert specs[0].run_dir == tmp_path / "runs" / "ohem-seed0"
    with pytest.raises(ConfigError, match="must not repeat"):
        plan_runs(["ohem", "ohem"], [0], tmp_path)
    with pytest.raises(ConfigError, match="at least one"):
        plan_runs([], [0], tmp_path)


def test_train_overrides_drop_the_comparison_keys() -> None:
    task = [
        "+experiment=synthcity_ohem",
        "losses=[ohem,ce]",
        "seeds=[0,1]",
        "trainer.max_iters=9",
        "hydra.run.dir=x",
    ]
    assert train_overrides(task) == ["+experiment=synthcity_ohem", "trainer.max_iters=9"]


def test_rare_classes_are_the_least_frequent_third() -> None:
    pixels = [900, 5, 800, 7, 600, 1]
    assert rare_classes(pixels) == [1, 5]


def test_summary_statistics_and_rare_miou() -> None:
    results = [
        result("ohem", 0, 0.50, [0.9, 0.1, 0.5]),
        result("ohem", 1, 0.54, [0.9, 0.3, math.nan]),
        result("ce", 0, 0.40, [0.8, 0.0, 0.4]),
        result("ce", 1, 0.44, [0.8, 0.2, 0.4]),
    ]
    ohem, ce = summarize(results, ["ohem", "ce"], rare=[1])
    assert ohem.miou == [0.50, 0.54]
    assert ohem.miou_mean == pytest.approx(0.52)
    assert ohem.miou_std == pytest.approx(math.sqrt(0.0008))  # sample std of 0.50, 0.54
    assert ohem.rare_miou_mean == pytest.approx(0.2)
    assert ohem.class_iou_mean[2] == pytest.approx(0.5)  # NaN of seed 1 left out
    assert ce.rare_miou_mean == pytest.approx(0.1)


def test_differences_within_the_seed_spread_are_not_called_wins() -> None:
    noisy = summarize(
        [
            result("ohem", 0, 0.50, [0.5]),
            result("ohem", 1, 0.56, [0.5]),
            result("ce", 0, 0.51, [0.5]),
            result("ce", 1, 0.53, [0.5]),
        ],
        ["ohem", "ce"],
        rare=[0],
    )
    assert "within the seed spread" in verdicts(noisy)[0]
    clear = summarize(
        [
            result("ohem", 0, 0.60, [0.5]),
            result("ohem", 1, 0.61, [0.5]),
            result("ce", 0, 0.50, [0.5]),
            result("ce", 1, 0.51, [0.5]),
        ],
        ["ohem", "ce"],
        rare=[0],
    )
    assert "ohem ahead" in verdicts(clear)[0]


@pytest.mark.slow
def test_compare_tool_trains_every_loss_and_seed_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    command = [
        sys.executable,
        str(REPO / "tools" / "compare.py"),
        "+experiment=synthcity_ohem",
        "losses=[ohem,focal]",
        "seeds=[0,1]",
        "trainer.max_iters=4",
        "trainer.eval_interval=2",
        "trainer.log_interval=2",
        "loader.batch_size=2",
        "loader.num_workers=0",
        f"dataset.root={tmp_path / 'synth'}",
        "dataset.generator.num_train=6",
        "dataset.generator.num_val=2",
        "dataset.generator.height=64",
        "dataset.generator.width=128",
        "dataset.crop_size=[64,64]",
        f"hydra.run.dir={out}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["loss"] for s in report["summaries"]] == ["ohem", "focal"]
    assert sorted((r["loss"], r["seed"]) for r in report["runs"]) == [
        ("focal", 0),
        ("focal", 1),
        ("ohem", 0),
        ("ohem", 1),
    ]
    for run in report["runs"]:
        assert run["iteration"] == 4
        assert [step for step, _ in run["curve"]] == [2, 4]
        stored = (Path(run["run_dir"]) / ".hydra" / "config.yaml").read_text()
        assert f"name: {run['loss']}" in stored  # the loss override reached the run
    assert (out / "miou_curves.png").stat().st_size > 0
    assert (out / "class_iou.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "mIoU mean +- std" in text and "Rare classes" in text
    # All runs log under one TensorBoard root.
    runs_with_events = {p.parents[1].name for p in out.glob("runs/*/tb/**/events.out.tfevents.*")}
    assert runs_with_events == {"ohem-seed0", "ohem-seed1", "focal-seed0", "focal-seed1"}
    # Restarting with the same folder reuses finished runs instead of training again.
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished earlier") == 4

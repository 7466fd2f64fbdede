"""The loss comparison: the sweep's plan, statistics, verdicts, the report's refusals, and
tiny end-to-end runs (joblib launcher through tools/compare.py; submitit_local through
tools/train.py -m, with a preempted job requeued, then the report step alone)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg.checkpoint import save_checkpoint
from seg.compare.report import class_weight_lines
from seg.compare.runs import RunResult, read_sweep
from seg.compare.stats import rare_classes, summarize
from seg.compare.sweep import launcher_overrides, main, plan_sweep, train_overrides
from seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def result(loss: str, seed: int, miou: float, class_iou: list[float]) -> RunResult:
    return RunResult(
        loss, seed, f"runs/{loss}-seed{seed}", 10, miou, class_iou, [(5, miou / 2), (10, miou)], 0.5
    )


def test_plan_interleaves_losses_in_the_sweep_order() -> None:
    """Seeds first on the command line: Hydra's job order is then ohem-seed0, ce-seed0,
    ohem-seed1, ce-seed1 (fair to machine drift). Job folders are named by configs/train.yaml
    hydra.sweep.subdir."""
    available = {"ohem", "ce", "focal"}
    assert plan_sweep(["ohem", "ce"], [0, 1], available) == ["seed=0,1", "loss=ohem,ce"]
    with pytest.raises(ConfigError, match="must not repeat"):
        plan_sweep(["ohem", "ohem"], [0], available)
    with pytest.raises(ConfigError, match="at least one"):
        plan_sweep([], [0], available)
    with pytest.raises(ConfigError, match="unknown loss"):
        plan_sweep(["ohem", "dice"], [0], available)


def test_train_overrides_drop_the_comparison_keys() -> None:
    task = [
        "+experiment=synthcity_ohem",
        "losses=[ohem,ce]",
        "seeds=[0,1]",
        "trainer.max_iters=9",
        "hydra.run.dir=x",
        "resume=auto",
        "sweep_dir=y",
        "bootstrap_replicates=500",
        "report_device=cpu",
    ]
    assert train_overrides(task) == ["+experiment=synthcity_ohem", "trainer.max_iters=9"]
    hydra = [
        "hydra.run.dir=x",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=3",
        "hydra.mode=RUN",
    ]
    assert launcher_overrides(hydra) == ["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"]


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


def fake_run(
    sweep: Path,
    loss: str,
    seed: int,
    iteration: int,
    max_iters: int = 30,
    loss_config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """A job folder of a sweep whose last.pt says how far the run got (``loss_config``: more
    keys of its loss config; ``extra``: more top-level keys of its stored config)."""
    folder = sweep / f"{loss}-seed{seed}"
    (folder / ".hydra").mkdir(parents=True)
    config = {
        "experiment_name": "synthcity_ohem",
        "seed": seed,
        "loss": {"name": loss, **(loss_config or {})},
        "trainer": {"max_iters": max_iters, "eval_interval": 10},
        "loader": {"batch_size": 2, "num_workers": 0},
        "dataset": {"name": "synthcity", "root": str(sweep / "data"), "class_names": ["a"]},
        **(extra or {}),
    }
    metrics = {"val": {"mIoU": 0.5, "IoU": [0.5]}}
    save_checkpoint(
        folder / "checkpoints" / "last.pt",
        {"config": config, "iteration": iteration, "metrics": metrics},
    )
    return folder


def report_errors(sweep: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    status = main([f"sweep_dir={sweep}", *args])
    assert status == 1  # the work is incomplete: nothing is reported
    assert not (sweep / "report.md").exists() and not (sweep / "report.json").exists()
    return capsys.readouterr().err.strip().splitlines()


def test_a_run_short_of_its_budget_is_never_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15, case 2: an OHEM run stopped by SIGTERM at iteration 11 of 30 was set beside
    a 30-iteration CE run as one budget ("ohem - ce: -4.71") with exit status 0."""
    sweep = tmp_path / "sweep"
    fake_run(sweep, "ohem", 0, iteration=11)
    fake_run(sweep, "ce", 0, iteration=30)
    (line,) = report_errors(sweep, capsys)
    assert line.startswith("error: not every run reached its budget")
    assert "ohem-seed0 stopped at iteration 11 of 30" in line and "ce-seed0" not in line


def test_runs_of_different_budgets_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    fake_run(sweep, "ohem", 0, iteration=30, max_iters=30)
    fake_run(sweep, "ce", 0, iteration=40, max_iters=40)
    (line,) = report_errors(sweep, capsys)
    assert "not one budget" in line
    assert "trainer.max_iters: 40 in ce-seed0, 30 in ohem-seed0" in line


def test_a_missing_run_of_the_grid_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    fake_run(sweep, "ohem", 0, iteration=30)
    fake_run(sweep, "ce", 0, iteration=30)
    (line,) = report_errors(sweep, capsys, "losses=[ohem,ce]", "seeds=[0,1]")
    assert "lacks run(s) ohem-seed1, ce-seed1" in line
    (folder := sweep / "focal-seed0" / ".hydra").mkdir(parents=True)  # a job that never saved
    (line,) = report_errors(sweep, capsys)
    assert f"{folder.parent} (no checkpoints/last.pt)" in line


def test_a_weighted_cross_entropy_is_swept_and_read_beside_the_other_losses(
    tmp_path: Path,
) -> None:
    """configs/loss/ce_weighted.yaml is a loss of the sweep, and its runs (a stored list of
    class weights and the record that it came from auto) are one budget with the others."""
    available = {p.stem for p in (REPO / "configs" / "loss").glob("*.yaml")}
    losses = ["ohem", "ce", "ce_weighted", "focal"]
    assert plan_sweep(losses, [0], available) == ["seed=0", "loss=ohem,ce,ce_weighted,focal"]
    sweep = tmp_path / "sweep"
    for loss in ("ohem", "ce"):
        fake_run(sweep, loss, 0, iteration=30, loss_config={"class_weight": None})
    fake_run(
        sweep,
        "ce_weighted",
        0,
        iteration=30,
        loss_config={"class_weight": [0.7]},
        extra={"resolved_from": {"loss": {"class_weight": "auto"}}},
    )
    read = read_sweep(sweep)
    assert sorted(read.losses) == ["ce", "ce_weighted", "ohem"]
    runs = {r.loss: r for r in read.results}
    assert runs["ce_weighted"].run_dir == str(sweep / "ce_weighted-seed0")
    assert runs["ce_weighted"].class_weight == [0.7] and runs["ce_weighted"].class_weight_auto
    assert runs["ce"].class_weight is None and not runs["ce"].class_weight_auto
    # The report names the weights each loss trained with.
    lines = class_weight_lines(read.results, ["a"])
    assert lines[-1] == "- ce_weighted (auto, median frequency of the train split): a 0.7000"
    assert len(lines) == 4  # a blank line, the heading, a blank line, ce_weighted alone


# ------------------------------------------------------------------------------ end to end
def tiny_overrides(tmp_path: Path) -> list[str]:
    """SynthCity at 32x64 (6 train / 2 val images) on the CPU."""
    return [
        f"dataset.root={tmp_path / 'synth'}",
        "dataset.generator.num_train=6",
        "dataset.generator.num_val=2",
        "dataset.generator.height=32",
        "dataset.generator.width=64",
        "dataset.crop_size=[32,64]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "schedule.warmup_iters=1",
    ]


def check_report(sweep: Path, losses: list[str], seeds: list[int], iterations: int) -> dict:
    report = json.loads((sweep / "report.json").read_text())
    assert [s["loss"] for s in report["summaries"]] == losses
    expected = sorted((loss, seed) for loss in losses for seed in seeds)
    assert sorted((r["loss"], r["seed"]) for r in report["runs"]) == expected
    for run in report["runs"]:
        assert run["iteration"] == iterations
        assert Path(run["run_dir"]) == sweep / f"{run['loss']}-seed{run['seed']}"
        stored = (Path(run["run_dir"]) / ".hydra" / "config.yaml").read_text()
        assert f"name: {run['loss']}" in stored  # the loss override reached the run
    assert (sweep / "miou_curves.png").stat().st_size > 0
    assert (sweep / "class_iou.png").stat().st_size > 0
    text = (sweep / "report.md").read_text()
    assert "mIoU mean +- std" in text and "Rare classes" in text
    # Every pair of losses has its mIoU difference with an interval, per class in JSON.
    pairs = report["bootstrap"]["pairs"]
    assert len(pairs) == len(losses) * (len(losses) - 1) // 2
    assert report["bootstrap"]["seeds"] == len(seeds)
    for pair, line in zip(pairs, report["verdicts"], strict=True):
        low, high = pair["mIoU"]["low"], pair["mIoU"]["high"]
        assert low <= pair["mIoU"]["estimate"] <= high
        assert line in text and "95% CI [" in line
        assert len(pair["IoU"]) == len(report["summaries"][0]["class_iou_mean"])
    for run in report["runs"]:
        assert (Path(run["run_dir"]) / "per_image_confusion.npz").is_file()
    return report


def wait_for(logs: list[Path], text: str, process: subprocess.Popen, seconds: float) -> None:
    """Until every log holds ``text`` (or the process ended, or time ran out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if all(log.is_file() and text in log.read_text() for log in logs):
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_compare_on_joblib_survives_ctrl_c_and_writes_the_report(tmp_path: Path) -> None:
    """Ctrl-C stops the comparison with 130 after both parallel jobs saved, and no report;
    the same command again continues both runs and writes the report."""
    out = tmp_path / "cmp"
    max_iters = 16
    command = [
        sys.executable,
        str(REPO / "tools" / "compare.py"),
        "+experiment=synthcity_ohem",
        "losses=[ohem,focal]",
        "seeds=[0]",
        f"trainer.max_iters={max_iters}",
        f"trainer.eval_interval={max_iters // 2}",
        "trainer.log_interval=1",
        *tiny_overrides(tmp_path),
        f"hydra.run.dir={out}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    first = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a shell's job
    )
    logs = [out / name / "train.log" for name in ("ohem-seed0", "focal-seed0")]
    wait_for(logs, f"iter 2/{max_iters}", first, seconds=300)
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 130, output[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in output  # the launcher asked for
    assert "the sweep was stopped (SIGINT); no report" in output
    assert not (out / "report.md").exists()
    for log in logs:
        assert "stopped (SIGINT) at iteration" in log.read_text()

    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    report = check_report(out, ["ohem", "focal"], [0], iterations=max_iters)
    for run in report["runs"]:
        assert [step for step, _ in run["curve"]] == [max_iters // 2, max_iters]
    for log in logs:
        assert "resume=auto: continuing this job's run" in log.read_text()
    assert report["command"].startswith("python tools/compare.py +experiment=synthcity_ohem")
    assert "loss=ohem,focal" in report["setup"]["sweep"]  # the sweep, as Hydra recorded it
    # All runs log under one TensorBoard root: the comparison folder.
    runs_with_events = {p.parent.name for p in out.glob("*/events.out.tfevents.*")}
    assert runs_with_events == {"ohem-seed0", "focal-seed0"}


def submitit_tasks(sweep: Path) -> list[int]:
    """The process ids of the running submitit job processes of ``sweep`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in text and str(sweep) in text:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
def test_submitit_sweep_survives_preemption_and_the_report_step_reads_it(tmp_path: Path) -> None:
    """tools/train.py -m on submitit_local: both jobs get SIGUSR2 (submitit's preemption
    signal) mid-run, save last.pt, are requeued by submitit and resume their own folders;
    then tools/compare.py sweep_dir=... reports on the finished sweep."""
    sweep = tmp_path / "sweep"
    max_iters = 12
    command = [
        sys.executable,
        str(REPO / "tools" / "train.py"),
        "-m",
        "+experiment=synthcity_ce",
        *tiny_overrides(tmp_path),
        f"trainer.max_iters={max_iters}",
        f"trainer.eval_interval={max_iters // 2}",
        "trainer.log_interval=1",
        "trainer.ckpt_interval=1000",
        "seed=0,1",
        "resume=auto",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    logs = [sweep / f"ce-seed{seed}" / "train.log" for seed in (0, 1)]
    wait_for(logs, f"iter 2/{max_iters}", process, seconds=300)
    signalled = submitit_tasks(sweep)
    for pid in signalled:
        os.kill(pid, signal.SIGUSR2)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert len(signalled) == 2, output[-3000:]
    for log in logs:
        text = log.read_text()
        assert "stopped (SIGUSR2) at iteration" in text, text[-2000:]
        assert "resume=auto: continuing this job's run" in text
        assert f"iter {max_iters}/{max_iters}" in text
    report_only = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare.py"), f"sweep_dir={sweep}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report_only.returncode == 0, report_only.stderr[-3000:]
    report = check_report(sweep, ["ce"], [0, 1], iterations=max_iters)
    assert report["command"].startswith("python tools/train.py -m +experiment=synthcity_ce")
    assert report["summaries"][0]["seeds"] == [0, 1]

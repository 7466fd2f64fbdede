"""Every tool is a Hydra app: --help, --cfg job, and a mistyped override or missing value
is one `error:` line on stderr with exit status 2 (seg/cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TOOLS = [
    "train",
    "eval",
    "predict",
    "export",
    "compare",
    "benchmark",
    "check_dataset",
    "make_synthcity",
    "convert_annotations",
]


def run_tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "tools" / f"{name}.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("name", TOOLS)
def test_help(name: str, tmp_path: Path) -> None:
    done = run_tool(name, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert len(done.stdout.splitlines()) >= 3
    assert not list(tmp_path.iterdir())  # --help writes nothing


@pytest.mark.parametrize("name", ["check_dataset", "make_synthcity"])
def test_mistyped_dataset_override_is_one_line(name: str, tmp_path: Path) -> None:
    done = run_tool(name, "dataset.rooot=x", cwd=tmp_path)
    assert done.returncode == 2
    output = (done.stdout + done.stderr).strip()
    assert len(output.splitlines()) == 1 and "dataset.rooot" in output, output


@pytest.mark.slow
@pytest.mark.parametrize("name", TOOLS)
def test_cfg_job_prints_the_config_and_writes_nothing(name: str, tmp_path: Path) -> None:
    done = run_tool(name, "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert OmegaConf.create(done.stdout)  # the composed config, as YAML
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", [t for t in TOOLS if t not in ("check_dataset", "make_synthcity")])
def test_every_tool_answers_a_mistyped_key_with_one_line(name: str, tmp_path: Path) -> None:
    done = run_tool(name, "nosuchkey=1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-1000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nosuchkey" in lines[0]
    assert not done.stdout.strip() and not list(tmp_path.iterdir())


def test_a_missing_required_value_is_one_line(tmp_path: Path) -> None:
    done = run_tool("eval", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: ckpt=PATH is required (the checkpoint to evaluate)"
    ]


def test_failing_jobs_of_a_sweep_each_say_why_and_the_sweep_fails(tmp_path: Path) -> None:
    """Every job runs (the basic launcher goes on after a failure), each failure is one
    line naming its job folder, and the sweep ends with the jobs' status."""
    done = run_tool(
        "train", "-m", "+experiment=cityscapes_ohem", "seed=0,1", "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, done.stderr  # one per job, then the sweep's
    for seed, line in zip((0, 1), errors, strict=False):
        assert f"sweep/ohem-seed{seed}]" in line and "dataset root not found" in line
    assert errors[2].startswith("error: the sweep did not finish: [job 0, ")

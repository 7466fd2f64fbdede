"""Every tool answers --help, and a mistyped override is one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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

"""The house rules of docs/architecture.md hold: the floors (import-linter's contracts in
pyproject.toml, run as ``make lint`` runs them) and the size of a module.

A copy of the package with one planted upward import (inside a function, where a lazy
import would hide it from a reader) shows that the contract check can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The most lines a module of seg/ may have (docs/architecture.md, "House rules").
MAX_MODULE_LINES = 600
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
)


def lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with this project's contracts on the ``seg`` found in ``package_parent``."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_floors_and_has_no_import_circles() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_lazy_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "seg", tmp_path / "seg", ignore=shutil.ignore_patterns("__pycache__"))
    losses = tmp_path / "seg" / "losses" / "__init__.py"
    with losses.open("a") as file:
        file.write("\n\ndef _planted() -> None:\n    from seg.engine import step  # noqa: F401\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "seg.losses is not allowed to import seg.engine" in result.stdout


def test_no_module_of_seg_is_over_the_line_limit() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in sorted((ROOT / "seg").rglob("*.py"))
    }
    too_long = {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert len(sizes) > 50  # the walk found the package
    assert not too_long, f"over {MAX_MODULE_LINES} lines; cut at a seam: {too_long}"

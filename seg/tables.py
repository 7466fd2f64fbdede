"""Markdown tables for reports: metrics, dataset checks, comparisons and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence


def format_cell(value: object) -> str:
    """A table cell: floats with 3 significant digits (whole numbers from 1000 on)."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    align: Sequence[str] | None = None,
) -> str:
    """A GitHub markdown table.

    Args:
        header: column titles.
        rows: one sequence of cells per row (floats go through :func:`format_cell`).
        align: per column ``"left"`` or ``"right"`` (default: GitHub's own, left).
    """
    rule = {"left": "---", "right": "---:"}
    marks = [rule[a] for a in align] if align is not None else ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

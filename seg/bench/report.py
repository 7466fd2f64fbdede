"""Benchmark orchestration: run sections, write results.json/.md with the machine's facts.

``tools/benchmark.py`` (config ``configs/benchmark.yaml``) calls :func:`benchmark`, which
checks the settings and calls ``run_benchmark``; :func:`main` does the same in-process.
Each section is a module ``seg.bench.<name>`` exposing ``run(options: BenchOptions) ->
Section``, listed in :data:`SECTIONS`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from seg import dist
from seg.bench import cpu_training, deploy, loader, loss, model, profile, train_step
from seg.bench.timing import BenchOptions, Section
from seg.cli import run_in_process
from seg.errors import ConfigError
from seg.fileio import write_text_atomic
from seg.machine import describe_machine

#: The sections, in the order they run: name -> its ``run(options) -> Section``.
SECTIONS: dict[str, Callable[[BenchOptions], Section]] = {
    "model": model.run,
    "loss": loss.run,
    "loader": loader.run,
    "train_step": train_step.run,
    "deploy": deploy.run,
    "profile": profile.run,
    "cpu_training": cpu_training.run,
}
#: What ``sections: null`` runs: all but the opt-in profile (it explains, it does not time)
#: and cpu_training (minutes of training on the CPU: the demo's settings, docs/benchmarks.md).
DEFAULT_SECTIONS = ("model", "loss", "loader", "train_step", "deploy")


def parse_sections(text: str | Sequence[str] | None) -> list[str]:
    """``"model,loss"`` or ``["model", "loss"]`` -> ``["model", "loss"]``, checked against
    ``SECTIONS``; ``None``: :data:`DEFAULT_SECTIONS`."""
    if text is None:
        return list(DEFAULT_SECTIONS)
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    names = [name.strip() for name in items if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise ConfigError(
            f"unknown benchmark section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)}"
        )
    return names


def run_sections(names: Sequence[str], options: BenchOptions) -> list[Section]:
    """Run each named section in turn."""
    sections: list[Section] = []
    for name in names:
        print(f"running section {name!r} ...", flush=True)
        sections.append(SECTIONS[name](options))
    return sections


def render_markdown(machine: dict[str, Any], sections: Sequence[Section]) -> str:
    """The human-readable report: machine, then each section with what it skipped."""
    lines = ["# Benchmark results", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items() if value is not None]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.markdown]
        if section.skipped:
            lines += ["", "Skipped:"] + [f"- {reason}" for reason in section.skipped]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, machine: dict[str, Any], sections: Sequence[Section]) -> str:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine,
        "sections": [
            {
                "title": s.title,
                "records": s.records,
                "skipped": s.skipped,
                "markdown": s.markdown,
            }
            for s in sections
        ],
    }
    write_text_atomic(out_dir / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    markdown = render_markdown(machine, sections)
    write_text_atomic(out_dir / "results.md", markdown)
    return markdown


def default_out_dir() -> Path:
    """``outputs/benchmark/<timestamp>``."""
    return Path("outputs") / "benchmark" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_benchmark(
    sections: Sequence[str], options: BenchOptions, out_dir: Path | None = None
) -> tuple[str, Path]:
    """Run ``sections`` with ``options`` and write the results; returns (markdown, out_dir)."""
    options.device = str(dist.resolve_device(options.device, "--device"))
    machine = describe_machine(options.device)
    if torch.device(options.device).type != "cuda":
        print(
            "no CUDA device used: running the CPU subset (GPU-only variants are listed as skipped)",
            flush=True,
        )
    done = run_sections(sections, options)
    out_dir = out_dir if out_dir is not None else default_out_dir()
    return write_results(out_dir, machine, done), out_dir


def benchmark(cfg: Any) -> int:
    """``tools/benchmark.py``'s work (configs/benchmark.yaml): run, print, write."""
    if int(cfg.repeats) < 1 or int(cfg.warmup) < 0:
        raise ConfigError(
            f"repeats must be >= 1 and warmup >= 0, got repeats={cfg.repeats}, warmup={cfg.warmup}"
        )
    step_cfg = cfg.get("train_step") or {}
    sizes, groups = step_cfg.get("sizes"), step_cfg.get("groups")
    options = BenchOptions(
        device=str(cfg.device),
        repeats=int(cfg.repeats),
        warmup=int(cfg.warmup),
        quick=bool(cfg.quick),
        train_step_sizes=train_step.parse_sizes(sizes),
        train_step_groups=None if groups is None else train_step.parse_groups(groups),
    )
    out = Path(str(cfg.out)) if cfg.get("out") else None
    markdown, out_dir = run_benchmark(parse_sections(cfg.get("sections")), options, out)
    print(markdown)
    print(f"results written to {out_dir}/results.json and results.md")
    return 0


def main(argv: Sequence[str]) -> int:
    """``tools/benchmark.py ARGS`` in this process; returns its exit status."""
    return run_in_process("benchmark", argv, benchmark)

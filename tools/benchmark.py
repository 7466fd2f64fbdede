"""Benchmark the model, losses, loader and training step; writes results.json and results.md.

Examples:
    python tools/benchmark.py                          # all sections, CUDA if available
    python tools/benchmark.py --sections model --quick # smoke run, seconds
    python tools/benchmark.py --device cpu --repeats 20 --out outputs/benchmark/cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seg.bench.report import SECTIONS, parse_sections, run_benchmark
from seg.bench.timing import BenchOptions
from seg.errors import ConfigError, SegError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default outputs/benchmark/<time>)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.repeats < 1 or args.warmup < 0:
            raise ConfigError(
                f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}"
            )
        options = BenchOptions(
            device=args.device, repeats=args.repeats, warmup=args.warmup, quick=args.quick
        )
        markdown, out_dir = run_benchmark(parse_sections(args.sections), options, args.out)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"results written to {out_dir}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

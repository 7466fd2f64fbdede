"""Benchmark the model, losses, loader, training step and CPU deployment (PyTorch vs ONNX
Runtime fp32 / int8); writes results.json and results.md.

Examples:
    python tools/benchmark.py                              # all sections, CUDA if available
    python tools/benchmark.py sections=[model] quick=true  # smoke run, seconds
    python tools/benchmark.py device=cpu repeats=20 out=outputs/benchmark/cpu
    python tools/benchmark.py device=cpu sections=[deploy] # needs the deploy extra

Settings: configs/benchmark.yaml; logic: seg/bench/. Exit status: 0 done, 2 bad setting.
"""

import hydra
from omegaconf import DictConfig

from seg.bench.report import benchmark
from seg.cli import run_app, run_job


@hydra.main(config_path="../configs", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(benchmark, cfg)


if __name__ == "__main__":
    run_app(main)

"""What a training checkpoint holds and how a run gets it back: progress, RNG, resume.

A checkpoint (contract in docs/architecture.md) is the states of the model, optimizer,
LR schedule, GradScaler and loss (GHM-C's moving bin counts; empty for the other losses),
the :class:`TrainState` (iteration, metrics, best mIoU, skip
counts), the global RNG states and the resolved config. Only tensors and plain containers
go in, so that ``torch.load(weights_only=True)`` reads it back (``seg.engine.checkpoint``).

Resuming (``resume=...``):

- ``resume=PATH``: continue from that checkpoint;
- ``resume=auto``: continue from the newest ``checkpoints/last.pt`` (by modification time)
  among the sibling run folders, i.e. ``outputs/<experiment_name>/*/checkpoints/last.pt``;
  with none there, training starts afresh.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg.engine.step import TrainStep
from seg.errors import CheckpointError, ConfigError, first_line


# ----------------------------------------------------------------------------- progress
@dataclass
class TrainState:
    """Where a run stands, besides the states of its model and optimizer.

    Attributes:
        iteration: steps taken.
        metrics: the last evaluation (plain floats and lists, fractions in [0, 1]).
        best_miou, best_iteration: the best val mIoU so far and where (``-inf``/-1: none).
        nonfinite_steps, nonfinite_streak: skipped steps in total and the current run of
            consecutive ones, as of the last checkpoint (the loop keeps the live counts).
        stopped_by: ``"SIGINT"``/``"SIGTERM"``/``"peer"`` when a run was interrupted.
    """

    iteration: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    best_miou: float = -math.inf
    best_iteration: int = -1
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    stopped_by: str | None = None

    def improved(self, miou: float) -> bool:
        """True (and recorded) when ``miou`` beats the best so far."""
        if math.isnan(miou) or miou <= self.best_miou:
            return False
        self.best_miou, self.best_iteration = miou, self.iteration
        return True


def checkpoint_payload(
    model: nn.Module, step: TrainStep, state: TrainState, config: Mapping[str, Any]
) -> dict[str, Any]:
    """The checkpoint dict of a run (rank 0's RNG states)."""
    return {
        "model": model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "loss": step.criterion.state_dict(),
        "iteration": state.iteration,
        "rng": capture_rng_state(),
        "config": dict(config),
        "metrics": {
            "val": plain(state.metrics),
            "best_mIoU": state.best_miou if state.best_miou > -math.inf else None,
            "best_iteration": state.best_iteration,
            "nonfinite_steps": state.nonfinite_steps,
            "nonfinite_streak": state.nonfinite_streak,
        },
    }


def restore(
    checkpoint: Mapping[str, Any], source: Path, model: nn.Module, step: TrainStep
) -> TrainState:
    """Load a checkpoint's states into ``model`` and ``step``; returns the run's progress.

    The RNG states are not applied here: the loop applies them once the data iterator
    exists, in the same order as in an uninterrupted run.

    Raises:
        CheckpointError: the checkpoint's states do not fit this config's model/optimizer.
    """
    try:
        model.load_state_dict(checkpoint["model"])
        step.optimizer.load_state_dict(checkpoint["optimizer"])
        step.scheduler.load_state_dict(checkpoint["scheduler"])
        if "loss" in checkpoint:  # checkpoints from before losses had state lack it
            step.criterion.load_state_dict(checkpoint["loss"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"cannot resume from {source}: it does not fit this config ({first_line(error, limit=200)})"
        ) from None
    scaler_state = checkpoint.get("scaler") or {}
    if step.scaler.is_enabled() and scaler_state:
        step.scaler.load_state_dict(scaler_state)
    metrics = checkpoint.get("metrics") or {}
    best = metrics.get("best_mIoU")
    return TrainState(
        iteration=int(checkpoint["iteration"]),
        metrics=dict(metrics.get("val") or {}),
        best_miou=float(best) if best is not None else -math.inf,
        best_iteration=int(metrics.get("best_iteration", -1)),
        nonfinite_steps=int(metrics.get("nonfinite_steps", 0)),
        nonfinite_streak=int(metrics.get("nonfinite_streak", 0)),
    )


def plain(value: Any) -> Any:
    """Metrics as plain floats/lists/dicts (checkpoint-safe, JSON-friendly)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- RNG state
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *(v for v in np_state[2:])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -------------------------------------------------------------------------------- resume
def find_auto_resume(run_dir: Path) -> Path | None:
    """Newest ``*/checkpoints/last.pt`` among ``run_dir``'s siblings (``outputs/<experiment>/*``)."""
    candidates = [p for p in run_dir.parent.glob("*/checkpoints/last.pt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_resume(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None, ``auto`` or a path (which must exist)."""
    if resume is None or resume is False or str(resume) == "":
        return None
    if str(resume) == "auto":
        return find_auto_resume(run_dir)
    path = Path(str(resume))
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    return path

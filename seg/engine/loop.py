"""The training loop: steps, periodic evaluation, checkpoints, clean stops.

:func:`fit` reads top to bottom like one iteration of training. The only host-device
syncs are at the log interval (reading the running sums), at evaluations and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from seg import dist
from seg.engine.build import TrainParts
from seg.engine.checkpoint import save_checkpoint
from seg.engine.logging import RunLog
from seg.engine.signals import StopSignals
from seg.engine.state import TrainState, checkpoint_payload, plain, restore_rng_state
from seg.engine.step import RunningStats
from seg.errors import CheckpointError, SegError, log_to_files

logger = logging.getLogger("seg.train")


class NonFiniteLossError(SegError):
    """Training stopped: the loss was NaN/inf for too many iterations in a row."""


def fit(
    parts: TrainParts,
    state: TrainState,
    run_dir: Path,
    log: RunLog,
    rng: Mapping[str, Any] | None = None,
) -> TrainState:
    """Train from ``state.iteration`` to ``max_iters``; returns the final state.

    ``rng``: the RNG states of the checkpoint being resumed (applied once the data
    iterator exists, as in an uninterrupted run). SIGINT/SIGTERM stop after the current
    step with ``last.pt`` saved and ``state.stopped_by`` set.

    Raises:
        NonFiniteLossError: ``trainer.max_nonfinite_steps`` non-finite losses in a row
            (after saving ``last.pt``, which holds the weights of the last finite step).
    """
    s = parts.settings
    stats = RunningStats(s.device, state.nonfinite_steps, state.nonfinite_streak)
    check_every = 1 if s.check_finite_every_step else s.log_interval
    # Handlers first: the loader workers forked by iter() inherit them (and ignore signals).
    with StopSignals() as stop:
        data = iter(parts.train_loader)
        if rng is not None:
            restore_rng_state(rng)
        parts.model.train()
        while state.iteration < s.max_iters:
            out = parts.step(next(data))
            stats.add(out)
            state.iteration += 1
            it = state.iteration
            log.step()
            final = it == s.max_iters
            log_now = it % s.log_interval == 0 or final
            streak = 0
            if log_now:
                values = stats.flush()  # the sync: the device-side sums come back here
                log.train(it, values, lr=float(parts.step.optimizer.param_groups[0]["lr"]))
                streak = int(values["max_nonfinite_streak"])
            elif it % check_every == 0:
                streak = stats.read_max_streak()
            if streak >= s.max_nonfinite_steps:
                path = save(parts, state, stats, run_dir, "last.pt")
                raise NonFiniteLossError(
                    f"the loss was not finite for {streak} iterations in a row "
                    f"(trainer.max_nonfinite_steps={s.max_nonfinite_steps}); stopped "
                    f"at iteration {it}; the weights of the last finite step are in {path}"
                )
            if it % s.eval_interval == 0 or final:
                evaluate(parts, state, stats, run_dir, log)
            if it % s.ckpt_interval == 0 or final:
                save(parts, state, stats, run_dir, "last.pt")
                log.restart_clock(it)
            if stop.agreed(log_now, s.device) and not final:
                path = save(parts, state, stats, run_dir, "last.pt")
                state.stopped_by = stop.reason
                logger.info(
                    "stopped (%s) at iteration %d; resume with resume=%s", stop.reason, it, path
                )
                break
    return state


def evaluate(
    parts: TrainParts, state: TrainState, stats: RunningStats, run_dir: Path, log: RunLog
) -> None:
    """Evaluate on the val split, report, and keep ``best.pt`` when the mIoU improved."""
    if dist.is_distributed():
        # Plain BatchNorm (DDP on CPU, where SyncBatchNorm does not run) keeps per-rank
        # statistics: give every rank rank 0's, so that all shards are scored by one model.
        for buffer in parts.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    panels = log.panel_collector(parts.settings.num_vis_images)
    metrics = parts.evaluator.evaluate(
        parts.model, parts.val_loader, parts.settings.device, progress=False, on_prediction=panels
    )
    parts.model.train()
    state.metrics = plain(metrics)
    log.evaluation(state.iteration, metrics, panels.panels)
    if state.improved(float(metrics["mIoU"])):
        path = save(parts, state, stats, run_dir, "best.pt")
        logger.info(
            "new best mIoU %.2f at iter %d -> %s", 100 * state.best_miou, state.iteration, path
        )
    log.restart_clock(state.iteration)


def save(
    parts: TrainParts, state: TrainState, stats: RunningStats, run_dir: Path, name: str
) -> Path:
    """Write ``checkpoints/<name>`` atomically (rank 0; other ranks only return the path)."""
    path = run_dir / "checkpoints" / name
    state.nonfinite_steps, state.nonfinite_streak = stats.skip_counts()
    if dist.is_main():
        try:
            save_checkpoint(path, checkpoint_payload(parts.model, parts.step, state, parts.config))
        except CheckpointError as error:  # e.g. a full disk: one line, in train.log too
            log_to_files(error)
            raise
    return path

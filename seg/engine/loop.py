"""The training loop: steps, periodic evaluation, checkpoints, clean stops.

:func:`fit` reads top to bottom like one iteration of training. An iteration is one
optimizer step over ``trainer.accumulate`` micro-batches. The only host-device syncs are
at the log interval (reading the running sums), at evaluations and checkpoints.

Checkpoints: ``checkpoints/last.pt`` every ``ckpt_interval`` iterations and at the end,
``best.pt`` when an evaluation's ``trainer.best_metric`` (mIoU by default) beats the best so
far, and with
``trainer.keep_snapshots=N`` the last N iteration snapshots ``iter_<iteration>.pt``
(written at the ``last.pt`` times; an older one is deleted only once the new one is
complete on disk).

Early stopping (``trainer.early_stop``, ``seg.engine.selection``): after an evaluation that
leaves ``patience`` evaluations in a row without an improvement of more than ``min_delta``,
the run writes ``last.pt``, says why in one line and ends (exit status 0). Each evaluation
also checks whether the predictions collapsed to one class (``seg.engine.collapse``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from seg import dist
from seg.checkpoint import save_checkpoint
from seg.engine.build import TrainParts, TrainSettings
from seg.engine.collapse import collapse_message
from seg.engine.logging import RunLog
from seg.engine.selection import stalled
from seg.engine.state import TrainState, checkpoint_payload, plain, restore_rng_state
from seg.engine.step import RunningStats
from seg.errors import CheckpointError, SegError, log_to_files
from seg.signals import StopSignals

logger = logging.getLogger("seg.train")

SNAPSHOT_PATTERN = re.compile(r"iter_(\d+)\.pt")


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
    step with ``last.pt`` saved and ``state.stopped_by`` set; early stopping ends the run
    after an evaluation, with ``last.pt`` saved and ``state.stopped_early`` set.

    Raises:
        NonFiniteLossError: ``trainer.max_nonfinite_steps`` non-finite losses in a row
            (after saving ``last.pt``, which holds the weights of the last finite step).
    """
    s = parts.settings
    stats = RunningStats(s.device, state.nonfinite_steps, state.nonfinite_streak)
    check_every = 1 if s.check_finite_every_step else s.log_interval
    log.config(parts.config, state.iteration)
    # Handlers first: the loader workers forked by iter() inherit them (and ignore signals).
    with StopSignals() as stop:
        data = iter(parts.train_loader)
        if rng is not None:
            restore_rng_state(rng)
        parts.model.train()
        while state.iteration < s.max_iters:
            out = parts.step([next(data) for _ in range(s.accumulate)])
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
            stop_early = False
            if it % s.eval_interval == 0 or final:
                evaluate(parts, state, stats, run_dir, log)
                stop_early = not final and stalled(state.evals_since_improvement, s.early_stop)
            if it % s.ckpt_interval == 0 or final or stop_early:
                save(parts, state, stats, run_dir, "last.pt", snapshot=True)
                log.restart_clock(it)
            if stop_early:  # every rank decides alike: the metrics are all-reduced
                state.stopped_early = True
                logger.info("%s", early_stop_line(state, s))
                break
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
    """Evaluate on the val split (the EMA weights when ``trainer.ema`` is on), report (a
    collapse to one class too), count the score for early stopping, and keep ``best.pt``
    when ``trainer.best_metric`` improved."""
    model = parts.eval_model
    what = "EMA" if model is not parts.model else "model"
    if dist.is_distributed():
        # Plain BatchNorm (DDP on CPU, where SyncBatchNorm does not run) keeps per-rank
        # statistics: give every rank rank 0's, so that all shards are scored by one model.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    evaluator, device = parts.evaluator, parts.settings.device
    collector = log.eval_collector(
        parts.settings.num_vis_images, evaluator.num_classes, evaluator.ignore_index, device
    )
    batches = log.eval_progress(parts.val_loader, f"eval {what} @ {state.iteration}")
    metrics = evaluator.evaluate(model, batches, device, progress=False, on_prediction=collector)
    confusion = collector.finish()
    parts.model.train()
    state.metrics = plain(metrics)
    s = parts.settings
    min_delta = s.early_stop.min_delta if s.early_stop is not None else 0.0
    improved = state.record(s.best_metric.value(metrics), min_delta)
    log.evaluation(
        state.iteration,
        metrics,
        collector.panels,
        confusion,
        state.best_score,
        what=what,
        collapse=collapse_message(confusion, parts.class_names),
    )
    if improved:
        path = save(parts, state, stats, run_dir, "best.pt")
        logger.info(
            "new best %s %.2f at iter %d -> %s",
            state.best_metric,
            100 * state.best_score,
            state.iteration,
            path,
        )
    log.restart_clock(state.iteration)


def early_stop_line(state: TrainState, settings: TrainSettings) -> str:
    """The one line that says why early stopping ended the run."""
    early = settings.early_stop
    assert early is not None  # only called when early stopping is on
    best = (
        f"best {state.best_metric} {100 * state.best_score:.2f} at iteration "
        f"{state.best_iteration} (best.pt)"
        if math.isfinite(state.best_score)
        else f"no evaluation had a defined {state.best_metric}"
    )
    return (
        f"early stop at iteration {state.iteration}: {state.best_metric} has not improved by "
        f"more than trainer.early_stop.min_delta={early.min_delta:g} for "
        f"{state.evals_since_improvement} evaluations (patience={early.patience}); {best}; "
        "last.pt saved"
    )


def save(
    parts: TrainParts,
    state: TrainState,
    stats: RunningStats,
    run_dir: Path,
    name: str,
    snapshot: bool = False,
) -> Path:
    """Write ``checkpoints/<name>`` atomically (rank 0; other ranks only return the path).

    ``snapshot``: also write ``iter_<iteration>.pt`` when ``trainer.keep_snapshots`` asks
    for snapshots, then delete the ones beyond the newest ``keep_snapshots``.
    """
    folder = run_dir / "checkpoints"
    path = folder / name
    state.nonfinite_steps, state.nonfinite_streak = stats.skip_counts()
    if dist.is_main():
        payload = checkpoint_payload(
            parts.model, parts.step, state, parts.config, parts.dataset_templates
        )
        try:
            save_checkpoint(path, payload)
            keep = parts.settings.keep_snapshots
            if snapshot and keep > 0:
                save_checkpoint(snapshot_path(folder, state.iteration), payload)
                prune_snapshots(folder, keep, state.iteration)
        except CheckpointError as error:  # e.g. a full disk: one line, in train.log too
            log_to_files(error)
            raise
    return path


def snapshot_path(folder: Path, iteration: int) -> Path:
    """``<folder>/iter_<iteration, 6 digits or more>.pt``."""
    return folder / f"iter_{iteration:06d}.pt"


def prune_snapshots(folder: Path, keep: int, iteration: int) -> list[Path]:
    """Delete all but the newest ``keep`` snapshots up to ``iteration``; returns the deleted.

    Snapshots of later iterations (left by a run that was resumed from an earlier
    checkpoint) are not this run's to judge and stay until it overwrites them.
    """
    snapshots = sorted(
        (int(match.group(1)), path)
        for path in folder.glob("iter_*.pt")
        if (match := SNAPSHOT_PATTERN.fullmatch(path.name)) and int(match.group(1)) <= iteration
    )
    doomed = [path for _, path in snapshots[: max(len(snapshots) - keep, 0)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed

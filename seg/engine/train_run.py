"""The training run behind ``tools/train.py``: from a config to a finished run folder.

One path, top to bottom: find the run folder and the checkpoint to resume, check the
settings and open the datasets (a bad value or a missing dataset stops here, before
anything is written), then with ``train.log`` open: build the parts
(``seg.engine.build``), restore the checkpoint (``seg.engine.state``) and train
(``seg.engine.loop``).

Run directory: Hydra's ``outputs/<experiment_name>/<timestamp>/`` (``hydra.run.dir`` in
``configs/train.yaml``) holding ``.hydra/``, ``train.log``, ``tb/`` and ``checkpoints/``.
A resumed run keeps writing into the run folder of the checkpoint it resumed (so
TensorBoard curves and ``train.log`` continue); the new timestamped folder only holds the
``.hydra/`` record of the resuming command. Resume options: ``seg.engine.state``.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from omegaconf import DictConfig

from seg import dist
from seg.engine.build import (
    TrainParts,
    build_datasets,
    build_parts,
    from_scratch_note,
    parse_settings,
)
from seg.engine.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from seg.engine.logging import RunLog, run_logging
from seg.engine.loop import fit
from seg.engine.state import TrainState, resolve_resume, restore, seed_everything
from seg.errors import ConfigError

logger = logging.getLogger("seg.train")


@dataclass
class TrainResult:
    """What :func:`run` returns (on every rank): where the run is and how it ended."""

    run_dir: Path
    iteration: int
    metrics: dict[str, Any] = field(default_factory=dict)
    best_miou: float = -math.inf
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM"/"peer" when interrupted


def run(cfg: DictConfig, run_dir: Path | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``run_dir`` defaults to Hydra's output folder.

    Joins the torchrun process group when launched by torchrun (and leaves it at the end).
    """
    joined = not dist.is_distributed() and dist.init_distributed()
    try:
        return _run(cfg, run_dir)
    finally:
        if joined:
            dist.cleanup()


def _run(cfg: DictConfig, run_dir: Path | None) -> TrainResult:
    own_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    main_dir = Path(_broadcast(str(own_dir)))
    if dist.get_rank() > 0:
        _drop_stray_rank_dir(own_dir, main_dir)
    resume_path = resolve_resume(cfg.get("resume"), main_dir)
    checkpoint = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, map_location="cpu", required_keys=CHECKPOINT_KEYS)
        if resume_path.parent.name == "checkpoints":
            main_dir = resume_path.parent.parent
    settings = parse_settings(cfg)
    datasets = build_datasets(cfg)
    with run_logging(main_dir / "train.log", dist.is_main()):
        if resume_path is not None:
            logger.info("resuming from %s (iteration %d)", resume_path, checkpoint["iteration"])
            if main_dir != own_dir:
                logger.info(
                    "writing into %s; this command's config is in %s/.hydra", main_dir, own_dir
                )
        elif str(cfg.get("resume")) == "auto":
            logger.info(
                "resume=auto: no checkpoints/last.pt under %s/*, starting afresh", main_dir.parent
            )
        amp = settings.amp
        logger.info(
            "run dir %s | device %s | %s%s | %d process(es) x %d images | %d iterations",
            main_dir,
            settings.device,
            amp.name,
            f" (trainer.amp={amp.requested} is for CUDA)"
            if amp.requested != amp.name and amp.requested != "off"
            else "",
            settings.world_size,
            settings.batch_per_rank,
            settings.max_iters,
        )
        if (note := from_scratch_note(cfg)) is not None and checkpoint is None:
            logger.warning(note)
        seed_everything(settings.seed + settings.rank)
        start = int(checkpoint["iteration"]) if checkpoint is not None else 0
        parts = build_parts(cfg, settings, datasets, start_iter=start)
        state, rng = TrainState(), None
        if checkpoint is not None:
            state = restore(checkpoint, resume_path, parts.model, parts.step)
            if settings.rank == 0:
                rng = checkpoint.get("rng")
            else:  # only rank 0's states are stored: the others draw fresh, distinct streams
                seed_everything(abs(hash((settings.seed, settings.rank, state.iteration))) % 2**31)
        state = train(parts, main_dir, state, rng)
        if state.stopped_by is None:
            logger.info(
                "done: %d iterations | mIoU %.2f | best %.2f at iter %d | checkpoints in %s",
                state.iteration,
                100 * float(state.metrics.get("mIoU", float("nan"))),
                100 * state.best_miou,
                state.best_iteration,
                main_dir / "checkpoints",
            )
    return TrainResult(main_dir, state.iteration, state.metrics, state.best_miou, state.stopped_by)


def train(
    parts: TrainParts,
    run_dir: Path,
    state: TrainState | None = None,
    rng: Mapping[str, Any] | None = None,
) -> TrainState:
    """Train built ``parts`` into ``run_dir`` (``tb/``, ``checkpoints/``), reporting as
    ``tools/train.py`` does; ``state``/``rng`` continue a restored run.

    For Python use between :func:`seg.engine.build.build_parts` and a run folder, e.g. with
    a loss or model swapped in ``parts``; call it inside :func:`seg.engine.logging.run_logging`
    for ``train.log``. Under DDP it checks at the end that every rank holds the same weights.
    """
    state = state if state is not None else TrainState()
    settings = parts.settings
    log = RunLog(
        run_dir,
        max_iters=settings.max_iters,
        start=state.iteration,
        global_batch=settings.global_batch,
        class_names=parts.class_names,
        palette=parts.palette,
        hparams=parts.hparams,
        is_main=dist.is_main(),
    )
    try:
        state = fit(parts, state, run_dir, log, rng)
    finally:
        log.close(final_metrics(state) if state.iteration >= settings.max_iters else None)
    if dist.is_distributed():
        if dist.same_on_all_ranks(parts.model.state_dict().values(), settings.device):
            logger.info("DDP: the weights are identical on all %d ranks", settings.world_size)
        else:
            logger.warning("DDP: the ranks ended with different weights (rank 0's were saved)")
    return state


def final_metrics(state: TrainState) -> dict[str, float]:
    """The metrics shown beside the hyper-parameters in TensorBoard's HPARAMS tab."""
    final = {
        f"hparam/{k}": float(state.metrics[k])
        for k in ("mIoU", "mAcc", "aAcc")
        if k in state.metrics
    }
    if state.best_miou > -math.inf:
        final["hparam/best_mIoU"] = state.best_miou
    return final


def hydra_run_dir() -> Path:
    """The run folder Hydra made for this job (``hydra.run.dir`` or the sweep subdir)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("no run directory: call run(cfg, run_dir=...) outside tools/train.py")
    return Path(HydraConfig.get().runtime.output_dir)


def _drop_stray_rank_dir(own_dir: Path, main_dir: Path) -> None:
    """Under torchrun every rank's Hydra makes a timestamped folder; a rank > 0 that started
    in another second than rank 0 made one holding only ``.hydra/``: remove it."""
    if own_dir.resolve() == main_dir.resolve() or not own_dir.is_dir():
        return
    if {p.name for p in own_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(own_dir, ignore_errors=True)


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (identity in one process)."""
    if not dist.is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

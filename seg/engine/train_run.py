"""The training run behind ``tools/train.py``: from a config to a finished run folder.

One path, top to bottom: find the run folder and the checkpoint to resume, check the
settings and open the datasets (a bad value or a missing dataset stops here, before
anything is written), then with ``train.log`` open: build the parts
(``seg.engine.build``), restore the checkpoint (``seg.engine.state``) and train
(``seg.engine.loop``).

Run directory: Hydra's ``outputs/<experiment_name>/<timestamp>/`` (``hydra.run.dir`` in
``configs/train.yaml``) holding ``.hydra/``, ``train.log``, the TensorBoard events and ``checkpoints/``.
A resumed run keeps writing into the run folder of the checkpoint it resumed (so
TensorBoard curves and ``train.log`` continue); the new timestamped folder only holds the
``.hydra/`` record of the resuming command. Resume options: ``seg.engine.state``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seg import dist, signals
from seg.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from seg.cli import in_multirun
from seg.engine.build import (
    TrainParts,
    build_datasets,
    build_parts,
    from_scratch_note,
    parse_settings,
)
from seg.engine.class_weight import class_weight_setting, resolve_class_weight
from seg.engine.logging import RunLog, run_logging
from seg.engine.loop import fit
from seg.engine.selection import stalled
from seg.engine.state import (
    RESULT_NEUTRAL_KEYS,
    TrainState,
    progress_of,
    resolve_resume,
    restore,
    seed_everything,
)
from seg.errors import ConfigError, SegError, first_line

logger = logging.getLogger("seg.train")


@dataclass
class TrainResult:
    """What :func:`run` returns (on every rank): where the run is and how it ended.

    ``best_score`` is the best value of ``best_metric`` (``trainer.best_metric``, mIoU by
    default); ``stopped_early``: early stopping ended the run before ``trainer.max_iters``
    (now or, for a run found finished, earlier)."""

    run_dir: Path
    iteration: int
    metrics: dict[str, Any] = field(default_factory=dict)
    best_score: float = -math.inf
    stopped_by: str | None = None  # the stopping signal's name (seg.signals)
    best_metric: str = "mIoU"
    stopped_early: bool = False


def run(cfg: DictConfig, run_dir: Path | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``run_dir`` defaults to Hydra's output folder.

    Joins the torchrun process group when launched by torchrun, or by a submitit job with
    several tasks (and leaves it at the end).
    """
    export_submitit_dist_env()
    use_cuda = dist.wants_cuda(str(cfg.trainer.get("device", "auto")))
    joined = not dist.is_distributed() and dist.init_distributed(use_cuda=use_cuda)
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
    settings = parse_settings(cfg)
    class_weight = class_weight_setting(cfg)
    config = resolved_config(cfg)
    # Rank 0 decides where to resume from (it is the one that wrote the checkpoints).
    decision = _broadcast(_decide_start(cfg, main_dir, config) if dist.is_main() else None)
    if decision["error"]:
        raise ConfigError(decision["error"])
    resume_path = Path(decision["path"]) if decision["path"] else None
    checkpoint = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, map_location="cpu", required_keys=CHECKPOINT_KEYS)
        if resume_path.parent.name == "checkpoints":
            main_dir = resume_path.parent.parent
    datasets = build_datasets(cfg)
    with run_logging(main_dir / "train.log", dist.is_main()):
        if decision["reason"]:
            logger.info("%s", decision["reason"])
        if checkpoint is not None:
            logger.info("resuming from %s (iteration %d)", resume_path, checkpoint["iteration"])
            if main_dir != own_dir:
                logger.info(
                    "writing into %s; this command's config is in %s/.hydra", main_dir, own_dir
                )
            state = progress_of(checkpoint)
            stopped = state.best_metric == settings.best_metric.name and stalled(
                state.evals_since_improvement, settings.early_stop
            )
            if state.iteration >= settings.max_iters or stopped:
                logger.info(
                    "finished earlier: %s is at iteration %d of %d%s, nothing to train",
                    resume_path,
                    state.iteration,
                    settings.max_iters,
                    f" and {state.best_metric} has not improved for "
                    f"{state.evals_since_improvement} evaluations (trainer.early_stop: "
                    "resume=PATH with a larger patience continues it)"
                    if stopped
                    else "",
                )
                return _result(main_dir, state, stopped_early=stopped)
        amp = settings.amp
        if amp.requested == "auto":
            precision_note = " (trainer.amp=auto)"
        elif amp.requested not in (amp.name, "off"):
            precision_note = f" (trainer.amp={amp.requested} is for CUDA)"
        else:
            precision_note = ""
        logger.info(
            "run dir %s | device %s | %s%s | %d process(es) x %d images | %d iterations",
            main_dir,
            settings.device,
            amp.name,
            precision_note,
            settings.world_size,
            settings.batch_per_rank,
            settings.max_iters,
        )
        if (note := from_scratch_note(cfg)) is not None and checkpoint is None:
            logger.warning(note)
        seed_everything(settings.seed + settings.rank)
        start = int(checkpoint["iteration"]) if checkpoint is not None else 0
        cfg = resolve_class_weight(
            cfg, class_weight, checkpoint, datasets[0], dist.is_main(), _broadcast
        )
        parts = build_parts(cfg, settings, datasets, start_iter=start)
        state, rng = TrainState(best_metric=settings.best_metric.name), None
        if checkpoint is not None:
            state = restore(checkpoint, resume_path, parts.model, parts.step)
            if settings.rank == 0:
                rng = checkpoint.get("rng")
            else:  # only rank 0's states are stored: the others draw fresh, distinct streams
                seed_everything(abs(hash((settings.seed, settings.rank, state.iteration))) % 2**31)
        state = train(parts, main_dir, state, rng)
        if state.stopped_by is None:
            logger.info(
                "done%s: %d iterations | mIoU %.2f | best %s %.2f at iter %d | checkpoints in %s",
                " (early stop)" if state.stopped_early else "",
                state.iteration,
                100 * float(state.metrics.get("mIoU", float("nan"))),
                state.best_metric,
                100 * state.best_score,
                state.best_iteration,
                main_dir / "checkpoints",
            )
    return _result(main_dir, state, state.stopped_early)


def _result(run_dir: Path, state: TrainState, stopped_early: bool) -> TrainResult:
    return TrainResult(
        run_dir,
        state.iteration,
        state.metrics,
        state.best_score,
        state.stopped_by,
        state.best_metric,
        stopped_early,
    )


def run_tool(cfg: DictConfig) -> int:
    """``tools/train.py``: train, then exit 0, or 128 + N when signal N stopped the run
    (``last.pt`` saved; a requeue signal is first handed over to submitit, which requeues
    the job: ``seg.signals``)."""
    result = run(cfg)
    signals.hand_over(result.stopped_by)
    return signals.exit_status(result.stopped_by)


def export_submitit_dist_env() -> None:
    """Inside a submitit job of several tasks (``hydra.launcher.tasks_per_node=N`` or
    ``nodes``), export what torchrun would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), so that each task joins the DDP group as a rank."""
    if "SUBMITIT_FOLDER" not in os.environ or "RANK" in os.environ:
        return
    try:
        import submitit
    except ImportError:
        return
    if submitit.JobEnvironment().num_tasks > 1:
        # Keep every GPU visible: seg.dist pins each rank to the GPU LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved to plain containers, as checkpoints store it."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the config: {first_line(error)}") from None
    assert isinstance(config, dict)
    return config


def _decide_start(cfg: DictConfig, run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's choice of start: ``{"path": checkpoint or None, "reason": log line,
    "error": message or ""}`` (a dict of plain values, to broadcast).

    Inside a multirun the job claims its folder first (:func:`claim_job_folder`) and
    ``resume=auto`` looks in that folder only. A fresh start never overwrites a folder
    that already holds ``checkpoints/last.pt``.
    """
    try:
        multirun = in_multirun()
        if multirun:
            claim_job_folder(run_dir, job_overrides())
        choice = resolve_resume(cfg.get("resume"), run_dir, config, own_folder_only=multirun)
        last = run_dir / "checkpoints" / "last.pt"
        if choice.path is None and last.is_file():
            raise ConfigError(
                f"{run_dir} already holds a run (checkpoints/last.pt): continue it with "
                f"resume=auto (same config) or resume={last}, or choose another "
                + ("hydra.sweep.dir" if multirun else "hydra.run.dir")
            )
    except SegError as error:
        return {"path": None, "reason": "", "error": str(error)}
    return {"path": str(choice.path) if choice.path else None, "reason": choice.reason, "error": ""}


#: The file with which a multirun job claims its folder (``hydra.sweep.subdir``).
JOB_CLAIM = ".seg-job.json"


def claim_job_folder(run_dir: Path, overrides: list[str]) -> None:
    """Claim a multirun job folder for the job with these ``overrides``.

    ``hydra.sweep.subdir`` (``<loss>-seed<seed>`` in configs/train.yaml) names job folders
    after some overrides only: a sweep over another key would give two jobs one folder,
    and parallel launchers would train both into it. The first job to arrive writes its
    overrides into :data:`JOB_CLAIM`; the same job again (a requeue, a rerun of the sweep,
    with or without overrides of ``RESULT_NEUTRAL_KEYS`` such as ``resume=auto``) finds
    its own claim; any other job stops with a ConfigError.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = run_dir / JOB_CLAIM
    text = json.dumps({"overrides": overrides}, indent=1) + "\n"
    temporary = run_dir / f"{JOB_CLAIM}.{os.getpid()}.tmp"
    temporary.write_text(text)
    try:
        os.link(temporary, claim)  # atomic, and fails when a claim exists
    except FileExistsError:
        owner = [o for o in json.loads(claim.read_text()).get("overrides", []) if not _neutral(o)]
        if owner != overrides:
            theirs = [o for o in owner if o not in overrides] or ["(none)"]
            ours = [o for o in overrides if o not in owner] or ["(none)"]
            raise ConfigError(
                f"job folder {run_dir} belongs to another job (its overrides {' '.join(theirs)}; "
                f"this job's {' '.join(ours)}), and a job never trains into another's folder: "
                "use another hydra.sweep.dir, or, when two jobs of one sweep meet there, add "
                "the swept key to hydra.sweep.subdir (e.g. '${loss.name}-seed${seed}-lr${optim.lr}')"
            ) from None
    finally:
        temporary.unlink(missing_ok=True)


def job_overrides() -> list[str]:
    """This Hydra job's command-line overrides (its sweep values included), without those
    of settings that cannot change the result (``resume=auto`` added on a rerun, say)."""
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task if not _neutral(str(o))]


def _neutral(override: str) -> bool:
    """True for an override of a setting that cannot change the result."""
    key = override.split("=", 1)[0].lstrip("+~")
    return any(key == k or key.startswith(f"{k}.") for k in RESULT_NEUTRAL_KEYS)


def train(
    parts: TrainParts,
    run_dir: Path,
    state: TrainState | None = None,
    rng: Mapping[str, Any] | None = None,
) -> TrainState:
    """Train built ``parts`` into ``run_dir`` (TensorBoard events, ``checkpoints/``), reporting as
    ``tools/train.py`` does; ``state``/``rng`` continue a restored run.

    For Python use between :func:`seg.engine.build.build_parts` and a run folder, e.g. with
    a loss or model swapped in ``parts``; call it inside :func:`seg.engine.logging.run_logging`
    for ``train.log``. Under DDP it checks at the end that every rank holds the same weights.
    """
    settings = parts.settings
    state = state if state is not None else TrainState(best_metric=settings.best_metric.name)
    before = state.best_metric
    if state.use_metric(settings.best_metric.name) and state.iteration > 0:
        logger.info(
            "trainer.best_metric is %s here, %s in the checkpoint: the best score and the "
            "early-stopping count start afresh (best.pt is replaced at the next evaluation)",
            state.best_metric,
            before,
        )
    log = RunLog(
        run_dir,
        max_iters=settings.max_iters,
        start=state.iteration,
        global_batch=settings.global_batch,
        class_names=parts.class_names,
        palette=parts.palette,
        hparams=parts.hparams,
        is_main=dist.is_main(),
        best_metric=state.best_metric,
    )
    try:
        state = fit(parts, state, run_dir, log, rng)
    finally:
        log.close(completed=state.iteration >= settings.max_iters or state.stopped_early)
    if dist.is_distributed():
        if dist.same_on_all_ranks(parts.model.state_dict().values(), settings.device):
            logger.info("DDP: the weights are identical on all %d ranks", settings.world_size)
        else:
            logger.warning("DDP: the ranks ended with different weights (rank 0's were saved)")
    return state


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

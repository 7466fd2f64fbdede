"""The logic behind ``tools/train.py``: build everything from the config, then train.

Run directory: Hydra's ``outputs/<experiment_name>/<timestamp>/`` (``hydra.run.dir`` in
``configs/train.yaml``) holding ``.hydra/``, ``train.log``, ``tb/`` and ``checkpoints/``.

Resuming (``resume=...``):

- ``resume=PATH``: continue from that checkpoint;
- ``resume=auto``: continue from the newest ``checkpoints/last.pt`` (by modification time)
  among the sibling run folders, i.e. ``outputs/<experiment_name>/*/checkpoints/last.pt``;
  with none there, training starts afresh.

A resumed run keeps writing into the run folder of the checkpoint it resumed (so
TensorBoard curves and ``train.log`` continue); the new timestamped folder only holds the
``.hydra/`` record of the resuming command.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seg import dist
from seg.data.loader import build_eval_loader, build_train_loader
from seg.engine.amp import build_grad_scaler, resolve_amp
from seg.engine.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from seg.engine.logging import run_logging
from seg.engine.trainer import (
    Callback,
    Trainer,
    TrainerSettings,
    TrainResult,
    TrainStep,
    seed_everything,
)
from seg.errors import ConfigError, DatasetError
from seg.instantiate import build

logger = logging.getLogger("seg.train")


# ------------------------------------------------------------------------------ helpers
def build_dataset(cfg: DictConfig, split_key: str) -> Any:
    """``instantiate(cfg.dataset.<split_key>)``; a missing dataset names where it was
    expected and how to point ``dataset.root`` elsewhere, in one line."""
    try:
        return build(cfg.dataset[split_key], f"{split_key} dataset")
    except DatasetError as error:
        message = str(error)
        if "dataset.root" not in message:
            message += f"; set dataset.root=PATH to your copy (now dataset.root={cfg.dataset.root})"
        raise DatasetError(message) from None


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


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``loader.batch_size`` is the global batch; each of ``world_size`` ranks takes a share."""
    if batch_size < 1 or batch_size % world_size:
        raise ConfigError(
            f"loader.batch_size={batch_size} must be a positive multiple of the number of "
            f"processes ({world_size}): it is the global batch, split evenly over them"
        )
    return batch_size // world_size


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move to ``device`` (channels_last), with SyncBatchNorm when DDP runs on GPUs.

    SyncBatchNorm has no CPU kernels, so CPU (gloo) runs keep per-process BatchNorm.
    """
    if dist.get_world_size() > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.warning("DDP on CPU: SyncBatchNorm needs GPUs, keeping per-process BatchNorm")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _auto_or_bool(setting: Any, key: str) -> bool | None:
    """A ``trainer.<key>: auto | true | false`` switch: None for ``auto``, else the bool."""
    if str(setting) == "auto":
        return None
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"trainer.{key} must be auto, true or false, got {setting!r}")


def use_channels_last(setting: Any, device: torch.device) -> bool:
    """``trainer.channels_last``: put the model and its inputs in channels_last memory.

    ``auto`` is on for every device: cuDNN's fast layout under AMP on CUDA, and 1.12-1.16x
    faster training steps on the CPU too (docs/benchmarks.md, torch 2.15, AVX-512).
    """
    choice = _auto_or_bool(setting, "channels_last")
    return device.type in ("cuda", "cpu") if choice is None else choice


def use_cudnn_benchmark(setting: Any, device: torch.device) -> bool:
    """``trainer.cudnn_benchmark``: let cuDNN time its convolution algorithms per shape.

    ``auto`` is on for CUDA: training crops have one fixed size, so the one-off timing at the
    first step of each shape pays back on every later step. Off gives cuDNN's heuristic
    choice, which is also the same from run to run. Meaningless on CPU (always False there).
    """
    choice = _auto_or_bool(setting, "cudnn_benchmark")
    return device.type == "cuda" and choice is not False


def hyper_parameters(cfg: DictConfig, world_size: int, amp_name: str) -> dict[str, Any]:
    """The flat summary shown in TensorBoard's HPARAMS tab."""

    def pick(key: str, default: Any = None) -> Any:
        return OmegaConf.select(cfg, key, default=default)

    return {
        "experiment": pick("experiment_name", "default"),
        "dataset": pick("dataset.name", "?"),
        "loss": pick("loss.name", str(pick("loss._target_", "?"))),
        "lr": pick("optim.lr"),
        "momentum": pick("optim.momentum"),
        "weight_decay": pick("optim.weight_decay"),
        "batch_size": pick("loader.batch_size"),
        "crop_size": str(list(pick("dataset.crop_size", []) or [])),
        "max_iters": pick("trainer.max_iters"),
        "warmup_iters": pick("schedule.warmup_iters"),
        "amp": amp_name,
        "seed": pick("seed"),
        "world_size": world_size,
    }


# ---------------------------------------------------------------------------------- run
def run(
    cfg: DictConfig, run_dir: Path | None = None, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train as ``cfg`` says. ``run_dir`` defaults to Hydra's output folder.

    Joins the torchrun process group when launched by torchrun (and leaves it at the end).
    ``callbacks`` are called as ``callback(trainer, iteration)`` after every step.
    """
    joined = not dist.is_distributed() and dist.init_distributed()
    try:
        return _run(cfg, run_dir, callbacks)
    finally:
        if joined:
            dist.cleanup()


def _run(cfg: DictConfig, run_dir: Path | None, callbacks: Sequence[Callback]) -> TrainResult:
    own_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    main_dir = Path(_broadcast(str(own_dir)))
    if dist.get_rank() > 0:
        _drop_stray_rank_dir(own_dir, main_dir)
    resume_path = resolve_resume(cfg.get("resume"), main_dir)
    checkpoint: Mapping[str, Any] | None = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, map_location="cpu", required_keys=CHECKPOINT_KEYS)
        if resume_path.parent.name == "checkpoints":
            main_dir = resume_path.parent.parent
    # Settings and datasets first: bad values or a missing dataset stop the run before
    # anything is logged or written.
    settings = trainer_settings(cfg)
    per_rank_batch(int(cfg.loader.batch_size), dist.get_world_size())
    datasets = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    is_main = dist.is_main()
    with run_logging(main_dir / "train.log", is_main):
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
        return _train(cfg, settings, main_dir, datasets, checkpoint, resume_path, callbacks)


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    """``cfg.trainer``'s loop settings, validated (the device switches too, so that a bad
    value stops the run before anything is written)."""
    trainer_cfg = cfg.trainer
    for key in ("channels_last", "cudnn_benchmark"):
        _auto_or_bool(trainer_cfg.get(key, "auto"), key)
    return TrainerSettings(
        max_iters=int(trainer_cfg.max_iters),
        eval_interval=int(trainer_cfg.eval_interval),
        ckpt_interval=int(trainer_cfg.ckpt_interval),
        log_interval=int(trainer_cfg.log_interval),
        max_nonfinite_steps=int(trainer_cfg.get("max_nonfinite_steps", 20)),
        check_finite_every_step=bool(trainer_cfg.get("check_finite_every_step", False)),
        num_vis_images=int(trainer_cfg.get("num_vis_images", 4)),
    )


def _train(
    cfg: DictConfig,
    settings: TrainerSettings,
    run_dir: Path,
    datasets: tuple[Any, Any],
    checkpoint: Mapping[str, Any] | None,
    resume_path: Path | None,
    callbacks: Sequence[Callback],
) -> TrainResult:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    trainer_cfg = cfg.trainer
    device = dist.resolve_device(str(trainer_cfg.get("device", "auto")), "trainer.device")
    amp = resolve_amp(str(trainer_cfg.get("amp", "fp16")), device)
    seed = int(cfg.get("seed", 0))
    batch = per_rank_batch(int(cfg.loader.batch_size), world_size)
    num_workers = int(cfg.loader.get("num_workers", 0))
    seed_everything(seed + rank)
    logger.info(
        "run dir %s | device %s | %s | %d process(es) x %d images | %d iterations",
        run_dir,
        device,
        amp.name,
        world_size,
        batch,
        settings.max_iters,
    )

    train_set, val_set = datasets
    channels_last = use_channels_last(trainer_cfg.get("channels_last", "auto"), device)
    torch.backends.cudnn.benchmark = use_cudnn_benchmark(
        trainer_cfg.get("cudnn_benchmark", "auto"), device
    )
    model = prepare_model(build(cfg.model, "model"), device, channels_last)
    optimizer = build(cfg.optim, "optimizer", model=model)
    scheduler = build(cfg.schedule, "LR schedule", optimizer=optimizer)
    criterion = build(cfg.loss, "loss").to(device)
    evaluator = build(cfg.eval, "evaluator")
    scaler = build_grad_scaler(amp)

    forward: nn.Module = model
    if world_size > 1:
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if bool(trainer_cfg.get("compile", False)):
        forward = torch.compile(forward)
    step = TrainStep(
        forward,
        criterion,
        optimizer,
        scheduler,
        scaler,
        amp,
        mean=list(cfg.dataset.mean),
        std=list(cfg.dataset.std),
        device=device,
        channels_last=channels_last,
        buffers_of=model,
    )
    start_iter = int(checkpoint["iteration"]) if checkpoint is not None else 0
    train_loader = build_train_loader(
        train_set,
        batch_size=batch,
        num_workers=num_workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
    )
    val_loader = build_eval_loader(
        val_set,
        batch_size=int(getattr(evaluator, "batch_size", 1)),
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    trainer = Trainer(
        model=model,
        step=step,
        train_loader=train_loader,
        evaluator=evaluator,
        val_loader=val_loader,
        settings=settings,
        run_dir=run_dir,
        global_batch=batch * world_size,
        class_names=list(cfg.dataset.get("class_names") or []),
        palette=list(cfg.dataset.get("palette") or []),
        config=config,
        hparams=hyper_parameters(cfg, world_size, amp.name),
        callbacks=callbacks,
    )
    if checkpoint is not None:
        assert resume_path is not None
        trainer.restore(checkpoint, resume_path)
    result = trainer.fit()
    if result.stopped_by is None:
        logger.info(
            "done: %d iterations | mIoU %.2f | best %.2f at iter %d | checkpoints in %s",
            result.iteration,
            100 * float(result.metrics.get("mIoU", float("nan"))),
            100 * result.best_miou,
            trainer.best_iteration,
            run_dir / "checkpoints",
        )
    return result

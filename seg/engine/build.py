"""From a training config to the objects that train: every check and device rule, once.

:func:`parse_settings` reads and checks every plain setting of ``cfg`` (intervals, device,
precision, memory format, batch split) before anything is written, so that a bad value
stops a run with one line and no half-made run folder. :func:`build_parts` then turns the
config groups into objects (model, optimizer, schedule, loss, evaluator, loaders, the
training step). Nothing below this module reads the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from seg import dist
from seg.data.build import build_dataset
from seg.data.loader import build_eval_loader, build_fixed_batches_loader, build_train_loader
from seg.engine.amp import AmpSettings, build_grad_scaler, resolve_amp
from seg.engine.dataset_paths import dataset_templates
from seg.engine.ema import EmaSettings, ModelEma
from seg.engine.selection import (
    BestMetric,
    EarlyStopSettings,
    early_stop_settings,
    parse_best_metric,
)
from seg.engine.step import TrainStep
from seg.errors import ConfigError
from seg.instantiate import build
from seg.values import bool_setting, int_setting
from seg.visualize import generated_palette

logger = logging.getLogger("seg.train")


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class TrainSettings:
    """The checked plain settings of a run (``trainer.*``, ``loader.*``, ``seed``).

    Intervals count iterations, i.e. optimizer steps. ``batch_per_rank`` is
    ``loader.batch_size`` (the images of one forward pass over all processes) divided by
    the number of processes; each optimizer step accumulates gradients over
    ``accumulate`` such micro-batches (see :attr:`global_batch`).
    """

    max_iters: int
    eval_interval: int
    ckpt_interval: int
    log_interval: int
    max_nonfinite_steps: int
    check_finite_every_step: bool
    num_vis_images: int
    device: torch.device
    amp: AmpSettings
    channels_last: bool
    cudnn_benchmark: bool
    compile: bool
    seed: int
    batch_per_rank: int
    num_workers: int
    rank: int
    world_size: int
    accumulate: int = 1
    keep_snapshots: int = 0
    ema: EmaSettings | None = None
    best_metric: BestMetric = field(default_factory=BestMetric)
    early_stop: EarlyStopSettings | None = None
    overfit_batches: int = 0

    @property
    def global_batch(self) -> int:
        """Images per optimizer step: ``loader.batch_size x trainer.accumulate``
        (= per-process micro-batch x accumulate x world size)."""
        return self.batch_per_rank * self.world_size * self.accumulate


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


def ema_settings(node: Any) -> EmaSettings | None:
    """``trainer.ema``: None (or ``decay: null``) for off, else the checked settings."""
    if node is None:
        return None
    if not isinstance(node, DictConfig | dict):
        raise ConfigError(
            f"trainer.ema must be null or {{decay: D, every: N, warmup: true|false}}, got {node!r}"
        )
    unknown = set(node) - {"decay", "every", "warmup"}
    if unknown:
        raise ConfigError(f"trainer.ema has unknown keys {sorted(unknown)} (decay, every, warmup)")
    decay = node.get("decay")
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
        raise ConfigError(f"trainer.ema.decay must be a number in (0, 1), got {decay!r}")
    return EmaSettings(
        decay=float(decay),
        every=int_setting(node.get("every", 1), "trainer.ema.every", minimum=1),
        warmup=bool_setting(node.get("warmup", True), "trainer.ema.warmup"),
    )


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``loader.batch_size`` is the batch of one forward pass over all processes; each of
    ``world_size`` ranks takes a share."""
    if batch_size < 1 or batch_size % world_size:
        raise ConfigError(
            f"loader.batch_size={batch_size} must be a positive multiple of the number of "
            f"processes ({world_size}): it is split evenly over them"
        )
    return batch_size // world_size


def parse_settings(cfg: DictConfig) -> TrainSettings:
    """Check every plain setting of ``cfg`` (no side effects: nothing is built or written)."""
    trainer = cfg.trainer
    world_size = dist.get_world_size()
    device = dist.resolve_device(str(trainer.get("device", "auto")), "trainer.device")
    intervals = {
        key: int_setting(trainer.get(key), f"trainer.{key}", minimum=1)
        for key in ("max_iters", "eval_interval", "ckpt_interval", "log_interval")
    }
    return TrainSettings(
        **intervals,
        max_nonfinite_steps=int_setting(
            trainer.get("max_nonfinite_steps", 20), "trainer.max_nonfinite_steps", minimum=1
        ),
        check_finite_every_step=bool_setting(
            trainer.get("check_finite_every_step", False), "trainer.check_finite_every_step"
        ),
        num_vis_images=int_setting(
            trainer.get("num_vis_images", 4), "trainer.num_vis_images", minimum=0
        ),
        device=device,
        amp=resolve_amp(trainer.get("amp", "fp16"), device, "trainer.amp"),
        channels_last=use_channels_last(trainer.get("channels_last", "auto"), device),
        cudnn_benchmark=use_cudnn_benchmark(trainer.get("cudnn_benchmark", "auto"), device),
        compile=bool_setting(trainer.get("compile", False), "trainer.compile"),
        seed=int_setting(cfg.get("seed", 0), "seed", minimum=0),
        batch_per_rank=per_rank_batch(
            int_setting(cfg.loader.batch_size, "loader.batch_size", minimum=1), world_size
        ),
        num_workers=int_setting(cfg.loader.get("num_workers", 0), "loader.num_workers", minimum=0),
        rank=dist.get_rank(),
        world_size=world_size,
        accumulate=int_setting(trainer.get("accumulate", 1), "trainer.accumulate", minimum=1),
        keep_snapshots=int_setting(
            trainer.get("keep_snapshots", 0), "trainer.keep_snapshots", minimum=0
        ),
        ema=ema_settings(trainer.get("ema")),
        best_metric=parse_best_metric(
            trainer.get("best_metric", "mIoU"), (cfg.get("dataset") or {}).get("class_names") or []
        ),
        early_stop=early_stop_settings(trainer.get("early_stop")),
        overfit_batches=int_setting(
            trainer.get("overfit_batches", 0), "trainer.overfit_batches", minimum=0
        ),
    )


def from_scratch_note(cfg: DictConfig) -> str | None:
    """One line when a recipe's published figure assumed a pretrained backbone that this run
    does not load (``recipe.pretrained_backbone`` in the experiment); None otherwise."""
    recipe = cfg.get("recipe") or {}
    model = cfg.get("model") or {}
    if (
        not recipe.get("pretrained_backbone")
        or model.get("backbone_weights")
        or model.get("weights")
    ):
        return None
    return (
        f"training from scratch: model.backbone_weights is not set, but the published "
        f"{recipe.get('published_val_miou')} val mIoU of {recipe.get('source')} started from the "
        f"ImageNet-pretrained backbone; set model.backbone_weights=PATH/backbone_v2.pth for it"
    )


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset]:
    """The training and validation datasets (``cfg.dataset.train`` / ``.val``)."""
    return build_dataset(
        cfg.dataset.train, "train dataset", dataset_cfg=cfg.dataset
    ), build_dataset(cfg.dataset.val, "val dataset", dataset_cfg=cfg.dataset)


def hyper_parameters(cfg: DictConfig, settings: TrainSettings) -> dict[str, Any]:
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
        "batch_size": settings.global_batch,
        "accumulate": settings.accumulate,
        "ema_decay": settings.ema.decay if settings.ema is not None else 0.0,
        "crop_size": str(list(pick("dataset.crop_size", []) or [])),
        "max_iters": settings.max_iters,
        "warmup_iters": pick("schedule.warmup_iters"),
        "amp": settings.amp.name,
        "seed": settings.seed,
        "world_size": settings.world_size,
        "best_metric": settings.best_metric.name,
        "early_stop_patience": settings.early_stop.patience if settings.early_stop else 0,
        "overfit_batches": settings.overfit_batches or None,  # shown only when on
    }


# --------------------------------------------------------------------------------- parts
@dataclass
class TrainParts:
    """Everything a training run is made of, built from the config.

    Attributes:
        settings: the checked plain settings.
        model: the bare model on its device (its ``state_dict`` goes into checkpoints).
        step: the training step (calls a DDP-wrapped or compiled ``model`` when asked;
            holds the EMA of the weights, ``step.ema``, when ``trainer.ema`` is on).
        evaluator: the periodic evaluation (``seg.engine.evaluator.Evaluator``).
        train_loader: endless loader positioned at the start iteration.
        val_loader: this rank's shard of the validation split.
        config: the resolved config as plain containers (stored in checkpoints).
        class_names, palette: for reports (per-class IoU, coloured panels).
        hparams: the summary for TensorBoard's HPARAMS tab.
        dataset_templates: the unresolved dataset paths built from ``dataset.root`` /
            ``dataset.split`` (stored in checkpoints; ``seg.engine.dataset_paths``).
    """

    settings: TrainSettings
    model: nn.Module
    step: TrainStep
    evaluator: Any
    train_loader: DataLoader
    val_loader: DataLoader
    config: dict[str, Any]
    class_names: list[str]
    palette: list[list[int]]
    hparams: dict[str, Any]
    dataset_templates: dict[str, str] = field(default_factory=dict)

    @property
    def eval_model(self) -> nn.Module:
        """What evaluations score: the EMA of the weights when ``trainer.ema`` is on."""
        return self.step.ema.model if self.step.ema is not None else self.model


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


def dataset_palette(dataset: DictConfig) -> list[list[int]]:
    """The colours of the val panels in TensorBoard: ``dataset.palette``, or for a dataset
    that ships none (``palette: null``, allowed for folder datasets) the generated one that
    eval, predict and export use too."""
    palette = dataset.get("palette")
    if not palette:
        return generated_palette(int(dataset.num_classes))
    return [[int(v) for v in colour] for colour in palette]


def build_parts(
    cfg: DictConfig,
    settings: TrainSettings,
    datasets: tuple[Dataset, Dataset],
    start_iter: int = 0,
) -> TrainParts:
    """Build the model, optimizer, schedule, loss, evaluator, step and loaders of ``cfg``.

    ``start_iter``: the iteration training starts at (a resumed run); the loader skips the
    ``start_iter x accumulate`` micro-batches an uninterrupted run would have used.
    """
    device = settings.device
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    model = prepare_model(build(cfg.model, "model"), device, settings.channels_last)
    optimizer = build(cfg.optim, "optimizer", model=model)
    scheduler = build(cfg.schedule, "LR schedule", optimizer=optimizer)
    criterion = build(cfg.loss, "loss").to(device)
    evaluator = build(cfg.eval, "evaluator")
    ema = ModelEma(model, settings.ema) if settings.ema is not None else None
    forward: nn.Module = model
    ddp = None
    if settings.world_size > 1:
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        forward = ddp
    if settings.compile:
        forward = torch.compile(forward)
    step = TrainStep(
        forward,
        criterion,
        optimizer,
        scheduler,
        build_grad_scaler(settings.amp),
        settings.amp,
        mean=list(cfg.dataset.mean),
        std=list(cfg.dataset.std),
        device=device,
        channels_last=settings.channels_last,
        buffers_of=[model, criterion],
        no_sync=ddp.no_sync if ddp is not None else None,
        ema=ema,
    )
    train_set, val_set = datasets
    train_loader = build_train_loader(
        train_set,
        batch_size=settings.batch_per_rank,
        num_workers=settings.num_workers,
        seed=settings.seed,
        rank=settings.rank,
        world_size=settings.world_size,
        start_iter=start_iter * settings.accumulate,
        pin_memory=device.type == "cuda",
        fixed_batches=settings.overfit_batches,
    )
    if settings.overfit_batches:  # evaluations score the fixed training batches themselves
        val_loader = build_fixed_batches_loader(
            train_set,
            batch_size=settings.batch_per_rank,
            num_batches=settings.overfit_batches,
            seed=settings.seed,
            rank=settings.rank,
            world_size=settings.world_size,
            pin_memory=device.type == "cuda",
        )
        logger.info(
            "trainer.overfit_batches=%d: training on the same %d batch(es) of %d image(s) "
            "over and over (augmentation drawn once); evaluations score these batches, not "
            "the %s split",
            settings.overfit_batches,
            settings.overfit_batches,
            settings.batch_per_rank * settings.world_size,
            cfg.dataset.get("split", "val"),
        )
    else:
        val_loader = build_eval_loader(
            val_set,
            batch_size=int(getattr(evaluator, "batch_size", 1)),
            num_workers=settings.num_workers,
            rank=settings.rank,
            world_size=settings.world_size,
            pin_memory=device.type == "cuda",
        )
    if settings.accumulate > 1:
        logger.info(
            "gradient accumulation: %d micro-batches of %d image(s) per process per optimizer "
            "step (%d images per step over %d process(es))",
            settings.accumulate,
            settings.batch_per_rank,
            settings.global_batch,
            settings.world_size,
        )
    if ema is not None:
        logger.info(
            "EMA of the weights: decay %g, every %d step(s)%s; evaluations use it",
            settings.ema.decay,
            settings.ema.every,
            ", warm-up" if settings.ema.warmup else "",
        )
    logger.debug(
        "built %s (%d parameter groups), %s, %d train / %d val images",
        type(model).__name__,
        len(optimizer.param_groups),
        type(criterion).__name__,
        len(train_set),
        len(val_set),
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return TrainParts(
        settings=settings,
        model=model,
        step=step,
        evaluator=evaluator,
        train_loader=train_loader,
        val_loader=val_loader,
        config=config,
        class_names=[str(n) for n in cfg.dataset.get("class_names") or []],
        palette=dataset_palette(cfg.dataset),
        hparams=hyper_parameters(cfg, settings),
        dataset_templates=dataset_templates(cfg),
    )

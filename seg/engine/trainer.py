"""The iteration-based training loop.

One step (:class:`TrainStep`) moves a uint8 batch to the device, normalises it there
(channels_last by default), runs the model and the multi-head loss under autocast,
back-propagates through the GradScaler (a pass-through unless fp16 on CUDA), steps SGD
and the LR schedule. It does not wait for the device: values are read back only at the
log interval.

Non-finite losses. A step whose total loss is NaN or inf is skipped without a host-device
sync: the flag ``skipped = ~isfinite(loss)`` stays on the device and

- with the fused SGD kernel (the default on CUDA and CPU) it is handed to the kernel as
  ``found_inf``, which then leaves weights and momentum buffers untouched;
- with fp16 the GradScaler skips the step by itself (a non-finite loss gives non-finite
  gradients), as it does for overflows;
- with any other optimizer implementation the step reads the flag (one sync per step).

The model's buffers (BatchNorm running statistics), which the forward pass updates, are
copied before it and put back when the flag is set, so a skipped step changes nothing but
the iteration count, the LR schedule position and the fp16 loss scale. Skips are counted
on the device. The longest run of consecutive skips is read at each log interval (every
step with ``trainer.check_finite_every_step=true``, at the cost of a sync per step): the
price of not syncing is that training may run up to ``log_interval`` iterations past the
limit. When the run has reached ``trainer.max_nonfinite_steps``, training stops with
:class:`NonFiniteLossError` after saving ``last.pt``; as skipped steps change no weights,
it holds the weights of the last finite step. Under DDP the flag is all-reduced (max, no
host sync) so that every rank skips the same steps.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from torch import nn

from seg import dist
from seg.data.batch import batch_to_device
from seg.engine.amp import AmpSettings, autocast
from seg.engine.checkpoint import save_checkpoint
from seg.engine.logging import TensorBoardLog, format_duration, label_panel, progress_bar
from seg.engine.optim import is_fused
from seg.errors import CheckpointError, ConfigError, SegError

logger = logging.getLogger(__name__)


class NonFiniteLossError(SegError):
    """Training stopped: the loss was NaN/inf for too many iterations in a row."""


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


# ---------------------------------------------------------------------------- one step
@dataclass
class StepOutput:
    """Device tensors of one step (0-dim): ``total`` loss, per-head ``terms``, loss
    ``stats`` (``"head/stat"``) and ``skipped`` (bool, the step was not applied)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    skipped: torch.Tensor


class TrainStep:
    """One optimisation step on a collated uint8 batch, without host-device syncs.

    Args:
        model: the module called for the forward pass (possibly DDP-wrapped or compiled).
        criterion: ``MultiHeadLoss``: ``(outputs, labels) -> LossOutput(total, terms, stats)``.
        optimizer, scheduler, scaler: stepped once per call.
        amp: autocast settings (``seg.engine.amp``).
        mean, std: 0-1 scale RGB normalisation applied on the device.
        device: where the batch goes.
        channels_last: feed NHWC-strided images (False: contiguous NCHW, for benchmarks).
        buffers_of: the module whose buffers (BatchNorm statistics and counters) are
            restored after a skipped step; None disables that guard.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        amp: AmpSettings,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        channels_last: bool = True,
        buffers_of: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.amp = amp
        self.mean = list(mean)
        self.std = list(std)
        self.device = device
        self.channels_last = channels_last
        self.fused = is_fused(optimizer)
        self.buffers = list(buffers_of.buffers()) if buffers_of is not None else []
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def __call__(self, batch: Mapping[str, Any]) -> StepOutput:
        """Train on ``batch`` = ``{"image": uint8 N x H x W x 3, "label": uint8 N x H x W}``."""
        images, labels = batch_to_device(batch, self.device, self.mean, self.std)
        if not self.channels_last:
            images = images.contiguous()
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)
        with autocast(self.amp):
            outputs = self.model(images)
            loss = self.criterion(outputs, labels)
        skipped = ~torch.isfinite(loss.total.detach())
        if dist.is_distributed():
            flag = skipped.to(torch.float32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skipped = flag > 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        self._optimizer_step(skipped)
        self.scheduler.step()
        for buffer, saved in zip(self.buffers, self.saved, strict=True):
            torch.where(skipped, saved, buffer, out=buffer)
        return StepOutput(loss.total.detach(), dict(loss.terms), dict(loss.stats), skipped)

    def _optimizer_step(self, skipped: torch.Tensor) -> None:
        if self.scaler.is_enabled():
            # fp16: the scaler skips steps with non-finite gradients (which a non-finite
            # loss produces) and lowers its scale; no sync with a fused optimizer.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            # The fused kernel reads found_inf on the device and skips the update when it is 1.
            self.optimizer.found_inf = skipped.to(torch.float32)
            self.optimizer.step()
        elif not bool(skipped):  # other implementations: one host-device sync per step
            self.optimizer.step()


# ------------------------------------------------------------------------ running sums
class RunningStats:
    """Device-side sums of the logged values between two log intervals, and skip counters."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.good = torch.zeros((), device=device)
        self.steps = 0
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.max_streak = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, out: StepOutput) -> None:
        if self.names is None:
            self.names = (
                ["loss"] + [f"loss/{head}" for head in out.terms] + [f"{key}" for key in out.stats]
            )
        values = torch.stack(
            [out.total.float()]
            + [t.detach().float() for t in out.terms.values()]
            + [s.detach().float() for s in out.stats.values()]
        )
        values = torch.where(out.skipped, torch.zeros_like(values), values)
        self.sums = values if self.sums is None else self.sums + values
        bad = out.skipped.to(torch.int64)
        self.good = self.good + (1 - bad)
        self.steps += 1
        self.skipped_total = self.skipped_total + bad
        self.streak = (self.streak + 1) * bad
        self.max_streak = torch.maximum(self.max_streak, self.streak)

    def read_max_streak(self) -> int:
        """Longest run of skipped steps since the last :meth:`flush` (a sync)."""
        return int(self.max_streak)

    def flush(self) -> dict[str, float]:
        """Means over the finite steps since the last flush, plus counters (one sync)."""
        if self.sums is None or self.names is None:
            return {}
        packed = torch.cat(
            [
                self.sums / self.good.clamp(min=1),
                torch.stack([self.good, self.skipped_total.float(), self.max_streak.float()]),
            ]
        ).tolist()
        means = dict(zip(self.names, packed[: len(self.names)], strict=True))
        if packed[-3] == 0:  # every step skipped: no mean to show
            means = {name: math.nan for name in self.names}
        means["nonfinite_steps"] = packed[-2]
        means["max_nonfinite_streak"] = packed[-1]
        self.sums = torch.zeros_like(self.sums)
        self.good = torch.zeros_like(self.good)
        self.max_streak = self.streak.clone()
        self.steps = 0
        return means


# ------------------------------------------------------------------------------ trainer
@dataclass
class TrainerSettings:
    """The loop's knobs (``configs/trainer/*.yaml``)."""

    max_iters: int
    eval_interval: int
    ckpt_interval: int
    log_interval: int
    max_nonfinite_steps: int = 20
    check_finite_every_step: bool = False
    num_vis_images: int = 4

    def __post_init__(self) -> None:
        for key in ("max_iters", "eval_interval", "ckpt_interval", "log_interval"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(
                f"trainer.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}"
            )


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every rank)."""

    iteration: int
    metrics: dict[str, Any]
    best_miou: float
    run_dir: Path
    model: nn.Module
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM" when interrupted
    history: list[dict[str, float]] = field(default_factory=list)  # logged train values


Callback = Callable[["Trainer", int], None]


class Trainer:
    """Runs :class:`TrainStep` from ``start`` to ``settings.max_iters`` with logging,
    periodic evaluation, checkpoints and clean stops on SIGINT/SIGTERM.

    Args:
        model: the bare model (on its device); its ``state_dict`` goes into checkpoints.
        step: the training step (which may call a DDP-wrapped or compiled ``model``).
        train_loader: endless loader already positioned at the start iteration.
        evaluator: ``seg.engine.evaluator.Evaluator``.
        val_loader: this rank's shard of the validation split.
        settings: loop settings.
        run_dir: ``checkpoints/`` and ``tb/`` go here (rank 0 only).
        global_batch: images per iteration over all ranks (for images/s).
        class_names, palette: for per-class IoU tags and coloured TensorBoard images.
        config: the resolved config as plain containers (stored in checkpoints).
        hparams: flat hyper-parameters for TensorBoard's HPARAMS tab.
        callbacks: called as ``callback(trainer, iteration)`` after every step.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        step: TrainStep,
        train_loader: Iterable[Mapping[str, Any]],
        evaluator: Any,
        val_loader: Iterable[Mapping[str, Any]],
        settings: TrainerSettings,
        run_dir: Path,
        global_batch: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        config: Mapping[str, Any],
        hparams: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model = model
        self.step = step
        self.train_loader = train_loader
        self.evaluator = evaluator
        self.val_loader = val_loader
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.global_batch = global_batch
        self.class_names = list(class_names)
        self.palette = [list(c) for c in palette]
        self.config = dict(config)
        self.hparams = dict(hparams or {})
        self.callbacks = list(callbacks)
        self.is_main = dist.is_main()
        self.device = step.device
        self.iteration = 0
        self.best_miou = -math.inf
        self.best_iteration = -1
        self.metrics: dict[str, Any] = {}
        self.stats = RunningStats(self.device)
        self.skipped_before = 0  # skips counted by the run this one resumed
        self._pending_rng: Mapping[str, Any] | None = None
        self._stop_signal: str | None = None
        self._main_pid = os.getpid()

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """The checkpoint payload (contract in docs/architecture.md)."""
        skipped = self.skipped_before + int(self.stats.skipped_total)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.step.optimizer.state_dict(),
            "scheduler": self.step.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "iteration": self.iteration,
            "rng": capture_rng_state(),
            "config": self.config,
            "metrics": {
                "val": _plain(self.metrics),
                "best_mIoU": self.best_miou if self.best_miou > -math.inf else None,
                "best_iteration": self.best_iteration,
                "nonfinite_steps": skipped,
                "nonfinite_streak": int(self.stats.streak),
            },
        }

    def save(self, name: str) -> Path:
        """Write ``checkpoints/<name>`` atomically (rank 0; other ranks return the path)."""
        path = self.ckpt_dir / name
        if self.is_main:
            save_checkpoint(path, self.state())
        return path

    def restore(self, checkpoint: Mapping[str, Any], source: Path) -> None:
        """Load a checkpoint's states to continue where it stopped.

        The RNG states are applied by :meth:`fit` once the data iterator exists, in the same
        order as in an uninterrupted run.
        """
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.step.optimizer.load_state_dict(checkpoint["optimizer"])
            self.step.scheduler.load_state_dict(checkpoint["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise CheckpointError(
                f"cannot resume from {source}: it does not fit this config ({first[:200]})"
            ) from None
        scaler_state = checkpoint.get("scaler") or {}
        if self.step.scaler.is_enabled() and scaler_state:
            self.step.scaler.load_state_dict(scaler_state)
        self.iteration = int(checkpoint["iteration"])
        metrics = checkpoint.get("metrics") or {}
        self.metrics = dict(metrics.get("val") or {})
        best = metrics.get("best_mIoU")
        self.best_miou = float(best) if best is not None else -math.inf
        self.best_iteration = int(metrics.get("best_iteration", -1))
        self.skipped_before = int(metrics.get("nonfinite_steps", 0))
        self.stats.streak.fill_(int(metrics.get("nonfinite_streak", 0)))
        if dist.get_rank() == 0:
            self._pending_rng = checkpoint.get("rng")
        else:  # only rank 0's states are stored: others draw fresh, distinct streams
            seed = hash((int(self.config.get("seed", 0)), dist.get_rank(), self.iteration))
            seed_everything(abs(seed) % 2**31)

    # ------------------------------------------------------------------ signals
    def request_stop(self, reason: str = "request") -> None:
        """Stop after the current step, saving ``last.pt`` (what SIGINT/SIGTERM do)."""
        self._stop_signal = reason

    def _on_signal(self, signum: int, frame: object) -> None:
        del frame
        if os.getpid() != self._main_pid:
            # A data-loader worker forked after the handler was installed: Ctrl-C reaches the
            # whole process group, and workers must keep serving until the main process stops.
            return
        name = signal.Signals(signum).name
        if self._stop_signal is None:
            # tqdm.write keeps the bar intact; logging may not be safe inside a handler.
            from tqdm import tqdm

            tqdm.write(f"{name}: stopping after this iteration and saving last.pt (again to abort)")
        self.request_stop(name)
        signal.signal(
            signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
        )

    def _should_stop(self, log_now: bool) -> bool:
        """Whether to stop now; under DDP the ranks agree at log intervals only."""
        if not dist.is_distributed():
            return self._stop_signal is not None
        if not log_now:
            return False
        flag = torch.tensor(float(self._stop_signal is not None), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0 and self._stop_signal is None:
            self._stop_signal = "peer"
        return flag.item() > 0

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Train to ``settings.max_iters``; returns the final state (every rank)."""
        settings = self.settings
        tb = TensorBoardLog(self.run_dir / "tb" if self.is_main else None)
        bar = progress_bar(settings.max_iters, self.iteration, self.is_main)
        history: list[dict[str, float]] = []
        check_every = 1 if settings.check_finite_every_step else settings.log_interval
        # Handlers first: loader workers forked below inherit them (and ignore the signals).
        handlers = self._install_signal_handlers()
        try:
            data = iter(self.train_loader)
            if self._pending_rng is not None:
                restore_rng_state(self._pending_rng)
                self._pending_rng = None
            last_time, last_iter = time.perf_counter(), self.iteration
            self.model.train()
            while self.iteration < settings.max_iters:
                out = self.step(next(data))
                self.stats.add(out)
                self.iteration += 1
                it = self.iteration
                bar.update(1)
                for callback in self.callbacks:
                    callback(self, it)
                final = it == settings.max_iters
                log_now = it % settings.log_interval == 0 or final
                if log_now:
                    values = self._log(it, last_iter, last_time, tb, bar)
                    history.append(values)
                    streak = int(values["max_nonfinite_streak"])
                elif it % check_every == 0:
                    streak = self.stats.read_max_streak()
                else:
                    streak = 0
                if streak >= settings.max_nonfinite_steps:
                    path = self.save("last.pt")
                    raise NonFiniteLossError(
                        f"the loss was not finite for {streak} iterations in a row "
                        f"(trainer.max_nonfinite_steps={settings.max_nonfinite_steps}); stopped "
                        f"at iteration {it}; the weights of the last finite step are in {path}"
                    )
                busy = False
                if it % settings.eval_interval == 0 or final:
                    self._evaluate(it, tb)
                    busy = True
                if it % settings.ckpt_interval == 0 or final:
                    self.save("last.pt")
                    busy = True
                if self._should_stop(log_now) and not final:
                    path = self.save("last.pt")
                    logger.info(
                        "stopped (%s) at iteration %d; resume with resume=%s",
                        self._stop_signal,
                        it,
                        path,
                    )
                    break
                if busy or log_now:
                    last_time, last_iter = time.perf_counter(), it
        finally:
            self._restore_signal_handlers(handlers)
            bar.close()
            if self.iteration >= settings.max_iters and self.metrics:
                tb.hparams(self.hparams, self._final_metrics())
            tb.close()
        return TrainResult(
            iteration=self.iteration,
            metrics=self.metrics,
            best_miou=self.best_miou,
            run_dir=self.run_dir,
            model=self.model,
            stopped_by=self._stop_signal,
            history=history,
        )

    def _log(
        self, it: int, last_iter: int, last_time: float, tb: TensorBoardLog, bar: Any
    ) -> dict[str, float]:
        values = self.stats.flush()  # waits for the device: the clock below includes its work
        speed = (it - last_iter) * self.global_batch / max(time.perf_counter() - last_time, 1e-9)
        lr = float(self.step.optimizer.param_groups[0]["lr"])
        values["lr"] = lr
        values["images_per_s"] = speed
        values["nonfinite_steps"] += self.skipped_before
        values["iteration"] = it
        scalars = {
            k: v for k, v in values.items() if k not in ("iteration", "max_nonfinite_streak")
        }
        tb.scalars(scalars, it, prefix="train/")
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        heads = " ".join(
            f"{k.removeprefix('loss/')} {v:.3f}" for k, v in values.items() if k.startswith("loss/")
        )
        eta = (self.settings.max_iters - it) * self.global_batch / max(speed, 1e-9)
        logger.info(
            "iter %d/%d | loss %.4f (%s) | lr %.3e | %.1f img/s | eta %s | non-finite %d",
            it,
            self.settings.max_iters,
            values["loss"],
            heads,
            lr,
            speed,
            format_duration(eta),
            int(values["nonfinite_steps"]),
        )
        return values

    def _evaluate(self, it: int, tb: TensorBoardLog) -> None:
        panels: list[np.ndarray] = []

        def collect(batch: Mapping[str, Any], pred: torch.Tensor) -> None:
            if not self.is_main or len(panels) >= self.settings.num_vis_images:
                return
            preds = pred.to("cpu").numpy()
            for i in range(min(len(preds), self.settings.num_vis_images - len(panels))):
                image = batch["image"][i].numpy()
                label = batch["label"][i].numpy()
                panels.append(label_panel(image, label, preds[i], self.palette))

        self._broadcast_buffers()
        metrics = self.evaluator.evaluate(
            self.model, self.val_loader, self.device, progress=False, on_prediction=collect
        )
        self.model.train()
        self.metrics = _plain(metrics)
        miou = float(metrics["mIoU"])
        tb.evaluation(metrics, self.class_names, it)
        tb.panels(panels, it)
        tb.flush()
        logger.info(
            "eval at iter %d | mIoU %.2f | mAcc %.2f | aAcc %.2f",
            it,
            100 * miou,
            100 * float(metrics["mAcc"]),
            100 * float(metrics["aAcc"]),
        )
        if not math.isnan(miou) and miou > self.best_miou:
            self.best_miou, self.best_iteration = miou, it
            path = self.save("best.pt")
            logger.info("new best mIoU %.2f at iter %d -> %s", 100 * miou, it, path)

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's buffers before a sharded evaluation.

        Parameters agree across ranks (DDP averages gradients), but plain BatchNorm (DDP on
        CPU, where SyncBatchNorm does not run) keeps per-rank running statistics; without
        this the shards would be scored by slightly different models.
        """
        if dist.is_distributed():
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _final_metrics(self) -> dict[str, float]:
        final = {
            f"hparam/{k}": float(self.metrics[k])
            for k in ("mIoU", "mAcc", "aAcc")
            if k in self.metrics
        }
        if self.best_miou > -math.inf:
            final["hparam/best_mIoU"] = self.best_miou
        return final

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: leave signals alone
            self._restore_signal_handlers(previous)
            return {}
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _plain(value: Any) -> Any:
    """Metrics as plain floats/lists/dicts (checkpoint-safe, JSON-friendly)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

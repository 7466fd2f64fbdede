"""One optimisation step, and the device-side sums of what the steps report.

:class:`TrainStep` moves a uint8 batch to the device, normalises it there (channels_last by
default), runs the model and the multi-head loss under autocast, back-propagates through
the GradScaler (a pass-through unless fp16 on CUDA), steps SGD and the LR schedule, and
updates the EMA of the weights when there is one (``seg.engine.ema``). It does not wait
for the device: :class:`RunningStats` keeps the logged values as device tensors until the
loop reads them at the log interval.

Gradient accumulation. Called with K micro-batches, the step back-propagates each one's
loss divided by K (so that the gradients are those of the mean over the K micro-batches
when each loss is a mean over the same number of pixels), then steps the optimizer, the
schedule and the EMA once. Under DDP the gradient all-reduce runs on the last micro-batch
only (``no_sync`` on the first K-1). BatchNorm sees each micro-batch on its own: its batch
statistics come from batch/K images and its running statistics move K times per step.

Non-finite losses. A step whose total loss is NaN or inf is skipped without a host-device
sync: the flag ``skipped = ~isfinite(loss)`` stays on the device and

- with the fused SGD kernel (the default on CUDA and CPU) it is handed to the kernel as
  ``found_inf``, which then leaves weights and momentum buffers untouched;
- with fp16 the GradScaler skips the step by itself (a non-finite loss gives non-finite
  gradients), as it does for overflows;
- with any other optimizer implementation the step reads the flag (one sync per step).

With K micro-batches the step is skipped when any of their losses is not finite. The
model's buffers (BatchNorm running statistics), which the forward pass updates, are
copied before the first micro-batch and put back when the flag is set, so a skipped step
changes nothing but the iteration count, the LR schedule position, the fp16 loss scale
and the EMA (which takes its update from the unchanged weights). Skips are counted
on the device; the loop reads the longest run of consecutive skips at each log interval
(see ``seg.engine.loop``). Under DDP the flag is all-reduced (max, no host sync) so that
every rank skips the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed
from torch import nn

from seg import dist
from seg.data.batch import batch_to_device
from seg.engine.amp import AmpSettings, autocast
from seg.engine.ema import ModelEma
from seg.engine.optim import is_fused
from seg.losses import LossOutput


@dataclass
class StepOutput:
    """Device tensors of one step (0-dim): ``total`` loss, per-head ``terms``, loss
    ``stats`` (``"head/stat"``) and ``skipped`` (bool, the step was not applied)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    skipped: torch.Tensor


class TrainStep:
    """One optimisation step on one or more collated uint8 micro-batches, without
    host-device syncs.

    Args:
        model: the module called for the forward pass (possibly DDP-wrapped or compiled).
        criterion: ``MultiHeadLoss``: ``(outputs, labels) -> LossOutput(total, terms, stats)``.
        optimizer, scheduler, scaler: stepped once per call.
        amp: autocast settings (``seg.engine.amp``).
        mean, std: 0-1 scale RGB normalisation applied on the device.
        device: where the batch goes.
        channels_last: feed NHWC-strided images (False: contiguous NCHW, for benchmarks).
        buffers_of: the module(s) whose buffers are restored after a skipped step: the
            model's BatchNorm statistics and counters, and a loss's moving state (GHM-C's
            bin counts); None disables that guard.
        no_sync: DDP's ``no_sync`` (the wrapper's method), entered for all micro-batches
            but the last so that gradients are all-reduced once per step; None outside DDP.
        ema: the moving average of the weights, stepped after each optimizer step.
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
        buffers_of: nn.Module | Sequence[nn.Module] | None = None,
        no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
        ema: ModelEma | None = None,
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
        self.no_sync = no_sync
        self.ema = ema
        self.fused = is_fused(optimizer)
        modules = [buffers_of] if isinstance(buffers_of, nn.Module) else list(buffers_of or ())
        self.buffers = [b for module in modules for b in module.buffers()]
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def __call__(self, batches: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> StepOutput:
        """Train on one batch or on K micro-batches (gradients accumulated over them).

        Each batch is ``{"image": uint8 N x H x W x 3, "label": uint8 N x H x W}``. The
        output's values are the means over the micro-batches.
        """
        micro = [batches] if isinstance(batches, Mapping) else list(batches)
        count = len(micro)
        if count == 0:
            raise ValueError("TrainStep needs at least one batch")
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)
        self.optimizer.zero_grad(set_to_none=True)
        outputs: list[LossOutput] = []
        bad: list[torch.Tensor] = []  # per micro-batch: its loss is not finite (0-dim bool)
        for index, batch in enumerate(micro):
            last = index == count - 1
            with self.no_sync() if self.no_sync is not None and not last else nullcontext():
                loss = self._forward(batch)
                bad.append(~torch.isfinite(loss.total.detach()))
                # Dividing by K makes the summed gradients those of the mean loss.
                total = loss.total / count if count > 1 else loss.total
                self.scaler.scale(total).backward()
            outputs.append(loss)
        skipped = bad[0] if count == 1 else torch.stack(bad).any()
        if dist.is_distributed():
            flag = skipped.to(torch.float32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skipped = flag > 0
        self._optimizer_step(skipped)
        self.scheduler.step()
        for buffer, saved in zip(self.buffers, self.saved, strict=True):
            torch.where(skipped, saved, buffer, out=buffer)
        if self.ema is not None:
            self.ema.step()
        return _mean_output(outputs, skipped)

    def _forward(self, batch: Mapping[str, Any]) -> LossOutput:
        images, labels = batch_to_device(batch, self.device, self.mean, self.std)
        if not self.channels_last:
            images = images.contiguous()
        with autocast(self.amp):
            return self.criterion(self.model(images), labels)

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


def _mean_output(outputs: Sequence[LossOutput], skipped: torch.Tensor) -> StepOutput:
    """The step's report: each value averaged over the micro-batches (detached)."""
    if len(outputs) == 1:
        (only,) = outputs
        return StepOutput(only.total.detach(), dict(only.terms), dict(only.stats), skipped)

    def mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([v.detach().float() for v in values]).mean()

    first = outputs[0]
    return StepOutput(
        mean([o.total for o in outputs]),
        {k: mean([o.terms[k] for o in outputs]) for k in first.terms},
        {k: mean([o.stats[k] for o in outputs]) for k in first.stats},
        skipped,
    )


# ------------------------------------------------------------------------ running sums
class RunningStats:
    """Device-side sums of the logged values between two log intervals, and skip counters.

    Args:
        device: where the sums live (the training device).
        skipped_before, streak: the skip count and the current run of consecutive skips
            of the run this one resumed (from its checkpoint), so that counts continue.
    """

    def __init__(self, device: torch.device, skipped_before: int = 0, streak: int = 0) -> None:
        self.device = device
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.good = torch.zeros((), device=device)
        self.steps = 0
        self.skipped_total = torch.full((), skipped_before, dtype=torch.int64, device=device)
        self.streak = torch.full((), streak, dtype=torch.int64, device=device)
        self.max_streak = self.streak.clone()

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

    def skip_counts(self) -> tuple[int, int]:
        """``(skipped steps in total, current run of consecutive skips)`` (a sync)."""
        return int(self.skipped_total), int(self.streak)

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

"""Iteration-based learning-rate schedule: warm-up, then poly decay.

At iteration ``it`` (0-based, the step about to be taken) every group's rate is

    lr(it) = warm(it) * ((base_lr - min_lr) * (1 - progress(it)) ** power + min_lr)

with ``warm(it) = ratio + (1 - ratio) * it / warmup_iters`` (linear) or
``ratio ** (1 - it / warmup_iters)`` (exponential) during the first ``warmup_iters``
iterations, and 1 afterwards. ``progress(it) = it / max_iters`` by default; with
``poly_after_warmup=True`` the decay starts where the warm-up ends, as in
CoinCheung/BiSeNet and mmsegmentation: ``progress = max(0, it - warmup_iters) /
(max_iters - warmup_iters)``, so the rate reaches ``base_lr`` exactly at the end of the
warm-up. The scheduler is stepped once per iteration, after the optimizer step, so
iteration ``it`` runs with ``lr(it)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from seg.errors import ConfigError

WARMUP_KINDS = ("linear", "exp", "none")
#: Constructor settings: taken from the config, never from a checkpoint.
SETTINGS = (
    "max_iters",
    "power",
    "warmup_iters",
    "warmup",
    "warmup_ratio",
    "min_lr",
    "poly_after_warmup",
)


def _warm(iteration: int, warmup_iters: int, warmup: str, warmup_ratio: float) -> float:
    if warmup == "none" or warmup_iters <= 0 or iteration >= warmup_iters:
        return 1.0
    fraction = iteration / warmup_iters
    if warmup == "linear":
        return warmup_ratio + (1.0 - warmup_ratio) * fraction
    return warmup_ratio ** (1.0 - fraction)


class WarmupPolyLR(LRScheduler):
    """Warm-up (linear or exponential) followed by poly decay, stepped per iteration.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is set.
        max_iters: total training iterations (the rate reaches ``min_lr`` there).
        power: poly exponent (0.9 in the BiSeNetV2 recipes).
        warmup_iters: warm-up length in iterations (0: none).
        warmup: ``linear``, ``exp`` or ``none``.
        warmup_ratio: the warm-up's starting fraction of the rate.
        min_lr: floor of the poly decay.
        poly_after_warmup: start the poly decay at the end of the warm-up (see the module doc).
        last_epoch: index of the last iteration taken (-1 for a fresh run); resuming goes
            through ``load_state_dict`` instead.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = 0.9,
        warmup_iters: int = 1000,
        warmup: str = "linear",
        warmup_ratio: float = 1e-6,
        min_lr: float = 0.0,
        poly_after_warmup: bool = False,
        last_epoch: int = -1,
    ) -> None:
        if max_iters < 1:
            raise ConfigError(f"schedule.max_iters must be >= 1, got {max_iters}")
        if warmup not in WARMUP_KINDS:
            raise ConfigError(
                f"schedule.warmup must be one of {list(WARMUP_KINDS)}, got {warmup!r}"
            )
        if warmup_iters < 0:
            raise ConfigError(f"schedule.warmup_iters must be >= 0, got {warmup_iters}")
        if not 0 < warmup_ratio <= 1:
            raise ConfigError(f"schedule.warmup_ratio must be in (0, 1], got {warmup_ratio}")
        if power < 0 or min_lr < 0:
            raise ConfigError(f"schedule.power and min_lr must be >= 0, got {power}, {min_lr}")
        if poly_after_warmup and warmup_iters >= max_iters:
            raise ConfigError(
                f"schedule.poly_after_warmup needs warmup_iters < max_iters, got "
                f"{warmup_iters} and {max_iters}"
            )
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.warmup_iters = int(warmup_iters)
        self.warmup = warmup
        self.warmup_ratio = float(warmup_ratio)
        self.min_lr = float(min_lr)
        self.poly_after_warmup = bool(poly_after_warmup)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, iteration: int, base_lr: float) -> float:
        """The rate of a group with ``base_lr`` at ``iteration`` (closed form, no state)."""
        if self.poly_after_warmup:
            done = min(max(iteration - self.warmup_iters, 0), self.max_iters - self.warmup_iters)
            progress = done / (self.max_iters - self.warmup_iters)
        else:
            progress = min(iteration, self.max_iters) / self.max_iters
        poly = (base_lr - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr
        return _warm(iteration, self.warmup_iters, self.warmup, self.warmup_ratio) * poly

    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress only: its settings come from the config when resuming, so
        that a resumed run may change them (e.g. a larger ``max_iters`` extends the run)."""
        return {k: v for k, v in super().state_dict().items() if k not in SETTINGS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the progress and set each group's rate for it under the current settings."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in SETTINGS})
        rates = self.get_lr()
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        self._last_lr = rates

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, float(base)) for base in self.base_lrs]

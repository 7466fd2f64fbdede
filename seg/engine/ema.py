"""Exponential moving average (EMA) of a model's weights and BatchNorm statistics.

:class:`ModelEma` keeps a copy of the trained model whose parameters and floating-point
buffers (BatchNorm running means and variances) follow it::

    ema = d * ema + (1 - d) * model        after every ``every``-th optimizer step

with ``d = decay`` or, with ``warmup``, ``d = min(decay, (1 + n) / (10 + n))`` at the n-th
update (the warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so that
the random initial weights do not linger in a short run: with ``decay=0.9998`` and no
warm-up they would still weigh ``0.9998 ** 1200 = 0.79`` after 1200 updates.

The update is ``torch.optim.swa_utils.get_ema_multi_avg_fn``: one ``torch._foreach_lerp_``
per (device, dtype) group, launched without waiting for the device. Integer buffers
(BatchNorm's ``num_batches_tracked``) are copied. ``torch.optim.swa_utils.AveragedModel``
itself is not used: it averages integer buffers with truncation (``num_batches_tracked``
reads 20 after 30 steps at decay 0.9) and reads its update counter on the host at every
update (``bool(n_averaged == 0)``).

The averaged copy is always in eval mode: it is only evaluated, never trained.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


@dataclass(frozen=True)
class EmaSettings:
    """``trainer.ema``: ``decay`` in (0, 1), an update every ``every`` optimizer steps,
    ``warmup`` of the decay over the first updates."""

    decay: float
    every: int = 1
    warmup: bool = True


class ModelEma:
    """An EMA copy of ``model`` (parameters and buffers), updated by :meth:`step`.

    Args:
        model: the trained, bare model (not a DDP or compiled wrapper); its tensors are
            read at each update, so it must not be moved to another device afterwards.
        settings: decay, update interval and warm-up.

    Attributes:
        model: the averaged copy (eval mode, no gradients), evaluated instead of ``source``.
        steps: optimizer steps seen; updates happen at multiples of ``settings.every``.
        updates: averaging updates done (the warm-up position).
    """

    def __init__(self, model: nn.Module, settings: EmaSettings) -> None:
        self.source = model
        self.settings = settings
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.steps = 0
        self.updates = 0
        # Pairs (averaged, source) grouped by (device, dtype): one foreach call per group.
        self._float_groups: dict[Any, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(
            lambda: ([], [])
        )
        self._int_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for averaged, current in zip(_tensors(self.model), _tensors(model), strict=True):
            if averaged.is_floating_point():
                group = self._float_groups[(averaged.device, averaged.dtype)]
                group[0].append(averaged)
                group[1].append(current)
            else:
                self._int_pairs.append((averaged, current))

    def decay(self) -> float:
        """The decay of the next update."""
        decay = self.settings.decay
        if self.settings.warmup:
            decay = min(decay, (1 + self.updates) / (10 + self.updates))
        return decay

    def step(self) -> None:
        """Count one optimizer step; average at every ``settings.every``-th."""
        self.steps += 1
        if self.steps % self.settings.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """``ema = d * ema + (1 - d) * model`` for floating tensors; integer ones copied."""
        average = get_ema_multi_avg_fn(self.decay())
        for averaged, current in self._float_groups.values():
            average(averaged, current, None)
        for averaged, current in self._int_pairs:
            averaged.copy_(current)
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the source model's current weights (no updates counted)."""
        for averaged, current in zip(_tensors(self.model), _tensors(self.source), strict=True):
            averaged.copy_(current)
        self.steps = self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"model": averaged state dict, "steps", "updates", "decay", "every"}`` (the
        settings are stored for the record; a resumed run uses its config's)."""
        return {
            "model": self.model.state_dict(),
            "steps": self.steps,
            "updates": self.updates,
            "decay": self.settings.decay,
            "every": self.settings.every,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (strict: every weight must fit)."""
        self.model.load_state_dict(state["model"])
        self.steps, self.updates = int(state["steps"]), int(state["updates"])


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in registration order (the same order in a deep copy)."""
    return [*model.parameters(), *model.buffers()]

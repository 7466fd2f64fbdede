"""The weighted sum of one loss per model head, which training calls."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from seg.errors import ConfigError


@dataclass
class LossOutput:
    """What ``MultiHeadLoss`` returns: the weighted total, each head's term, logging stats."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class MultiHeadLoss(nn.Module):
    """Weighted sum of one loss per model head.

    ``heads`` maps a head name (``main``, ``aux2``, ...) to ``{"loss": module, "weight": float}``
    (``weight`` defaults to 1). Any ``Mapping`` works, including the ``DictConfig`` that Hydra
    passes when it instantiates the nested loss nodes. ``name`` labels the setting in logs.

    ``class_weight`` is the loss config's one per-class weight setting (``loss.class_weight``):
    configs/loss/*.yaml pass it to every head's loss (``class_weights: ${loss.class_weight}``),
    which applies it. Here it is only kept, as ``self.class_weight`` (a list or None), and
    an unresolved ``auto`` is refused: the training run turns it into a list first.
    """

    def __init__(
        self,
        heads: Mapping[str, Mapping[str, Any]],
        name: str | None = None,
        class_weight: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if isinstance(class_weight, str):
            raise ConfigError(
                f"loss.class_weight={class_weight!r} must be resolved to a list before the loss "
                "is built (tools/train.py does it for 'auto')"
            )
        self.class_weight = None if class_weight is None else [float(v) for v in class_weight]
        if not isinstance(heads, Mapping) or len(heads) == 0:
            raise ConfigError(f"MultiHeadLoss heads must be a non-empty mapping, got {heads!r}")
        self.losses = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for head, spec in heads.items():
            if not isinstance(spec, Mapping) or "loss" not in spec:
                raise ConfigError(f"loss head '{head}' needs a 'loss' entry, got {spec!r}")
            unknown = set(spec) - {"loss", "weight"}
            if unknown:
                raise ConfigError(f"loss head '{head}' has unknown keys {sorted(unknown)}")
            module = spec["loss"]
            if not isinstance(module, nn.Module) or not hasattr(module, "forward_with_stats"):
                raise ConfigError(
                    f"loss head '{head}': 'loss' must be a loss module with forward_with_stats, "
                    f"got {type(module).__name__}"
                )
            weight = float(spec.get("weight", 1.0))
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"loss head '{head}' weight must be >= 0, got {weight}")
            self.losses[str(head)] = module
            self.weights[str(head)] = weight

    def forward(self, outputs: Mapping[str, Tensor], labels: Tensor) -> LossOutput:
        """outputs: head -> logits N x C x H x W; labels int64 N x H x W -> ``LossOutput``."""
        if not isinstance(outputs, Mapping):
            raise ConfigError(
                "MultiHeadLoss expects the model's dict of head outputs (train mode), got "
                f"{type(outputs).__name__}"
            )
        extra = [head for head in outputs if head not in self.losses]
        if extra:
            raise ConfigError(
                f"model head(s) {extra} have no configured loss (configured: {list(self.losses)})"
            )
        missing = [head for head in self.losses if head not in outputs]
        if missing:
            raise ConfigError(
                f"loss configured for head(s) {missing} that the model does not output "
                f"(outputs: {list(outputs)}); build the model with aux heads or drop them "
                f"from the loss config"
            )
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for head, module in self.losses.items():
            term, head_stats = module.forward_with_stats(outputs[head], labels)
            terms[head] = term
            stats.update({f"{head}/{name}": value for name, value in head_stats.items()})
            weighted = term * self.weights[head]
            total = weighted if total is None else total + weighted
        assert total is not None  # heads is non-empty
        return LossOutput(total=total, terms=terms, stats=stats)

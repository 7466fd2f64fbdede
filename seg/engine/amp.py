"""Mixed-precision settings for training: which autocast dtype, and whether a GradScaler.

``trainer.amp`` takes ``fp16``, ``bf16`` or ``off``:

- CUDA + ``fp16``: autocast to float16 and a GradScaler (float16 gradients underflow
  without loss scaling).
- CUDA + ``bf16``: autocast to bfloat16, no scaler (bfloat16 has float32's range).
- CPU + ``fp16``: plain float32 (CPU float16 kernels are slow and gain nothing); the
  fallback is logged.
- CPU + ``bf16``: CPU autocast to bfloat16, no scaler.
- ``off``: float32 everywhere.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from seg.errors import ConfigError

logger = logging.getLogger(__name__)

AMP_CHOICES = ("fp16", "bf16", "off")


@dataclass(frozen=True)
class AmpSettings:
    """Resolved mixed-precision settings for one device.

    Attributes:
        requested: the ``trainer.amp`` value as given.
        device_type: ``"cuda"`` or ``"cpu"``.
        dtype: autocast dtype, or None for float32 (no autocast).
        use_scaler: True only for float16 on CUDA.
    """

    requested: str
    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        """What actually runs: ``fp16``, ``bf16`` or ``fp32``."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[self.dtype]


def resolve_amp(requested: str, device: torch.device | str) -> AmpSettings:
    """Turn ``trainer.amp`` into the settings that apply on ``device``.

    Raises:
        ConfigError: ``requested`` is not one of ``fp16``, ``bf16``, ``off``.
    """
    requested = str(requested)
    if requested not in AMP_CHOICES:
        raise ConfigError(f"trainer.amp must be one of {list(AMP_CHOICES)}, got {requested!r}")
    device_type = torch.device(device).type
    if requested == "off":
        return AmpSettings(requested, device_type, None, False)
    if requested == "bf16":
        return AmpSettings(requested, device_type, torch.bfloat16, False)
    if device_type == "cuda":
        return AmpSettings(requested, device_type, torch.float16, True)
    logger.info("trainer.amp=fp16 applies to CUDA only; training on %s in float32", device_type)
    return AmpSettings(requested, device_type, None, False)


def autocast(settings: AmpSettings) -> AbstractContextManager:
    """The autocast context for the forward pass and loss (a no-op for float32)."""
    if settings.dtype is None:
        return nullcontext()
    return torch.autocast(device_type=settings.device_type, dtype=settings.dtype)


def build_grad_scaler(settings: AmpSettings) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for float16 on CUDA.

    A disabled scaler is a pass-through (``scale(loss)`` returns ``loss``, ``step`` calls
    ``optimizer.step()``), so the training step has a single code path, and its (empty)
    state dict still goes into checkpoints.
    """
    return torch.amp.GradScaler(settings.device_type, enabled=settings.use_scaler)

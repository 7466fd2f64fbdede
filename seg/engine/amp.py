"""Mixed precision: the one vocabulary of AMP settings, for training and inference alike.

``trainer.amp``, ``eval.amp`` and the prediction tool's ``amp`` take ``fp16``, ``bf16``,
``off`` or ``auto`` (YAML reads a bare ``off`` as false, so ``false``/``null`` mean ``off``
too, and ``true`` means the device's usual half precision: fp16 on CUDA, bf16 elsewhere):

- CUDA + ``fp16``: autocast to float16, and in training a GradScaler (float16 gradients
  underflow without loss scaling).
- CUDA + ``bf16``: autocast to bfloat16, no scaler (bfloat16 has float32's range).
- CPU + ``fp16``: plain float32 (CPU float16 kernels are slow and gain nothing); the
  fallback is logged.
- CPU + ``bf16``: CPU autocast to bfloat16, no scaler.
- ``off``: float32 everywhere.
- ``auto``: fp16 on CUDA; on a CPU, bf16 where the CPU computes in bfloat16 natively
  (AVX512-BF16 or AMX: 1.7-1.9x the float32 training step on such a CPU,
  docs/benchmarks.md), float32 elsewhere (emulated bfloat16 is slower than float32).
  ``make demo`` trains with it.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from seg.errors import ConfigError

logger = logging.getLogger(__name__)

AMP_CHOICES = ("fp16", "bf16", "off", "auto")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}


@dataclass(frozen=True)
class AmpSettings:
    """Resolved mixed-precision settings for one device.

    Attributes:
        requested: the setting as given (``fp16``, ``bf16`` or ``off``).
        device_type: ``"cuda"`` or ``"cpu"``.
        dtype: autocast dtype, or None for float32 (no autocast).
        use_scaler: True only for float16 on CUDA (read by the training step).
    """

    requested: str
    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        """What actually runs: ``fp16``, ``bf16`` or ``fp32``."""
        return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[self.dtype]


def amp_choice(value: Any, device_type: str, key: str) -> str:
    """``value`` as one of :data:`AMP_CHOICES` (bools and None accepted, see the module doc).

    Raises:
        ConfigError: naming ``key`` for anything else.
    """
    if value is None or value is False:
        return "off"
    if value is True:
        return "fp16" if device_type == "cuda" else "bf16"
    if str(value) not in AMP_CHOICES:
        raise ConfigError(
            f"{key} must be one of {list(AMP_CHOICES)} (or true/false), got {value!r}"
        )
    return str(value)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX tiles).

    Read through ``torch.cpu``'s capability probes (private names; a torch without them
    answers False, which keeps float32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_amp(value: Any, device: torch.device | str, key: str = "trainer.amp") -> AmpSettings:
    """Turn an AMP setting into what applies on ``device``; ``key`` names it in errors."""
    device_type = torch.device(device).type
    choice = amp_choice(value, device_type, key)
    if choice == "auto":
        if device_type == "cuda":
            dtype = torch.float16
        else:
            dtype = torch.bfloat16 if cpu_has_native_bf16() else None
            what = "bf16 (native bfloat16)" if dtype else "float32 (no native bfloat16)"
            logger.info("%s=auto on this %s: %s", key, device_type, what)
        return AmpSettings(choice, device_type, dtype, dtype is torch.float16)
    dtype = _DTYPES[choice]
    if choice == "fp16" and device_type != "cuda":
        logger.info("%s=fp16 applies to CUDA only; running on %s in float32", key, device_type)
        dtype = None
    return AmpSettings(choice, device_type, dtype, dtype is torch.float16)


def autocast(settings: AmpSettings) -> AbstractContextManager:
    """The autocast context for forward passes (and the loss); a no-op for float32."""
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

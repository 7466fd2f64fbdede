"""SGD with weight decay on weights only, per-module learning-rate multipliers, in its
fastest available implementation.

Norm-layer parameters (BatchNorm scale/shift, and the like) and every bias get no weight
decay: decaying them towards zero only fights the normalisation (CoinCheung/BiSeNet's
recipe; for BiSeNetV2 these are exactly its 1-d parameters). ``lr_mult`` gives the
parameters of named top-level modules a multiple of the base rate (the reference recipe
trains the main and auxiliary heads at 10x the rate of the branches). ``impl="auto"`` picks the fused SGD kernel where PyTorch has one for
the parameters' device (CUDA and CPU), else the multi-tensor ``foreach`` version. The
fused kernel also lets the trainer skip a step on the device (``found_inf``) without a
host-device sync; see ``seg.engine.step``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seg.errors import ConfigError

#: Module types whose parameters are never weight-decayed.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
#: Devices on which ``torch.optim.SGD(fused=True)`` runs.
FUSED_DEVICE_TYPES = ("cuda", "cpu")
IMPLS = ("auto", "fused", "foreach", "plain")


def split_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed).

    Not decayed: every parameter of a normalisation layer, and every parameter named
    ``bias``. Shared parameters are listed once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_TYPES) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay


def split_by_module(
    model: nn.Module, lr_mult: Mapping[str, float]
) -> list[tuple[float, nn.Module]]:
    """``(multiplier, module)`` pairs covering ``model``: each top-level child named in
    ``lr_mult`` with its multiplier, every other child with 1.

    Raises:
        ConfigError: ``lr_mult`` names a module the model does not have, or a multiplier
            that is not positive.
    """
    children = dict(model.named_children())
    unknown = sorted(set(lr_mult) - set(children))
    if unknown:
        raise ConfigError(
            f"optim.lr_mult names {unknown}, which the model does not have "
            f"(its top-level modules: {sorted(children)})"
        )
    for name, mult in lr_mult.items():
        if not float(mult) > 0:
            raise ConfigError(f"optim.lr_mult.{name} must be > 0, got {mult}")
    return [(float(lr_mult.get(name, 1.0)), child) for name, child in children.items()]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    decay_norm_and_bias: bool = False,
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per (rate multiplier, decayed or not) that occurs.

    Weights get ``weight_decay``, norms and biases none (every parameter is decayed with
    ``decay_norm_and_bias=True``); modules named in ``lr_mult`` get ``lr * multiplier``.
    Each group also records its ``lr_mult`` (for logs and tests). Parameters directly on
    ``model`` (not in a child module) count with multiplier 1.
    """
    parts = split_by_module(model, lr_mult or {}) if lr_mult else [(1.0, model)]
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for mult, module in parts:
        decay, no_decay = split_decay_params(module)
        if decay_norm_and_bias:
            decay, no_decay = decay + no_decay, []
        groups.setdefault((mult, True), []).extend(decay)
        groups.setdefault((mult, False), []).extend(no_decay)
    if lr_mult:
        in_children = {id(p) for _, module in parts for p in module.parameters()}
        own = [p for p in model.parameters(recurse=False) if id(p) not in in_children]
        groups.setdefault((1.0, True), []).extend(p for p in own if p.requires_grad)
    return [
        {
            "params": params,
            "lr": lr * mult,
            "lr_mult": mult,
            "weight_decay": weight_decay if decayed else 0.0,
        }
        for (mult, decayed), params in groups.items()
        if params
    ]


def _impl_flags(impl: str, device_type: str) -> dict[str, bool]:
    """``fused``/``foreach`` keyword arguments of ``torch.optim.SGD`` for ``impl``."""
    if impl not in IMPLS:
        raise ConfigError(f"optim.impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = "fused" if device_type in FUSED_DEVICE_TYPES else "foreach"
    if impl == "fused":
        if device_type not in FUSED_DEVICE_TYPES:
            raise ConfigError(f"optim.impl=fused is not available for {device_type} parameters")
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {"foreach": False}


def build_sgd(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    decay_norm_and_bias: bool = False,
    impl: str = "auto",
    lr_mult: Mapping[str, float] | None = None,
) -> torch.optim.SGD:
    """SGD over ``model``'s parameters (build it after moving the model to its device).

    Momentum buffers are created as zeros right away. With zero dampening that gives the
    same updates as PyTorch's lazy first-step initialisation, and it keeps a step that the
    fused kernel skips on the very first iteration from leaving the buffers uninitialised.

    Args:
        model: the model whose trainable parameters are optimised.
        lr, momentum, weight_decay, nesterov: as in ``torch.optim.SGD``.
        decay_norm_and_bias: also decay norm-layer parameters and biases.
        impl: ``auto`` (fused where available, else foreach), ``fused``, ``foreach`` or
            ``plain`` (the single-tensor for-loop; the reference for benchmarks).
        lr_mult: top-level module name -> multiplier of ``lr`` (e.g. ``{"head": 10,
            "aux_heads": 10}``); the schedule scales every group's rate alike.
    """
    if lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {weight_decay}")
    first = next((p for p in model.parameters() if p.requires_grad), None)
    if first is None:
        raise ConfigError("the model has no trainable parameters")
    optimizer = torch.optim.SGD(
        param_groups(model, lr, weight_decay, decay_norm_and_bias, lr_mult),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        **_impl_flags(impl, first.device.type),
    )
    if momentum > 0:
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
    return optimizer


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True when every group of ``optimizer`` uses the fused kernel (which honours ``found_inf``)."""
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)

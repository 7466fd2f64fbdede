"""Small helpers for DDP runs started by ``torchrun``.

Everything here also works in a plain single process: rank 0, world size 1, and
collectives that do nothing. ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_distributed` reads them and picks NCCL on CUDA machines, Gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from seg.errors import ConfigError


def env_world_size() -> int:
    """World size announced by ``torchrun`` (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_cuda(setting: str) -> bool:
    """Whether a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) runs on CUDA here.
    A setting that does not parse counts as not CUDA (:func:`resolve_device` reports it)."""
    if setting == "auto":
        return torch.cuda.is_available()
    try:
        return torch.device(setting).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def init_distributed(use_cuda: bool | None = None, backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Returns True when running distributed (world size > 1). Calling it again, or in a
    plain single process, is harmless. ``use_cuda``: whether the run computes on GPUs
    (default: whenever CUDA is available); then each process is pinned to the GPU
    ``LOCAL_RANK`` and the backend is NCCL, else Gloo (a ``device=cpu`` run on a GPU
    machine must not ask NCCL to reduce CPU tensors).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if env_world_size() <= 1:
        return False
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        check_gpu_per_process(local_rank(), torch.cuda.device_count())
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return True


def check_gpu_per_process(rank_on_machine: int, gpus: int) -> None:
    """Refuse more torchrun processes on a machine than it has GPUs (NCCL runs one process
    per GPU; without this, the extra process dies on ``invalid device ordinal``)."""
    if rank_on_machine >= gpus:
        processes = os.environ.get("LOCAL_WORLD_SIZE", f"more than {gpus}")
        raise ConfigError(
            f"torchrun started {processes} processes on this machine, but it has {gpus} "
            f"GPU(s): LOCAL_RANK {rank_on_machine} has none; use --nproc_per_node={gpus} "
            "or fewer (CUDA_VISIBLE_DEVICES limits the GPUs seen)"
        )


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Index of this process on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that prints and writes files (rank 0)."""
    return get_rank() == 0


def default_device() -> torch.device:
    """This process's device: its own GPU under DDP, ``cuda`` if present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The device a ``key=name`` setting asks for; ``key`` names the setting in errors.

    ``auto``: this process's GPU when CUDA is available (its own under DDP), else the CPU.
    An explicit ``cuda`` under DDP also means this process's own GPU.
    """
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name} asked for, but CUDA is not available (use {key}=cpu)")
        if device.index is None and is_distributed():
            device = torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_distributed():
        dist.destroy_process_group()


def same_on_all_ranks(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """Whether every process holds the same ``tensors`` (True in a single process).

    Compares per-tensor float64 sums and sums of squares with one all-gather: a cheap
    fingerprint, enough to catch ranks that drifted apart.
    """
    if not is_distributed():
        return True
    fingerprint = torch.stack(
        [
            torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
            for t in tensors
        ]
    ).to(device)
    gathered = [torch.empty_like(fingerprint) for _ in range(get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])

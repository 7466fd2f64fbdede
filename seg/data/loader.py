"""Training and evaluation loaders: infinite seeded sampler, DDP sharding, worker seeding.

Exact resume. The training order is a pure function of ``(seed, pass index)``: pass ``p``
is ``default_rng([seed, p]).permutation(N)``; rank ``r`` of ``W`` takes positions
``r, r + W, r + 2W, ...`` of it (``N // W`` each, so every rank gets the same count and
distinct images; the ``N % W`` leftover differ from pass to pass). Restarting at iteration
``i`` skips ``i * batch_size`` samples of the rank's stream by arithmetic: only the
permutation of the pass in which training resumes is computed.

Augmentation. The sampler yields ``(index, sample_seed)`` with
``sample_seed = f(seed, global position)``, the global position being
``pass * N + position in the permutation`` (unique over ranks and passes). Datasets
re-seed their albumentations pipeline with it per item (``seg.data.transforms``), so an
item's augmentation depends neither on which worker loads it nor on what the worker
loaded before: a resumed run sees bit-identical batches.

Fixed batches (``trainer.overfit_batches=N``). :class:`FixedBatchesSampler` takes the
first ``N x batch_size`` keys of the rank's stream and yields them again and again. As an
item's augmentation depends on its key only, every pass gives bit-identical batches: the
augmentation is drawn once and then frozen.

Errors. A ``SegError`` met while loading an item (a corrupt image, a label with unknown
values) reaches the caller as itself, one line naming the file, whether the item was loaded
in the main process or in a worker: PyTorch would re-raise a worker's exception with the
worker's whole traceback in its message. Items are loaded through :class:`OneLineErrors`,
which hands a :class:`LoadFailure` back instead of raising; the loaders' iterators raise
its error in the main process (and write it to ``train.log`` during a run).
"""

from __future__ import annotations

import itertools
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from seg.errors import ConfigError, SegError, log_to_files


def sample_seed(seed: int, position: int) -> int:
    """32-bit augmentation seed of the sample at global ``position`` of run ``seed``."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class InfiniteSampler(Sampler):
    """Endless, seeded, DDP-sharded stream of ``(index, sample_seed)``.

    Args:
        size: number of items ``N`` in the dataset.
        seed: run seed (non-negative).
        rank, world_size: this process's DDP rank and the number of ranks.
        start: number of samples of this rank's stream to skip (``start_iter * batch_size``).
        shuffle: False keeps the order 0..N-1 in every pass (for debugging).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} for world size {world_size}")
        if seed < 0 or start < 0:
            raise ConfigError(f"seed and start must be >= 0, got seed={seed}, start={start}")
        self.per_rank = size // world_size
        if self.per_rank == 0:
            raise ConfigError(f"dataset of {size} items is too small for {world_size} ranks")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start, self.shuffle = start, shuffle

    def permutation(self, pass_index: int) -> np.ndarray:
        """Order of pass ``pass_index`` over all ``N`` items (before sharding)."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, pass_index]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pass_index, offset = divmod(self.start, self.per_rank)
        while True:
            order = self.permutation(pass_index)
            for j in range(offset, self.per_rank):
                position = self.rank + j * self.world_size
                global_position = pass_index * self.size + position
                yield int(order[position]), sample_seed(self.seed, global_position)
            offset = 0
            pass_index += 1


class FixedBatchesSampler(Sampler):
    """The first ``count`` keys of ``stream`` (an :class:`InfiniteSampler` starting at 0),
    over and over (``endless``), or once.

    Args:
        stream: the rank's training stream; its first ``count`` ``(index, sample_seed)``
            keys are kept, so that each pass yields the same items, augmented alike.
        count: keys kept (``N`` batches x the per-rank batch size).
        start: keys of the endless stream to skip (a resumed run: ``start_iter x batch``).
        endless: False yields the keys once (the evaluation of these batches).
    """

    def __init__(
        self, stream: InfiniteSampler, count: int, start: int = 0, endless: bool = True
    ) -> None:
        if count < 1 or start < 0:
            raise ConfigError(f"fixed batches need count >= 1 and start >= 0, got {count}, {start}")
        self.keys = list(itertools.islice(iter(stream), count))
        self.start, self.endless = start, endless

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.endless:
            yield from self.keys
            return
        offset = self.start % len(self.keys)
        while True:
            yield from self.keys[offset:]
            offset = 0

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless FixedBatchesSampler has no length")
        return len(self.keys)


class ShardedEvalSampler(Sampler):
    """Rank ``r`` gets items ``r, r + W, ...``: no padding, so every image is counted once
    when confusion matrices are all-reduced (ranks may differ by one item)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} for world size {world_size}")
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class LoadFailure:
    """An item that could not be loaded: ``error`` is the ``SegError`` (picklable) raised."""

    error: SegError


class OneLineErrors(Dataset):
    """``dataset`` whose items are a :class:`LoadFailure` where loading raised a ``SegError``.

    Other exceptions (bugs) propagate with their tracebacks as usual.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.dataset[key]
        except SegError as error:
            return LoadFailure(error)


def collate_or_failure(samples: list[Any]) -> Any:
    """``default_collate``, or the first :class:`LoadFailure` among ``samples``."""
    for sample in samples:
        if isinstance(sample, LoadFailure):
            return sample
    return default_collate(samples)


class SegDataLoader(DataLoader):
    """A ``DataLoader`` over :class:`OneLineErrors` that raises a failed item's ``SegError``
    in the main process, as itself (also into the log files of a training run)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, LoadFailure):
                error = batch.error
                del batch
                log_to_files(error)
                try:
                    raise error
                finally:
                    # No frame -> error -> traceback -> frame cycle: the loader and its
                    # workers are freed (and shut down) as soon as the error is handled.
                    del error
            yield batch


def seed_worker(worker_id: int, base_seed: int) -> None:
    """Set up a loader worker: seed its global RNGs, for any code that uses them, and let it
    outlast the first SIGTERM (:func:`outlast_first_sigterm`).

    (Do not call ``cv2.setNumThreads`` here: in a forked worker whose parent already ran
    OpenCV's thread pool it can block forever.)
    """
    del worker_id  # torch.initial_seed() already differs per worker
    worker_seed = (base_seed + torch.initial_seed()) % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    outlast_first_sigterm()


def outlast_first_sigterm() -> None:
    """In a loader worker: let the first SIGTERM pass, and end on the second.

    A SIGTERM sent to every process of a run at once (``timeout``, ``kill -- -PGID``, a
    scheduler signalling all processes of a job) killed the workers, and the main process
    then died inside its step with "DataLoader worker ... is killed by signal", losing
    everything since its last checkpoint. The main process gets the same signal: it finishes
    the step, saves ``last.pt`` and shuts its workers down as usual. A second SIGTERM (the
    loader's own ``terminate`` at shutdown, ``timeout -k``'s or the scheduler's follow-up)
    ends the worker as before; a worker whose main process is gone exits by itself
    (PyTorch's watchdog).
    """

    def first(signum: int, frame: object) -> None:
        del signum, frame
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, first)


def _loader_kwargs(num_workers: int, pin_memory: bool, seed: int) -> dict:
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "worker_init_fn": partial(seed_worker, base_seed=seed),
        "generator": torch.Generator().manual_seed(seed),
    }
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = 2
    return kwargs


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    pin_memory: bool = False,
    fixed_batches: int = 0,
) -> DataLoader:
    """Endless training loader over ``dataset`` (batches of ``batch_size`` per rank).

    Batches: ``{"image": uint8 N x H x W x 3, "label": uint8 N x H x W, "name": [str]}``.
    Iterate it once (``it = iter(loader)``; ``next(it)`` per step). With ``start_iter=i`` the
    first batch is the one an uninterrupted run would have used at iteration ``i``.
    ``pin_memory``: True for a run on CUDA (page-locked batches copy to the GPU without
    waiting); callers decide from their device, as a CPU run on a GPU machine must not
    pin. A ``SegError`` raised by an item is raised by ``next(it)``, as itself, from
    workers too. ``fixed_batches=N`` (> 0): the same first N batches over and over
    (:class:`FixedBatchesSampler`).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    start = start_iter * batch_size
    sampler: Sampler
    if fixed_batches > 0:
        stream = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
        sampler = FixedBatchesSampler(stream, fixed_batches * batch_size, start=start)
    else:
        sampler = InfiniteSampler(
            len(dataset), seed=seed, rank=rank, world_size=world_size, start=start
        )
    return SegDataLoader(
        OneLineErrors(dataset),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_or_failure,
        drop_last=True,
        **_loader_kwargs(num_workers, pin_memory, seed * 1000 + rank),
    )


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Finite loader over this rank's shard of ``dataset`` in index order (no duplicates).

    A ``SegError`` raised by an item is raised by the iteration, as itself (see above).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return SegDataLoader(
        OneLineErrors(dataset),
        batch_size=batch_size,
        sampler=ShardedEvalSampler(len(dataset), rank=rank, world_size=world_size),
        collate_fn=collate_or_failure,
        drop_last=False,
        **_loader_kwargs(num_workers, pin_memory, rank),
    )


def build_fixed_batches_loader(
    dataset: Dataset,
    batch_size: int,
    num_batches: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """The ``num_batches`` batches of ``build_train_loader(..., fixed_batches=num_batches)``,
    once, item for item as training sees them (same keys, same augmentation): what
    ``trainer.overfit_batches`` evaluates. Loaded in the main process (a few batches)."""
    if batch_size < 1 or num_batches < 1:
        raise ConfigError(
            f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}"
        )
    stream = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    return SegDataLoader(
        OneLineErrors(dataset),
        batch_size=batch_size,
        sampler=FixedBatchesSampler(stream, num_batches * batch_size, endless=False),
        collate_fn=collate_or_failure,
        drop_last=False,
        **_loader_kwargs(0, pin_memory, seed * 1000 + rank),
    )

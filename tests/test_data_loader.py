"""Infinite sampler (reshuffle, DDP shards, resume) and loaders (seeded, exact resume)."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from seg.data.loader import (
    InfiniteSampler,
    ShardedEvalSampler,
    build_eval_loader,
    build_train_loader,
)
from seg.data.transforms import apply_transform, build_train_transform, to_sample, unpack_key
from seg.engine.logging import run_logging
from seg.errors import ConfigError, DatasetError, SegError


class ToyDataset(Dataset):
    """Random-looking images whose label encodes the index; train transform applied."""

    def __init__(self, n=10, transform=None):
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, seed = unpack_key(key)
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        label = np.full((24, 32), index, np.uint8)
        image, label = apply_transform(self.transform, image, label, seed)
        return to_sample(image, label, str(index))


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_pass_is_a_permutation_and_passes_differ():
    items = _take(InfiniteSampler(10, seed=3), 30)
    passes = [[i for i, _ in items[k * 10 : (k + 1) * 10]] for k in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1] != passes[2]
    seeds = [s for _, s in items]
    assert len(set(seeds)) == 30  # every sample gets its own augmentation seed
    assert _take(InfiniteSampler(10, seed=3), 30) == items  # seeded
    assert [i for i, _ in _take(InfiniteSampler(10, seed=4), 10)] != passes[0]


@pytest.mark.parametrize("n,world", [(10, 2), (11, 3), (8, 4)])
def test_ddp_shards_disjoint_and_equal(n, world):
    per_rank = n // world
    for pass_index in range(3):
        shards = [
            [
                i
                for i, _ in _take(
                    InfiniteSampler(n, seed=0, rank=r, world_size=world), per_rank * 3
                )
            ][pass_index * per_rank : (pass_index + 1) * per_rank]
            for r in range(world)
        ]
        assert all(len(s) == per_rank for s in shards)
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat) == per_rank * world
    seeds = [
        s for r in range(world) for _, s in _take(InfiniteSampler(n, rank=r, world_size=world), 6)
    ]
    assert len(set(seeds)) == len(seeds)  # augmentation seeds differ across ranks


def test_resume_skips_exactly():
    full = _take(InfiniteSampler(7, seed=1, rank=1, world_size=2), 40)
    for start in (0, 1, 3, 5, 17):
        assert (
            _take(InfiniteSampler(7, seed=1, rank=1, world_size=2, start=start), 10)
            == full[start : start + 10]
        )


def test_bad_sampler_arguments():
    with pytest.raises(ConfigError, match="too small"):
        InfiniteSampler(2, world_size=4, rank=0)
    with pytest.raises(ConfigError, match="rank"):
        InfiniteSampler(10, world_size=2, rank=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_resume_gives_identical_batches(workers):
    ds = ToyDataset(10, transform=build_train_transform([16, 16], [0.5, 1.5]))
    loader = build_train_loader(ds, batch_size=3, num_workers=workers, seed=7, pin_memory=False)
    it = iter(loader)
    batches = [next(it) for _ in range(6)]
    assert batches[0]["image"].shape == (3, 16, 16, 3) and batches[0]["image"].dtype == torch.uint8
    assert batches[0]["label"].shape == (3, 16, 16) and batches[0]["label"].dtype == torch.uint8
    resumed = iter(
        build_train_loader(
            ds, batch_size=3, num_workers=workers, seed=7, start_iter=4, pin_memory=False
        )
    )
    for expected in batches[4:]:
        got = next(resumed)
        assert got["name"] == expected["name"]
        assert torch.equal(got["image"], expected["image"])
        assert torch.equal(got["label"], expected["label"])


def test_eval_sharding_covers_each_item_once():
    n, world = 11, 3
    shards = [list(ShardedEvalSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    loader = build_eval_loader(
        ToyDataset(n), batch_size=2, num_workers=0, rank=1, world_size=world, pin_memory=False
    )
    names = [name for batch in loader for name in batch["name"]]
    assert names == [str(i) for i in shards[1]] and len(names) == 4


class BadFileDataset(ToyDataset):
    """Item 3 is a corrupt file: reading it raises the one-line ``DatasetError``."""

    def __getitem__(self, key):
        index, _ = unpack_key(key)
        if index == 3:
            raise DatasetError("corrupt, truncated or unsupported image file: /data/img_3.png")
        return super().__getitem__(key)


def _error_of(call) -> tuple[str, type]:
    """``(message, type)`` of the ``SegError`` that ``call()`` raises. Only plain values come
    out: a kept exception's traceback would hold the loader (and its worker processes)
    in a reference cycle, and a loader freed by the cycle collector shuts its workers
    down only after a 5 s timeout each."""
    try:
        call()
    except SegError as error:
        return str(error), type(error)
    raise AssertionError("no SegError raised")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_bad_file_is_the_same_one_line_error_from_workers(workers, kind, tmp_path, capsys):
    ds = BadFileDataset(6)
    if kind == "train":
        loader = build_train_loader(ds, 2, workers, seed=0, pin_memory=False)
        iterator = iter(loader)
        batches = lambda: [next(iterator) for _ in range(6)]  # noqa: E731 - passes over item 3
    else:
        loader = build_eval_loader(ds, 2, workers, pin_memory=False)
        batches = lambda: list(loader)  # noqa: E731
    log_file = tmp_path / "train.log"
    with run_logging(log_file, is_main=True):
        message, kind_of_error = _error_of(batches)
    assert message == "corrupt, truncated or unsupported image file: /data/img_3.png"
    assert kind_of_error is DatasetError
    # In train.log once; not on the console, where the tool's error edge prints it.
    assert log_file.read_text().count("ERROR seg.train: corrupt, truncated") == 1
    assert "corrupt" not in capsys.readouterr().err


def test_bugs_in_a_dataset_keep_their_traceback():
    class Broken(ToyDataset):
        def __getitem__(self, key):
            raise ZeroDivisionError("a bug, not bad data")

    with pytest.raises(ZeroDivisionError):
        next(iter(build_eval_loader(Broken(2), 1, 0, pin_memory=False)))

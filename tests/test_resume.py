"""resume=auto never takes another run: config comparison, the choice, job-folder claims,
the data order with and without loader workers, and end-to-end runs (seeds one after
another; a ``-m seed=0,1`` sweep run twice)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from seg.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint
from seg.data.loader import build_train_loader
from seg.engine.build import build_datasets
from seg.engine.state import (
    RESULT_NEUTRAL_KEYS,
    config_differences,
    find_auto_resume,
    resolve_resume,
)
from seg.engine.train_run import JOB_CLAIM, claim_job_folder, run
from seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def config(seed: int = 0, max_iters: int = 10, log_interval: int = 5, workers: int = 2) -> dict:
    return {
        "experiment_name": "exp",
        "seed": seed,
        "resume": "auto",
        "trainer": {"max_iters": max_iters, "log_interval": log_interval, "ckpt_interval": 5},
        "loader": {"batch_size": 2, "num_workers": workers},
        "loss": {"name": "ohem", "heads": {"main": {"weight": 1.0}}},
    }


def fake_run(folder: Path, cfg: dict, age_s: float = 0.0) -> Path:
    """A run folder whose checkpoints/last.pt holds ``cfg`` (older by ``age_s``)."""
    path = folder / "checkpoints" / "last.pt"
    save_checkpoint(path, {"config": cfg, "iteration": 3})
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_only_result_neutral_settings_are_ignored() -> None:
    base = config()
    assert config_differences(base, config(log_interval=1, workers=0)) == []
    assert config_differences(base, {**config(), "resume": None}) == []
    assert config_differences(base, config(seed=1)) == ["seed"]
    assert config_differences(base, config(max_iters=20)) == ["trainer.max_iters"]
    lacking = config()
    del lacking["loss"]["heads"]
    assert config_differences(base, lacking) == ["loss.heads.main.weight"]
    # A setting added later with a null default (off) is no difference from its absence in a
    # run started before it existed; a non-null value is.
    assert (
        config_differences(base, {**config(), "loss": {**base["loss"], "class_weight": None}}) == []
    )
    assert config_differences(
        base, {**config(), "loss": {**base["loss"], "class_weight": [1]}}
    ) == ["loss.class_weight"]
    assert {"resume", "loader.num_workers", "trainer.log_interval"} <= set(RESULT_NEUTRAL_KEYS)


def test_auto_resume_takes_the_run_with_this_config_not_the_newest(tmp_path: Path) -> None:
    seed0 = fake_run(tmp_path / "exp" / "t0", config(seed=0), age_s=60)
    fake_run(tmp_path / "exp" / "t1", config(seed=1), age_s=0)  # newest, another seed
    new_dir = tmp_path / "exp" / "t2"
    choice = find_auto_resume(new_dir, config(seed=0, workers=0))
    assert choice.path == seed0 and "same config" in choice.reason
    fresh = find_auto_resume(new_dir, config(seed=2))
    assert fresh.path is None
    assert "starting afresh" in fresh.reason and "seed: 1 there, 2 here" in fresh.reason
    longer = find_auto_resume(new_dir, config(seed=0, max_iters=20))
    assert longer.path is None and "trainer.max_iters: 10 there, 20 here" in longer.reason


def test_a_multirun_job_resumes_its_own_folder_only(tmp_path: Path) -> None:
    fake_run(tmp_path / "sweep" / "ohem-seed1", config(seed=1))
    own = tmp_path / "sweep" / "ohem-seed0"
    assert find_auto_resume(own, config(seed=0), own_folder_only=True).path is None
    mine = fake_run(own, config(seed=0))
    assert find_auto_resume(own, config(seed=0), own_folder_only=True).path == mine
    with pytest.raises(ConfigError, match=r"holds a run with another config \(seed: 0 there"):
        find_auto_resume(own, config(seed=5), own_folder_only=True)


def test_an_explicit_path_is_continued_and_its_differences_named(tmp_path: Path) -> None:
    path = fake_run(tmp_path / "run", config(max_iters=10))
    choice = resolve_resume(str(path), tmp_path / "new", config(max_iters=20))
    assert choice.path == path and "trainer.max_iters: 10 there, 20 here" in choice.reason
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path, config())


def test_a_job_folder_belongs_to_one_job(tmp_path: Path) -> None:
    folder = tmp_path / "ohem-seed0"
    claim_job_folder(folder, ["loss=ohem", "seed=0", "optim.lr=0.01", "resume=auto"])
    claim_job_folder(folder, ["loss=ohem", "seed=0", "optim.lr=0.01"])  # the same job again
    with pytest.raises(ConfigError, match=r"its overrides optim.lr=0.01; this job's optim.lr=0.02"):
        claim_job_folder(folder, ["loss=ohem", "seed=0", "optim.lr=0.02"])
    assert [p.name for p in folder.iterdir()] == [JOB_CLAIM]  # no temporaries left


def test_the_data_order_does_not_depend_on_loader_workers(tmp_path: Path) -> None:
    """Why loader.num_workers is result-neutral: the same batches, augmentation included."""
    cfg = compose_cfg(
        [
            f"dataset.root={tmp_path / 'synthcity'}",
            "dataset.generator.height=32",
            "dataset.generator.width=64",
            "dataset.generator.num_train=6",
            "dataset.generator.num_val=1",
            "dataset.crop_size=[24,24]",
        ]
    )
    train_set, _ = build_datasets(cfg)
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader(train_set, batch_size=2, num_workers=workers, seed=3)
        data = iter(loader)
        batches[workers] = [next(data) for _ in range(5)]  # more than one pass over 6 images
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a["name"] == b["name"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def tiny(data_root: Path) -> list[str]:
    """SynthCity at 32x64 (4 train / 1 val images), 2 iterations on the CPU."""
    return [
        f"dataset.root={data_root}",
        "dataset.generator.height=32",
        "dataset.generator.width=64",
        "dataset.generator.num_train=4",
        "dataset.generator.num_val=1",
        "dataset.crop_size=[32,64]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "trainer.max_iters=2",
        "trainer.log_interval=1",
        "trainer.eval_interval=2",
        "schedule.warmup_iters=1",
    ]


@pytest.mark.slow
def test_two_seeds_one_after_another_each_train_their_own_run(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs" / "synthcity_ohem"
    args = [*tiny(tmp_path / "synthcity"), "+experiment=synthcity_ohem", "resume=auto"]
    first = run(compose_cfg([*args, "seed=0"]), run_dir=outputs / "t0")
    first_last = load_checkpoint(first.run_dir / "checkpoints" / "last.pt")
    second = run(compose_cfg([*args, "seed=1"]), run_dir=outputs / "t1")
    assert second.run_dir == outputs / "t1" and second.iteration == 2
    last = load_checkpoint(
        outputs / "t1" / "checkpoints" / "last.pt", required_keys=CHECKPOINT_KEYS
    )
    assert last["config"]["seed"] == 1 and last["iteration"] == 2
    again = load_checkpoint(outputs / "t0" / "checkpoints" / "last.pt")
    assert again["config"]["seed"] == 0 and again["iteration"] == 2
    assert all(torch.equal(again["model"][k], v) for k, v in first_last["model"].items())
    log = (outputs / "t1" / "train.log").read_text()
    assert "starting afresh" in log and "seed: 0 there, 1 here" in log


@pytest.mark.slow
def test_a_seed_sweep_with_resume_auto_run_twice(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(REPO / "tools" / "train.py"),
        "-m",
        *tiny(tmp_path / "synthcity"),
        "seed=0,1",
        "resume=auto",
        f"hydra.sweep.dir={sweep}",
    ]
    for attempt in range(2):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        for seed in (0, 1):
            folder = sweep / f"ohem-seed{seed}"
            last = load_checkpoint(
                folder / "checkpoints" / "last.pt", required_keys=CHECKPOINT_KEYS
            )
            assert last["config"]["seed"] == seed and last["iteration"] == 2, attempt
    for seed in (0, 1):
        log = (sweep / f"ohem-seed{seed}" / "train.log").read_text()
        assert log.count("iter 2/2") == 1  # trained once; the second sweep continued it
        assert "finished earlier" in log
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml", "ohem-seed0", "ohem-seed1"]

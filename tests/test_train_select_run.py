"""End-to-end on tiny SynthCity: early stopping (and its exact resume), overfitting fixed
batches, and the collapse warning of a run whose training labels are all one class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seg.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from seg.engine.train_run import run

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path) -> list[str]:
    """SynthCity at 64x128 (12 train / 4 val images), whole-image crops, batch 2, CPU."""
    return [
        f"dataset.root={data_root}",
        "dataset.generator.height=64",
        "dataset.generator.width=128",
        "dataset.generator.num_train=12",
        "dataset.generator.num_val=4",
        "dataset.crop_size=[64,128]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "trainer.num_vis_images=0",
        "schedule.warmup_iters=2",
        "optim.lr=0.01",
    ]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_early_stop_ends_the_run_and_a_resumed_run_stops_at_the_same_iteration(
    tmp_path: Path,
) -> None:
    """patience 2, min_delta 0.5 (50 points: only the first evaluation counts as an
    improvement), evaluations every 2 iterations: the run stops after the evaluation at 6
    of 12, exit status 0, one line saying why. Resumed from its iteration-4 snapshot (the
    checkpoint an interruption there leaves), it stops at 6 too, with the same weights: the
    count and the reference came back from the checkpoint (without them it would go on)."""
    common = [
        *tiny_overrides(tmp_path / "synthcity"),
        "loss=ce",
        "trainer.max_iters=12",
        "trainer.eval_interval=2",
        "trainer.ckpt_interval=2",
        "trainer.log_interval=2",
        "trainer.keep_snapshots=3",
        "trainer.early_stop.patience=2",
        "trainer.early_stop.min_delta=0.5",
    ]
    run_dir = tmp_path / "outputs" / "default" / "a"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), *common, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    (line,) = [x for x in log.splitlines() if "early stop" in x and "done" not in x]
    assert "early stop at iteration 6: mIoU has not improved by more than " in line
    assert (
        "trainer.early_stop.min_delta=0.5 for 2 evaluations (patience=2); best mIoU" in line
        and "at iteration 2 (best.pt)" in line
    )
    folder = run_dir / "checkpoints"
    first = load_checkpoint(folder / "last.pt", required_keys=CHECKPOINT_KEYS)
    assert first["iteration"] == 6
    assert first["metrics"]["early_stop"]["evals_since_improvement"] == 2
    assert first["metrics"]["best_iteration"] == 2
    hparams = EventAccumulator(str(run_dir))
    hparams.Reload()
    assert "_hparams_/session_end_info" in hparams.PluginTagToContent("hparams")  # completed

    resumed = run(compose_cfg([*common, f"resume={folder / 'iter_000004.pt'}"]), tmp_path / "r")
    assert (resumed.iteration, resumed.stopped_early, resumed.run_dir) == (6, True, run_dir)
    again = load_checkpoint(folder / "last.pt", required_keys=CHECKPOINT_KEYS)
    assert weights_equal(again["model"], first["model"])
    assert again["metrics"]["early_stop"] == first["metrics"]["early_stop"]
    assert again["metrics"]["best_score"] == first["metrics"]["best_score"]

    # The same command again (resume=auto) finds the run finished: nothing to train.
    finished = run(compose_cfg([*common, "resume=auto"]), tmp_path / "outputs" / "default" / "b")
    assert (finished.iteration, finished.stopped_early) == (6, True)
    assert (
        "has not improved for 2 evaluations (trainer.early_stop"
        in (run_dir / "train.log").read_text().splitlines()[-1]
    )


@pytest.mark.slow
def test_overfit_batches_drives_the_loss_down_on_fixed_batches(tmp_path: Path) -> None:
    """One fixed batch of 2 images, cross-entropy: the main head's loss falls to under a
    third of its first logged value in 25 iterations, and the evaluation of that batch
    (not the val split) labels most of its pixels right."""
    cfg = compose_cfg(
        [
            *tiny_overrides(tmp_path / "synthcity"),
            "loss=ce",
            "optim.lr=0.05",
            "trainer.overfit_batches=1",
            "trainer.max_iters=25",
            "trainer.eval_interval=25",
            "trainer.log_interval=5",
        ]
    )
    result = run(cfg, run_dir=tmp_path / "run")
    main = [v for _, v in scalars(result.run_dir / "heads" / "main", "overview/per_head_loss")]
    assert len(main) == 5 and main[-1] < main[0] / 3, main
    assert result.metrics["aAcc"] > 0.7
    log = (result.run_dir / "train.log").read_text()
    assert "trainer.overfit_batches=1: training on the same 1 batch(es) of 2 image(s)" in log


@pytest.mark.slow
def test_a_collapsed_run_says_so_in_train_log(tmp_path: Path) -> None:
    """Training labels all road (a train-id map that sends every class to 0, as a broken
    mask conversion would): the evaluation predicts road everywhere, one warning line names
    it, and TensorBoard's val/collapsed is 1. (An untrained model collapses too, to the
    most frequent class, building: road is the forced one.)"""
    cfg = compose_cfg(
        [
            *tiny_overrides(tmp_path / "synthcity"),
            "loss=ce",
            "trainer.max_iters=2",
            "trainer.eval_interval=2",
            "trainer.log_interval=2",
        ]
    )
    with open_dict(cfg):
        cfg.dataset.train.train_id_map = [0] * 19
    result = run(cfg, run_dir=tmp_path / "run")
    lines = (result.run_dir / "train.log").read_text().splitlines()
    (warning,) = [line for line in lines if "predictions collapsed" in line]
    assert "WARNING" in warning and "eval at iter 2: predictions collapsed to one class" in warning
    assert "the IoU is 0 for every class but 'road'" in warning
    assert scalars(result.run_dir, "val/collapsed") == [(2, 1.0)]

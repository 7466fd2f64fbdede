"""The comparison's confidence intervals: each run's per-image confusion matrices (evaluated
again from last.pt, checked against the stored mIoU, kept for the next report) and the
verdict lines of the report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from seg.bootstrap import iou_from_confusion, miou_from_confusion, paired_bootstrap
from seg.checkpoint import load_checkpoint, save_checkpoint
from seg.compare import per_image
from seg.compare.per_image import CACHE_NAME, ReevaluationMismatch, per_image_confusions
from seg.compare.report import class_verdict_lines, difference_lines
from seg.engine.train_run import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-iteration SynthCity run (64x128, 4 val images) evaluated at its end."""
    base = tmp_path_factory.mktemp("bootstrap_run")
    overrides = [
        "+experiment=synthcity_ohem",
        f"dataset.root={base / 'synthcity'}",
        "dataset.generator.height=64",
        "dataset.generator.width=128",
        "dataset.generator.num_train=4",
        "dataset.generator.num_val=4",
        "dataset.crop_size=[64,128]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "trainer.max_iters=4",
        "trainer.eval_interval=4",
        "schedule.warmup_iters=1",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return run(cfg, run_dir=base / "run").run_dir


def test_per_image_matrices_add_up_to_the_runs_final_evaluation(run_dir: Path) -> None:
    result = per_image_confusions(run_dir, "cpu")
    stored = load_checkpoint(run_dir / "checkpoints" / "last.pt")["metrics"]["val"]
    assert result.matrices.shape == (4, 19, 19) and len(set(result.names)) == 4
    assert 0 < result.matrices.sum() <= 4 * 64 * 128  # ignored (255) pixels are not counted
    summed = result.matrices.sum(0)
    assert float(miou_from_confusion(summed)) == pytest.approx(stored["mIoU"], abs=1e-9)
    expected = np.array([np.nan if v is None else v for v in stored["IoU"]], dtype=np.float64)
    np.testing.assert_allclose(iou_from_confusion(summed), expected, atol=1e-9)
    assert all(0 < int(m.sum()) <= 64 * 128 for m in result.matrices)  # one image each
    assert (run_dir / CACHE_NAME).is_file()


def test_kept_matrices_are_read_until_last_pt_changes(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = per_image_confusions(run_dir, "cpu")

    def must_not_evaluate(*args: object) -> None:
        raise AssertionError("evaluated although the kept file is current")

    monkeypatch.setattr(per_image, "_evaluate", must_not_evaluate)
    again = per_image_confusions(run_dir, "cpu")
    np.testing.assert_array_equal(again.matrices, first.matrices)
    assert again.names == first.names
    last = run_dir / "checkpoints" / "last.pt"
    info = last.stat()
    os.utime(last, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))  # a new last.pt
    with pytest.raises(AssertionError, match="kept file is current"):
        per_image_confusions(run_dir, "cpu")


def test_a_run_whose_stored_miou_is_not_reproduced_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / CACHE_NAME).unlink(missing_ok=True)
    last = copy / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last)
    checkpoint["metrics"]["val"]["mIoU"] += 0.05  # as if the val split had changed since
    save_checkpoint(last, checkpoint)
    with pytest.raises(ReevaluationMismatch, match=str(last)):
        per_image_confusions(copy, "cpu")
    assert not (copy / CACHE_NAME).exists()


def _runs(gap: float, seeds: int = 3, images: int = 30) -> dict[str, np.ndarray]:
    """Two losses on 2 classes: per image, B misclassifies ``gap`` more of class 1."""
    rng = np.random.default_rng(0)
    runs = {}
    for loss, extra in (("ohem", 0.0), ("ce", gap)):
        m = np.zeros((seeds, images, 2, 2), dtype=np.int64)
        for s in range(seeds):
            for i in range(images):
                wrong = int(100 * (0.2 + extra + rng.normal(0, 0.05)))
                wrong = min(max(wrong, 0), 100)
                m[s, i] = [[100, 0], [wrong, 100 - wrong]]
        runs[loss] = m
    return runs


def test_a_loss_is_called_ahead_only_when_its_interval_excludes_zero() -> None:
    clear = paired_bootstrap(_runs(0.15), replicates=400, class_names=["a", "b"])
    (line,) = difference_lines(clear)
    assert line.startswith("ohem - ce: +") and line.endswith("ohem ahead")
    assert "95% CI [+" in line  # both ends above 0
    (classes,) = class_verdict_lines(clear)
    assert "ohem ahead on 2 (a, b)" in classes  # b's errors also lower a's IoU
    same = paired_bootstrap(_runs(0.0), replicates=400, class_names=["a", "b"])
    (line,) = difference_lines(same)
    assert line.endswith("no clear difference (the interval holds 0)")
    low, high = same.pairs[0].miou.low, same.pairs[0].miou.high
    assert low < 0 < high


def test_report_device_auto_keeps_a_cpu_trained_run_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    cpu_run = {"trainer": {"device": "cpu"}}
    auto_run = {"trainer": {"device": "auto"}}
    assert per_image.report_device("auto", cpu_run) == torch.device("cpu")
    assert per_image.report_device("auto", auto_run).type == "cuda"
    assert per_image.report_device("cpu", auto_run) == torch.device("cpu")
    with pytest.raises(Exception, match="report_device must be auto, cpu"):
        per_image.report_device("gpu0", cpu_run)

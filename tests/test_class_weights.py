"""Median-frequency class weights: the formula on synthetic masks (hand-computed values),
tools/check_dataset.py's table, ``loss.class_weight`` checked and ``auto`` resolved once per
run (stored as a list, recorded, and equal to the same command for ``resume=auto``)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seg.checkpoint import load_checkpoint
from seg.data.build import build_dataset
from seg.data.check import run_check
from seg.data.class_weights import (
    ClassFrequency,
    count_class_frequency,
    median_frequency_weights,
)
from seg.data.folder import FolderDataset
from seg.engine.class_weight import (
    class_weight_setting,
    resolve_class_weight,
    stored_auto_weights,
    with_class_weight,
)
from seg.engine.state import RESOLVED_FROM, config_differences
from seg.engine.train_run import run
from seg.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c", "d"]
ID_TO_TRAINID = {0: 0, 1: 1, 2: 2, 3: 3, 9: 255}  # 9 = void
# Three 2 x 4 masks (raw values; 9 is ignored):
#   A: class 0 x4, class 1 x2, void x2 -> 6 labelled pixels
#   B: class 0 x2, class 2 x6          -> 8
#   C: class 1 x8                      -> 8
MASKS = {
    "A": [[0, 0, 0, 0], [1, 1, 9, 9]],
    "B": [[0, 0, 2, 2], [2, 2, 2, 2]],
    "C": [[1, 1, 1, 1], [1, 1, 1, 1]],
}
# By hand: class pixels 6, 10, 6, 0; labelled pixels of the images holding each class
# 6 + 8 = 14, 6 + 8 = 14, 8, 0; freq 3/7, 5/7, 3/4 (d absent); median 5/7;
# weights (5/7)/(3/7) = 5/3, 1, (5/7)/(3/4) = 20/21, and 0 for the absent class d.
EXPECTED = [5 / 3, 1.0, 20 / 21, 0.0]


def train_ids(mask: list[list[int]]) -> np.ndarray:
    lut = np.full(256, 255)
    for raw, tid in ID_TO_TRAINID.items():
        lut[raw] = tid
    return np.bincount(lut[np.asarray(mask)].ravel(), minlength=256)


def test_median_frequency_weights_by_hand() -> None:
    frequency = ClassFrequency()
    for mask in MASKS.values():
        frequency.add(train_ids(mask))
    assert frequency.class_pixels[:4].tolist() == [6, 10, 6, 0]
    assert frequency.image_pixels[:4].tolist() == [14, 14, 8, 0]
    np.testing.assert_allclose(frequency.frequencies(4)[:3], [3 / 7, 5 / 7, 3 / 4])
    np.testing.assert_allclose(frequency.weights(4), EXPECTED)
    assert frequency.absent(4) == [3] and frequency.images == 3
    # An even number of present classes: the median is the mean of the middle two.
    np.testing.assert_allclose(median_frequency_weights([2, 6], [10, 10]), [2.0, 2 / 3])
    with pytest.raises(DatasetError, match="no labelled pixel"):
        median_frequency_weights([0, 0], [0, 0])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The three masks above as a folder dataset (images/, masks/)."""
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for stem, mask in MASKS.items():
        cv2.imwrite(str(tmp_path / "images" / f"{stem}.png"), np.zeros((2, 4, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "masks" / f"{stem}.png"), np.asarray(mask, np.uint8))
    return tmp_path


def dataset(folder: Path, **options) -> FolderDataset:
    return FolderDataset(
        folder / "images", folder / "masks", NAMES, id_to_trainid=ID_TO_TRAINID, **options
    )


def test_the_pass_over_the_labels_and_check_dataset_give_the_same_weights(folder: Path) -> None:
    for workers in (1, 3):
        frequency = count_class_frequency(dataset(folder), progress=False, workers=workers)
        np.testing.assert_allclose(frequency.weights(4), EXPECTED)
    cached = count_class_frequency(dataset(folder, cache=folder / "cache"), progress=False)
    np.testing.assert_allclose(cached.weights(4), EXPECTED)
    node = {
        "_target_": "seg.data.folder.FolderDataset",
        "image_dir": str(folder / "images"),
        "mask_dir": str(folder / "masks"),
        "class_names": NAMES,
        "id_to_trainid": ID_TO_TRAINID,
    }
    cfg = OmegaConf.create(
        {"name": "toy", "root": str(folder), "split": "val", "class_names": NAMES}
    )
    cfg.train, cfg.val = node, node
    text, status = run_check(cfg)
    assert status == 0
    table = text[text.index("median-frequency class weights of the train split") :]
    for name, weight in zip(NAMES, ["1.6667", "1.0000", "0.9524", "0.0000"], strict=True):
        assert f"| {NAMES.index(name)} {name} |" in table and f"| {weight} |" in table
    assert "weight 0 for the classes with no train pixel: d" in table


def test_a_dataset_that_is_not_image_label_pairs_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"give loss\.class_weight as a list"):
        count_class_frequency([{"label": np.zeros((2, 2))}])


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_the_setting_is_checked_in_one_line_naming_the_key() -> None:
    cfg = compose_train("loss=focal")
    assert class_weight_setting(cfg) is None
    cfg.loss.class_weight = "auto"
    assert class_weight_setting(cfg) == "auto"
    cfg.loss.class_weight = [1] * 19
    assert class_weight_setting(cfg) == [1.0] * 19
    bad = {
        "foo": "must be null, auto or a list of 19 numbers, got 'foo'",
        (1.0, 2.0): "lists 2 weights but dataset.num_classes is 19",
        (1.0,) * 18 + (-1.0,): "finite numbers >= 0, got -1.0",
        (1.0,) * 18 + (float("inf"),): "finite numbers >= 0, got inf",
        (1.0,) * 18 + (True,): "finite numbers >= 0, got True",
        (0.0,) * 19: "at least one weight above 0",
    }
    for value, message in bad.items():
        cfg.loss.class_weight = list(value) if isinstance(value, tuple) else value
        with pytest.raises(ConfigError, match=message) as error:
            class_weight_setting(cfg)
        assert str(error.value).startswith("loss.class_weight")
    # A loss that takes no class weights says so before any label is read, and so does a
    # loss config whose heads do not pass the setting on.
    with pytest.raises(ConfigError, match="GhmcLoss takes no class weights"):
        class_weight_setting(compose_train("loss=ghm", "loss.class_weight=auto"))
    cfg.loss.class_weight = "auto"
    for head in cfg.loss.heads.values():
        head.loss.class_weights = None
    with pytest.raises(ConfigError, match="no head's loss takes it"):
        class_weight_setting(cfg)


def test_a_resolved_auto_run_equals_the_same_command_and_nothing_else() -> None:
    cfg = compose_train("loss=ce_weighted")
    weights = [0.1 * (c + 1) for c in range(19)]
    resolved = with_class_weight(cfg, weights, resolved_auto=True)
    stored = OmegaConf.to_container(resolved, resolve=True)
    # The stored config holds the numbers, on every head too, and the record of auto.
    assert stored["loss"]["class_weight"] == weights
    assert {
        h: s["loss"]["class_weights"] for h, s in stored["loss"]["heads"].items()
    } == dict.fromkeys(("main", "aux2", "aux3", "aux4", "aux5_4"), weights)
    assert stored[RESOLVED_FROM]["loss"]["class_weight"] == "auto"
    assert stored[RESOLVED_FROM]["loss"]["heads"]["aux3"]["loss"]["class_weights"] == "auto"
    assert stored_auto_weights({"config": stored}) == weights
    # resume=auto: the same command (auto) is the same config ...
    assert config_differences(stored, OmegaConf.to_container(cfg, resolve=True)) == []
    # ... a list typed by hand is another command, even with the same numbers.
    typed = OmegaConf.to_container(
        with_class_weight(cfg, weights, resolved_auto=False), resolve=True
    )
    assert "loss.class_weight" in config_differences(stored, typed)
    assert stored_auto_weights({"config": typed}) is None
    # The comparison report: beside another loss, only loss keys differ.
    ohem = OmegaConf.to_container(compose_train("loss=ohem"), resolve=True)
    ignore = ("resume", "loss", "seed", "experiment_name")
    assert config_differences(stored, ohem, ignore=ignore) == []


def test_auto_takes_a_resumed_runs_list_or_counts_once(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = OmegaConf.create(
        {
            "dataset": {"class_names": NAMES, "num_classes": 4},
            "loss": {
                "class_weight": "auto",
                "heads": {"main": {"loss": {"class_weights": "${loss.class_weight}"}}},
            },
        }
    )
    shared = []

    def share(value):
        shared.append(value)
        return value

    caplog.set_level(logging.INFO, logger="seg.train")
    stored = OmegaConf.to_container(with_class_weight(cfg, [4.0, 3.0, 2.0, 1.0], True))
    # Resumed: the checkpoint's list, no label read (there is no dataset to read).
    out = resolve_class_weight(cfg, "auto", {"config": stored}, None, True, share)
    assert out.loss.heads.main.loss.class_weights == [4.0, 3.0, 2.0, 1.0] and not shared
    assert "the weights this run computed when it started: a 4.0000, b 3.0000" in caplog.text
    # Fresh: one pass over the train labels on the main rank, shared with the others.
    out = resolve_class_weight(cfg, "auto", None, dataset(folder), True, share)
    np.testing.assert_allclose(list(out.loss.class_weight), EXPECTED)
    assert len(shared) == 1 and cfg.loss.class_weight == "auto"  # cfg itself is left as it was
    assert (
        "median-frequency weights of the train split (3 labels): a 1.6667, b 1.0000" in caplog.text
    )
    assert "no train pixel of d, weight 0" in caplog.text


@pytest.mark.slow
def test_a_weighted_run_stores_its_weights_and_resume_auto_continues_it(tmp_path: Path) -> None:
    overrides = [
        f"dataset.root={tmp_path / 'synth'}",
        "dataset.generator.num_train=6",
        "dataset.generator.num_val=2",
        "dataset.generator.height=32",
        "dataset.generator.width=64",
        "dataset.crop_size=[32,64]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "schedule.warmup_iters=1",
        "trainer.max_iters=1",
        "trainer.eval_interval=1",
        "loss=ce_weighted",
    ]
    outputs = tmp_path / "outputs" / "default"
    first = run(compose_train(*overrides), run_dir=outputs / "first")
    config = load_checkpoint(first.run_dir / "checkpoints" / "last.pt")["config"]
    # The weights of SynthCity's train split, counted here on their own.
    split = build_dataset(compose_train(*overrides).dataset.train, transform=None)
    expected = count_class_frequency(split, progress=False).weights(19).tolist()
    assert config["loss"]["class_weight"] == expected
    assert config["loss"]["heads"]["main"]["loss"]["class_weights"] == expected
    log = (first.run_dir / "train.log").read_text()
    assert (
        "loss.class_weight=auto: median-frequency weights of the train split (6 labels): road "
        in log
    )
    # The same command again with resume=auto continues that run (here: finished earlier).
    again = run(compose_train(*overrides, "resume=auto"), run_dir=outputs / "second")
    assert again.run_dir == first.run_dir and again.iteration == 1
    log = (first.run_dir / "train.log").read_text()
    assert (
        f"resume=auto: continuing {first.run_dir / 'checkpoints' / 'last.pt'} (same config)" in log
    )

"""Unit tests of the trainer's selection features: ``trainer.best_metric`` (parsing, the score
of an evaluation, TensorBoard and HPARAMS naming), ``trainer.early_stop`` (settings, the
counting rule, the checkpoint round trip, old checkpoints, resume=auto), the collapse
warning's rule, the fixed batches of ``trainer.overfit_batches`` and the train-id remap of
few-class tasks."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset

from seg.data.cityscapes import CityscapesDataset
from seg.data.labels import cityscapes_lookup_table, remap_train_ids
from seg.data.loader import (
    FixedBatchesSampler,
    InfiniteSampler,
    build_fixed_batches_loader,
    build_train_loader,
)
from seg.data.transforms import apply_transform, build_train_transform, to_sample, unpack_key
from seg.engine.amp import build_grad_scaler, resolve_amp
from seg.engine.build import parse_settings
from seg.engine.collapse import (
    COLLAPSE_MAX_TRUE_SHARE,
    COLLAPSE_PREDICTED_SHARE,
    collapse_message,
)
from seg.engine.logging import COLLAPSED_TAG, RunLog, hparam_metrics, run_logging
from seg.engine.schedule import WarmupPolyLR
from seg.engine.selection import (
    BestMetric,
    EarlyStopSettings,
    early_stop_settings,
    parse_best_metric,
    stalled,
)
from seg.engine.state import TrainState, checkpoint_payload, config_differences, progress_of
from seg.engine.step import TrainStep
from seg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
NAMES = ["road", "sidewalk", "traffic light"]


# ------------------------------------------------------------------------ best metric
def test_best_metric_names_a_summary_metric_or_one_class_iou() -> None:
    metrics = {"mIoU": 0.4, "mAcc": 0.5, "aAcc": 0.9, "fwIoU": 0.8, "IoU": [0.7, math.nan, 0.1]}
    assert parse_best_metric(None, NAMES) == BestMetric("mIoU")
    assert parse_best_metric("fwIoU", NAMES).value(metrics) == 0.8
    light = parse_best_metric("IoU/traffic light", NAMES)
    assert light == BestMetric("IoU/traffic light", 2) and light.value(metrics) == 0.1
    assert math.isnan(parse_best_metric("IoU/sidewalk", NAMES).value(metrics))
    for wrong in ("miou", "IoU/pedestrian", "IoU", "road"):
        with pytest.raises(ConfigError) as error:
            parse_best_metric(wrong, NAMES)
        message = str(error.value)
        assert "\n" not in message and f"trainer.best_metric={wrong!r}" in message
        assert "mIoU, mAcc, aAcc, fwIoU, IoU/road, IoU/sidewalk, IoU/traffic light" in message


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_settings_check_the_metric_against_the_dataset_classes() -> None:
    settings = parse_settings(_compose(["trainer.device=cpu"]))
    assert settings.best_metric == BestMetric("mIoU") and settings.early_stop is None
    assert settings.overfit_batches == 0
    settings = parse_settings(
        _compose(
            ["trainer.device=cpu", "trainer.best_metric=IoU/person", "trainer.overfit_batches=2"]
        )
    )
    assert settings.best_metric == BestMetric("IoU/person", 11) and settings.overfit_batches == 2
    with pytest.raises(ConfigError, match=r"'IoU/pedestrian'.*IoU/person, IoU/rider"):
        parse_settings(_compose(["trainer.device=cpu", "trainer.best_metric=IoU/pedestrian"]))
    binary = parse_settings(_compose(["+experiment=synthcity_road_binary", "trainer.device=cpu"]))
    assert binary.best_metric == BestMetric("IoU/road", 0)


# ------------------------------------------------------------------------- early stop
def test_early_stop_settings() -> None:
    assert early_stop_settings(None) is None
    assert early_stop_settings({"patience": None, "min_delta": 0.0}) is None
    assert early_stop_settings({"patience": 3}) == EarlyStopSettings(3, 0.0)
    assert early_stop_settings({"patience": "2", "min_delta": 0.01}) == EarlyStopSettings(2, 0.01)
    for node, match in (
        ({"patience": 0}, "patience must be >= 1"),
        ({"patience": 2.5}, "whole number"),
        ({"patience": 2, "min_delta": -0.1}, r"min_delta must be in \[0, 1\)"),
        ({"patience": 2, "min_delta": 5}, "half a point"),
        ({"patience": 2, "delta": 0.1}, "unknown keys"),
        (3, "must be null or"),
    ):
        with pytest.raises(ConfigError, match=match):
            early_stop_settings(node)
    assert (
        not stalled(5, None)
        and stalled(2, EarlyStopSettings(2))
        and not stalled(1, EarlyStopSettings(2))
    )


def test_an_improvement_must_beat_the_reference_by_more_than_min_delta() -> None:
    """Lightning's EarlyStopping rule: best.pt follows every gain, but gains of min_delta
    or less do not reset the count; they add up against the unchanged reference."""
    state = TrainState()
    counts, bests = [], []
    for it, score in enumerate([0.50, 0.505, 0.51, 0.515, math.nan, 0.50, 0.60], start=1):
        state.iteration = it
        bests.append(state.record(score, min_delta=0.01))
        counts.append(state.evals_since_improvement)
    assert bests == [True, True, True, True, False, False, True]
    assert counts == [0, 1, 2, 0, 1, 2, 0]  # 0.515 beats 0.50 by more than 0.01
    assert (state.best_score, state.best_iteration, state.stall_reference) == (0.60, 7, 0.60)
    state.record(0.60, min_delta=0.0)  # equal is no improvement
    assert state.evals_since_improvement == 1


def _train_step(net: torch.nn.Module) -> TrainStep:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    amp = resolve_amp("off", "cpu")
    return TrainStep(
        net, torch.nn.Identity(), optimizer, WarmupPolyLR(optimizer, max_iters=10, warmup_iters=0),
        build_grad_scaler(amp), amp, [0.5] * 3, [0.25] * 3, torch.device("cpu"),
    )  # fmt: skip


def test_best_score_and_patience_count_survive_the_checkpoint() -> None:
    net = torch.nn.Conv2d(3, 2, 1)
    state = TrainState(iteration=8, best_metric="IoU/road")
    for score in (0.3, 0.5, 0.45):
        state.record(score)
    payload = checkpoint_payload(net, _train_step(net), state, {})
    assert "best_mIoU" not in payload["metrics"]  # that key means mIoU only
    back = progress_of(payload)
    assert (back.best_metric, back.best_score, back.stall_reference) == ("IoU/road", 0.5, 0.5)
    assert back.evals_since_improvement == 1
    # A checkpoint written before trainer.best_metric: best_mIoU only.
    old = progress_of({"iteration": 300, "metrics": {"best_mIoU": 0.4, "best_iteration": 150}})
    assert (old.best_metric, old.best_score, old.best_iteration) == ("mIoU", 0.4, 150)
    assert (old.stall_reference, old.evals_since_improvement) == (0.4, 0)
    assert progress_of({"iteration": 0, "metrics": {}}).best_score == -math.inf
    # Another metric on resume: the old metric's scores are no reference.
    assert back.use_metric("mIoU") and back.best_score == -math.inf
    assert back.evals_since_improvement == 0 and not back.use_metric("mIoU")


def test_resume_auto_reads_old_configs_as_the_defaults_and_compares_the_new_keys() -> None:
    old = {"seed": 0, "trainer": {"max_iters": 10}}
    new = {
        "seed": 0,
        "trainer": {
            "max_iters": 10,
            "best_metric": "mIoU",
            "early_stop": {"patience": None, "min_delta": 0.0},
            "overfit_batches": 0,
        },
    }
    assert config_differences(old, new) == []  # a run of an older version still resumes
    patience = {
        **new,
        "trainer": {**new["trainer"], "early_stop": {"patience": 3, "min_delta": 0.0}},
    }
    assert config_differences(new, patience) == ["trainer.early_stop.patience"]
    metric = {**new, "trainer": {**new["trainer"], "best_metric": "mAcc"}}
    assert config_differences(old, metric) == ["trainer.best_metric"]


# --------------------------------------------------------------------------- collapse
def _matrix(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_collapse_rule_on_constructed_confusion_matrices() -> None:
    assert (COLLAPSE_PREDICTED_SHARE, COLLAPSE_MAX_TRUE_SHARE) == (0.95, 0.75)
    healthy = _matrix([[50, 5, 0], [5, 30, 0], [0, 2, 8]])
    assert collapse_message(healthy, NAMES) is None
    # Everything predicted road, which holds 30% of the ground truth: both rules.
    everything_road = _matrix([[30, 0, 0], [60, 0, 0], [10, 0, 0]])
    message = collapse_message(everything_road, NAMES)
    assert message is not None and "\n" not in message
    assert (
        "100.0% of the predicted pixels are 'road', which holds 30.0% of the ground truth"
        in message
    )
    assert "the IoU is 0 for every class but 'road'" in message
    # Rule 1 alone: 96% of predictions road (75% of the truth), sidewalk still partly right.
    mostly_road = _matrix([[75, 0, 0], [20, 4, 0], [1, 0, 0]])
    message = collapse_message(mostly_road, NAMES)
    assert message is not None and "96.0% of the predicted" in message and "IoU is 0" not in message
    # A class that truly covers nearly everything is no collapse.
    dominant = _matrix([[95, 1, 0], [2, 2, 0], [0, 0, 0]])
    assert collapse_message(dominant, NAMES) is None
    # Rule 2 alone: sidewalk gets 89% of the predictions (under 95%), yet it is the only
    # class ever right: road is predicted as sidewalk or traffic light.
    one_right = _matrix([[0, 40, 10], [0, 40, 0], [0, 0, 0]])
    message = collapse_message(one_right, NAMES)
    assert message is not None and "every class but 'sidewalk'" in message
    assert "of the predicted pixels" not in message
    # Fewer than two classes with an IoU, or nothing counted: nothing to say.
    assert collapse_message(_matrix([[10, 0], [0, 0]]), ["a", "b"]) is None
    assert collapse_message(torch.zeros(3, 3, dtype=torch.int64), NAMES) is None


def test_a_collapse_is_one_line_in_train_log_and_a_scalar_in_tensorboard(tmp_path: Path) -> None:
    with run_logging(tmp_path / "train.log", True):
        log = RunLog(
            tmp_path,
            max_iters=10,
            start=0,
            global_batch=2,
            class_names=["road", "other"],
            palette=[[0, 0, 0], [1, 1, 1]],
            hparams={"loss": "ohem", "best_metric": "IoU/road"},
            is_main=True,
            best_metric="IoU/road",
        )
        metrics = {"mIoU": 0.2, "mAcc": 0.5, "aAcc": 0.4, "fwIoU": 0.16, "IoU": [0.4, 0.0]}
        collapsed = collapse_message(_matrix([[40, 0], [60, 0]]), ["road", "other"])
        log.evaluation(5, metrics, [], None, best_score=0.4, collapse=collapsed)
        log.evaluation(10, metrics, [], None, best_score=0.4, collapse=None)
        log.close(completed=True)
    lines = (tmp_path / "train.log").read_text().splitlines()
    warnings = [line for line in lines if "collapsed to one class" in line]
    assert len(warnings) == 1 and "eval at iter 5: predictions collapsed" in warnings[0]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars(COLLAPSED_TAG)] == [(5, 1.0), (10, 0.0)]
    assert [e.value for e in events.Scalars("val/IoU/road_best")] == pytest.approx([0.4, 0.4])
    assert "val/mIoU_best" not in events.Tags()["scalars"]
    text = events.Tensors("val/collapse/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "'other'" in text or "'road'" in text
    assert list(hparam_metrics("IoU/road").items())[1] == ("val/IoU/road_best", "best IoU/road")


# --------------------------------------------------------------------- fixed batches
class SeededToy(Dataset):
    """Random images whose label encodes the index; the train transform (random scale,
    crop, flip) seeded by the sampler's key."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self.transform = build_train_transform([16, 16], [0.5, 2.0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, seed = unpack_key(key)
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        label = np.full((24, 32), index, np.uint8)
        image, label = apply_transform(self.transform, image, label, seed)
        return to_sample(image, label, str(index))


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_fixed_batches_are_identical_every_pass_and_on_resume() -> None:
    data = SeededToy()
    loader = build_train_loader(data, batch_size=3, num_workers=0, seed=5, fixed_batches=2)
    stream = iter(loader)
    batches = [next(stream) for _ in range(6)]
    for i in range(2, 6):  # passes 2 and 3 give bit-identical batches: augmentation frozen
        assert _same(batches[i], batches[i % 2]) and batches[i]["name"] == batches[i % 2]["name"]
    assert not torch.equal(batches[0]["label"], batches[1]["label"])
    # They are the first two batches of the ordinary stream, augmentation included.
    ordinary = iter(build_train_loader(data, batch_size=3, num_workers=0, seed=5))
    assert _same(next(ordinary), batches[0]) and _same(next(ordinary), batches[1])
    # A resumed run (start_iter=3) continues with the batch it would have used.
    resumed = iter(
        build_train_loader(data, batch_size=3, num_workers=0, seed=5, fixed_batches=2, start_iter=3)
    )
    assert _same(next(resumed), batches[1]) and _same(next(resumed), batches[0])
    # The evaluation of overfit_batches sees the same batches once.
    evaluated = list(build_fixed_batches_loader(data, batch_size=3, num_batches=2, seed=5))
    assert len(evaluated) == 2 and all(
        _same(e, b) for e, b in zip(evaluated, batches, strict=False)
    )
    # DDP: each rank repeats its own shard of the stream.
    shards = [
        FixedBatchesSampler(InfiniteSampler(10, 5, r, 2), 4, endless=False).keys for r in (0, 1)
    ]
    assert not {k for k, _ in shards[0]} & {k for k, _ in shards[1]}
    with pytest.raises(ConfigError):
        FixedBatchesSampler(InfiniteSampler(10), 0)


# ------------------------------------------------------------------- train-id remap
def test_train_id_remap_makes_a_binary_task() -> None:
    lut, _ = cityscapes_lookup_table()
    road_vs_rest = {i: 0 if i == 0 else 1 for i in range(19)}
    binary, classes = remap_train_ids(lut, road_vs_rest, 19)
    as_list = remap_train_ids(lut, [0] + [1] * 18, 19)  # the i-th value is train id i's
    assert np.array_equal(as_list[0], binary) and as_list[1] == 2
    assert classes == 2
    assert binary[7] == 0 and binary[8] == 1 and binary[33] == 1  # road, sidewalk, bicycle
    assert binary[0] == 255 and binary[6] == 255  # void ids stay ignored
    assert np.array_equal(binary == 255, lut == 255)
    dropped = {**road_vs_rest, 18: 255}  # 255: bicycle ignored
    assert remap_train_ids(lut, dropped, 19)[0][33] == 255
    assert remap_train_ids(lut, {**road_vs_rest, 5: 2}, 19)[1] == 3  # road, pole, the rest
    for bad, match in (
        ({i: 0 for i in range(18)}, r"missing \[18\]"),
        ({**road_vs_rest, 19: 1}, r"unknown \[19\]"),
        ({i: 1 for i in range(19)}, r"0..K-1, each used"),  # no class 0
        ({**road_vs_rest, 5: 3}, r"0..K-1, each used"),  # 0, 1, 3: no 2
        ({**road_vs_rest, "18": 1}, r"once"),  # 18 given twice (a command-line key)
        ([0] * 18, r"missing \[18\]"),
        ("road", "must give each train id a train id"),
    ):
        with pytest.raises(ConfigError, match=match):
            remap_train_ids(lut, bad, 19)  # type: ignore[arg-type]


def test_a_cityscapes_dataset_with_a_train_id_map(tmp_path: Path) -> None:
    ids = (np.arange(16 * 32).reshape(16, 32) % 34).astype(np.uint8)  # every label id
    for kind, array in (("leftImg8bit", np.zeros((16, 32, 3), np.uint8)), ("gtFine", ids)):
        folder = tmp_path / kind / "train" / "aachen"
        folder.mkdir(parents=True)
        suffix = "_leftImg8bit.png" if kind == "leftImg8bit" else "_gtFine_labelIds.png"
        assert cv2.imwrite(str(folder / f"aachen_000000_000019{suffix}"), array)
    data = CityscapesDataset(tmp_path, "train", train_id_map=[0] + [1] * 18)
    assert data.num_classes == 2 and CityscapesDataset.num_classes == 19
    label = data[0]["label"].numpy()
    assert set(np.unique(label)) == {0, 1, 255}
    assert np.all(label[ids == 7] == 0) and np.all(label[ids == 26] == 1)  # road, car

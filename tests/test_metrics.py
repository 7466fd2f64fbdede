"""ConfusionMatrix and metrics against hand-computed confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as torch_dist

from seg import dist
from seg.errors import DatasetError
from seg.metrics import ConfusionMatrix, format_metrics_table, metrics_from_matrix

IGN = 255
# One 2 x 4 image; the last column is ignored.
TARGET = torch.tensor([[[0, 0, 1, IGN], [1, 2, 2, IGN]]])
PRED = torch.tensor([[[0, 1, 1, 2], [1, 2, 0, 0]]])
# rows: ground truth, columns: prediction (counted by hand from the six valid pixels)
EXPECTED = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_matrix_matches_hand_count_and_skips_ignore() -> None:
    cm = ConfusionMatrix(3, ignore_index=IGN)
    cm.update(PRED, TARGET)
    assert torch.equal(cm.matrix, EXPECTED)
    assert cm.matrix.dtype == torch.int64


def test_metrics_match_hand_computation_without_plus_one() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    m = cm.compute()
    # TP = [1, 2, 1], GT = [2, 2, 2], predicted = [2, 3, 1] -> union = [3, 3, 2]
    assert m["IoU"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["Acc"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["mAcc"] == pytest.approx(2 / 3)
    assert m["aAcc"] == pytest.approx(4 / 6)
    assert m["fwIoU"] == pytest.approx((2 / 6) * (1 / 3 + 2 / 3 + 1 / 2))


def test_class_absent_from_gt_and_prediction_is_nan_and_left_out() -> None:
    cm = ConfusionMatrix(4)  # class 3 appears nowhere
    cm.update(PRED, TARGET)
    m = cm.compute()
    assert math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx(0.5)  # a +1 or zero-filled class would give 0.375
    assert m["mAcc"] == pytest.approx(2 / 3)


def test_class_predicted_but_absent_from_gt_counts_as_zero_iou() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[[0, 3]]]), torch.tensor([[[0, 1]]]))
    assert cm.matrix.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = cm.compute()
    assert m["IoU"][:2] == [1.0, 0.0] and m["IoU"][3] == 0.0
    assert math.isnan(m["IoU"][2])
    assert m["mIoU"] == pytest.approx(1 / 3)
    assert m["Acc"][:2] == [1.0, 0.0]
    assert math.isnan(m["Acc"][3])  # no ground-truth pixels: accuracy undefined
    assert m["mAcc"] == pytest.approx(0.5)


def test_updates_accumulate_and_reset() -> None:
    whole, parts = ConfusionMatrix(3), ConfusionMatrix(3)
    whole.update(PRED, TARGET)
    parts.update(PRED[..., :2], TARGET[..., :2])
    parts.update(PRED[..., 2:], TARGET[..., 2:])
    assert torch.equal(whole.matrix, parts.matrix)
    parts.reset()
    assert parts.matrix.sum() == 0


def test_empty_matrix_gives_nan_not_errors() -> None:
    m = ConfusionMatrix(2).compute()
    assert all(math.isnan(m[k]) for k in ("mIoU", "mAcc", "aAcc", "fwIoU"))


def test_label_outside_classes_is_a_dataset_error() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(DatasetError, match="num_classes 3"):
        cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 7]]]))


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(PRED[..., :3], TARGET)


def test_metrics_from_matrix_accepts_any_int_matrix() -> None:
    m = metrics_from_matrix(torch.tensor([[5, 0], [5, 0]]))
    assert m["IoU"] == pytest.approx([0.5, 0.0])
    assert m["aAcc"] == pytest.approx(0.5)


def test_all_reduce_in_a_one_process_group(tmp_path) -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    cm.all_reduce()  # no process group: a no-op
    assert torch.equal(cm.matrix, EXPECTED)
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert dist.is_distributed() and dist.get_world_size() == 1 and dist.is_main()
        cm.all_reduce()
        assert torch.equal(cm.matrix, EXPECTED)
    finally:
        dist.cleanup()
    assert not dist.is_distributed()


def test_table_shows_percentages_and_na() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    m = cm.compute()
    text = format_metrics_table(m, ["road", "car", "sky", "bus"])
    assert "road" in text and "33.33" in text and "n/a" in text and "mIoU 50.00" in text
    md = format_metrics_table(m, ["road", "car", "sky", "bus"], markdown=True)
    assert "| car | 66.67 | 100.00 |" in md and "| mIoU | 50.00 |" in md

"""Cityscapes and folder datasets on tiny trees; every bad-input case; check_dataset."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from seg.data.check import compose_dataset_config, main, run_check
from seg.data.cityscapes import CityscapesDataset
from seg.data.folder import FolderDataset
from seg.data.transforms import build_train_transform
from seg.errors import DatasetError

H, W = 32, 64


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def make_cityscapes(root: Path, splits=("train", "val"), n=2, train_ids=False) -> Path:
    """Tiny Cityscapes tree: labelIds cycling through ids 0..33 (and trainIds if asked)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bochum"
            base = f"{city}_{i:06d}_000019"
            image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            ids = (np.arange(H * W).reshape(H, W) % 34).astype(np.uint8)
            _write(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", image)
            _write(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", ids)
            if train_ids:
                trainid = np.full((H, W), 255, np.uint8)
                trainid[:, : W // 2] = 3
                _write(root / "gtFine" / split / city / f"{base}_gtFine_labelTrainIds.png", trainid)
    return root


def _image_path(root: Path, split="train", i=0) -> Path:
    city = "aachen" if i % 2 == 0 else "bochum"
    return root / "leftImg8bit" / split / city / f"{city}_{i:06d}_000019_leftImg8bit.png"


def _label_path(root: Path, split="train", i=0) -> Path:
    return Path(
        str(_image_path(root, split, i))
        .replace("leftImg8bit", "gtFine", 1)
        .replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    )


def test_cityscapes_reads_label_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    ds = CityscapesDataset(root, "train")
    assert len(ds) == 2 and ds.label_type == "labelIds"
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (H, W, 3)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (H, W)
    assert item["name"] == "aachen_000000_000019_leftImg8bit"
    ids = (np.arange(H * W).reshape(H, W) % 34).astype(np.uint8)
    label = item["label"].numpy()
    assert np.all(label[ids == 7] == 0)  # road
    assert np.all(label[ids == 33] == 18)  # bicycle
    assert np.all(label[ids <= 6] == 255)  # void ids
    image = cv2.cvtColor(cv2.imread(str(_image_path(root))), cv2.COLOR_BGR2RGB)
    assert np.array_equal(item["image"].numpy(), image)  # RGB order


def test_cityscapes_prefers_label_train_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cs", train_ids=True)
    ds = CityscapesDataset(root, "val")
    assert ds.label_type == "labelTrainIds"
    label = ds[1]["label"].numpy()
    assert np.all(label[:, : W // 2] == 3) and np.all(label[:, W // 2 :] == 255)
    assert CityscapesDataset(root, "val", label_type="labelIds")[1]["label"][0, 7] == 0


def test_cityscapes_with_transform_and_seeded_key(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    ds = CityscapesDataset(root, "train", transform=build_train_transform([16, 16], [0.5, 1.5]))
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert a["image"].shape == (16, 16, 3) and torch.equal(a["image"], b["image"])
    assert torch.equal(a["label"], b["label"])


def test_folder_dataset_with_id_map(tmp_path):
    rng = np.random.default_rng(1)
    for stem in ("a", "b"):
        _write(tmp_path / "img" / f"{stem}.jpg", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        mask = np.zeros((H, W), np.uint8)
        mask[:, 10:] = 20
        mask[0, 0] = 99
        _write(tmp_path / "mask" / f"{stem}.png", mask)
    ds = FolderDataset(
        tmp_path / "img", tmp_path / "mask", ["bg", "thing"], id_to_trainid={0: 0, 20: 1, 99: 255}
    )
    assert len(ds) == 2 and ds.num_classes == 2 and ds[1]["name"] == "b"
    label = ds[0]["label"].numpy()
    assert label[0, 0] == 255 and label[1, 0] == 0 and np.all(label[:, 10:] == 1)
    # Without the map the same masks hold values outside {0, 1, 255}.
    plain = FolderDataset(tmp_path / "img", tmp_path / "mask", ["bg", "thing"])
    with pytest.raises(DatasetError, match=r"outside the dataset's table \(20, 99\).*a\.png"):
        plain[0]


# --------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path):
    with pytest.raises(
        DatasetError, match=r"dataset root not found: .*nowhere.*leftImg8bit/<split>"
    ):
        CityscapesDataset(tmp_path / "nowhere", "train")


def test_missing_split_folder(tmp_path):
    root = make_cityscapes(tmp_path / "cs", splits=("train",))
    with pytest.raises(DatasetError, match=r"split folder not found: .*leftImg8bit/val .*expected"):
        CityscapesDataset(root, "val")


def test_image_without_label(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    _label_path(root, "train", 1).unlink()
    with pytest.raises(
        DatasetError, match=r"image without a label .*bochum_000001_000019_leftImg8bit"
    ):
        CityscapesDataset(root, "train")
    lenient = CityscapesDataset(root, "train", strict=False)
    assert len(lenient) == 1 and len(lenient.problems) == 1


def test_folder_image_without_mask(tmp_path):
    _write(tmp_path / "img" / "x.png", np.zeros((H, W, 3), np.uint8))
    (tmp_path / "mask").mkdir()
    with pytest.raises(DatasetError, match=r"image without a mask .*x\.png"):
        FolderDataset(tmp_path / "img", tmp_path / "mask", ["a"])
    with pytest.raises(DatasetError, match="mask folder not found"):
        FolderDataset(tmp_path / "img", tmp_path / "nomask", ["a"])


def test_truncated_png(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    path = _image_path(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = CityscapesDataset(root, "train")  # cheap checks pass; decoding fails
    with pytest.raises(
        DatasetError, match=r"corrupt, truncated .*aachen_000000_000019_leftImg8bit\.png"
    ):
        ds[0]


def test_corrupt_label(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    _label_path(root).write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"label file: .*_gtFine_labelIds\.png"):
        CityscapesDataset(root, "train")[0]


def test_label_size_differs_from_image(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    _write(_label_path(root), np.zeros((H, W - 1), np.uint8))
    with pytest.raises(DatasetError, match=r"label size 63x32 differs from image size 64x32"):
        CityscapesDataset(root, "train")[0]


def test_three_channel_label(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    _write(_label_path(root), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"label has 3 channels.*labelIds\.png"):
        CityscapesDataset(root, "train")[0]


def test_label_values_outside_table(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    ids = np.full((H, W), 7, np.uint8)
    ids[3, 3] = 200
    _write(_label_path(root), ids)
    with pytest.raises(DatasetError, match=r"outside the dataset's table \(200\)"):
        CityscapesDataset(root, "train")[0]


# --------------------------------------------------------------------------- check_dataset


def test_check_dataset_exit_status(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cs", splits=("train", "val"), n=3)
    args = ["dataset=cityscapes", f"dataset.root={root}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| train | 3 | 0 |" in out and "| val | 3 | 0 |" in out and "0 road" in out

    _write(_label_path(root, "val", 1), np.zeros((H, W, 3), np.uint8))  # 3-channel
    bad_ids = np.full((H, W), 7, np.uint8)
    bad_ids[0, 0] = 250
    _write(_label_path(root, "train", 2), bad_ids)
    _image_path(root, "train", 0).write_bytes(b"\x89PNG broken")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "3 bad file(s)" in out
    assert "bochum_000001_000019_gtFine_labelIds.png" in out
    assert "unknown label values [250]" in out
    assert "aachen_000000_000019_leftImg8bit.png" in out

    assert main(["dataset=cityscapes", f"dataset.root={tmp_path / 'missing'}"]) == 2
    assert "dataset root not found" in capsys.readouterr().err  # errors go to stderr


def test_check_counts_class_pixels(tmp_path):
    root = make_cityscapes(tmp_path / "cs", splits=("train", "val"), n=1, train_ids=True)
    cfg = compose_dataset_config(["dataset=cityscapes", f"dataset.root={root}"])
    text, status = run_check(cfg.dataset)
    assert status == 0
    assert (
        "| 3 wall | 50.000 | 50.000 |" in text and "| 255 ignore (255) | 50.000 | 50.000 |" in text
    )


def test_folder_example_config_end_to_end(tmp_path):
    """The README's custom-data example: compose, build, read, check."""
    from seg.data.build import build_dataset

    root = tmp_path / "my_dataset"
    rng = np.random.default_rng(2)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            _write(
                root / "images" / split / f"{i:04d}.jpg",
                rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            )
            _write(
                root / "masks" / split / f"{i:04d}.png",
                rng.choice([0, 1, 2, 99], (H, W)).astype(np.uint8),
            )
    args = ["dataset=folder_example", f"dataset.root={root}", "dataset.crop_size=[16,16]"]
    cfg = compose_dataset_config(args)
    train = build_dataset(cfg.dataset.train)
    assert len(train) == 2 and train[(1, 3)]["label"].shape == (16, 16)
    label = build_dataset(cfg.dataset.val)[0]["label"].numpy()
    assert set(np.unique(label)) <= {0, 1, 2, 255} and (label == 255).any()
    assert main(args) == 0

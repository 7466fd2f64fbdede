"""tools/convert_annotations.py on tiny generated labelme folders and COCO files: the
painted pixels (overlap order, rectangles, RLE both kinds, crowd), the class list, the
split rule, one-line errors that leave nothing behind, and the output opening through
FolderDataset and tools/check_dataset.py."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from pycocotools import mask as mask_utils

from seg.cli import run_in_process
from seg.data.annotations import ConversionSettings, Source, convert, convert_annotations
from seg.data.annotations.coco import rle_string_counts
from seg.data.annotations.dataset_config import MARKER
from seg.data.annotations.writer import SplitStats
from seg.data.build import build_dataset
from seg.data.check import compose_dataset_config
from seg.data.check import main as check_main
from seg.data.folder import FolderDataset
from seg.engine.train_run import run as train_run
from seg.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[1]
H, W = 24, 32


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1])


def labelme_file(
    folder: Path, stem: str, shapes: list[dict[str, Any]], image: str | None = "file", **extra: Any
) -> Path:
    """A labelme JSON ``stem.json`` with its image ``stem.png`` beside it (``image="file"``),
    embedded as imageData only (``"embedded"``), or none."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _image(len(stem) + sum(map(ord, stem)))
    doc: dict[str, Any] = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"{stem}.png",
        "imageData": None,
        "imageHeight": H,
        "imageWidth": W,
    }
    if image == "file":
        _write_image(folder / f"{stem}.png", rgb)
    elif image == "embedded":
        ok, png = cv2.imencode(".png", rgb[..., ::-1])
        assert ok
        doc["imageData"] = base64.b64encode(png.tobytes()).decode()
    doc.update(extra)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(doc))
    return path


def poly(label: str, points: list[list[float]], kind: str = "polygon") -> dict[str, Any]:
    return {"label": label, "points": points, "shape_type": kind, "group_id": None, "flags": {}}


def make_labelme(folder: Path) -> Path:
    """Five files: a polygon under a rectangle (overlap, later on top), a circle, a point
    (skipped), one image embedded only, one subfolder-free layout."""
    labelme_file(
        folder,
        "a",
        [
            poly("road", [[0, 0], [31, 0], [31, 11], [0, 11]]),
            poly("car", [[4, 2], [9, 6]], "rectangle"),  # on top of the road
            poly("tree", [[20, 20]], "point"),  # no area: skipped
        ],
    )
    labelme_file(folder, "b", [poly("tree", [[10, 10], [10, 13]], "circle")])
    labelme_file(folder, "c", [poly("car", [[2, 2], [6, 2], [6, 5]])], image="embedded")
    labelme_file(folder, "d", [poly("road", [[0, 12], [31, 12], [31, 23], [0, 23]])])
    labelme_file(folder, "e", [])
    return folder


def settings(**kwargs: Any) -> ConversionSettings:
    source = kwargs.pop("source")
    return ConversionSettings(sources=(source,), name=kwargs.pop("name", "conv"), **kwargs)


def mask(out: Path, split: str, name: str) -> np.ndarray:
    return cv2.imread(str(out / "masks" / split / f"{name}.png"), cv2.IMREAD_UNCHANGED)


def split_of(out: Path, name: str) -> str:
    (found,) = [p.parent.name for p in (out / "masks").rglob(f"{name}.png")]
    return found


def only_output(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# --------------------------------------------------------------------------- labelme


def test_labelme_paints_in_file_order_and_opens_as_a_folder_dataset(tmp_path, capsys):
    make_labelme(tmp_path / "lm")
    out = tmp_path / "conv"
    result = convert_annotations(
        settings(format="labelme", source=Source(None, tmp_path / "lm", None), out=out),
        config_dir=tmp_path / "configs",
    )
    # background first, then the labels sorted
    assert result.class_names == ["background", "car", "road", "tree"]
    assert result.skipped_shapes == {"point": 1}
    assert {s: st.images for s, st in result.stats.items()} == {"train": 4, "val": 1}

    a = mask(out, split_of(out, "a"), "a")
    assert a.shape == (H, W) and a.dtype == np.uint8
    assert a[0, 0] == 2 and a[11, 31] == 2 and a[12, 0] == 0  # road, outline included
    assert (a[2:7, 4:10] == 1).all() and a[7, 4] == 2 and a[2, 10] == 2  # car on top, inclusive
    assert not (a == 3).any()  # the point painted nothing
    b = mask(out, split_of(out, "b"), "b")
    assert b[10, 10] == 3 and b[13, 10] == 3 and b[10, 13] == 3 and b[14, 10] == 0  # r = 3
    c = mask(out, split_of(out, "c"), "c")
    assert c[2, 2] == 1 and c[5, 6] == 1 and c[5, 2] == 0  # the triangle above its diagonal
    assert (mask(out, split_of(out, "e"), "e") == 0).all()

    # the embedded image was written as PNG, the file images hard-linked or copied as is
    c_image = next((out / "images").rglob("c.*"))
    assert c_image.suffix == ".png"
    rgb = cv2.imread(str(c_image))[..., ::-1]
    assert np.array_equal(rgb, _image(len("c") + ord("c")))
    a_image = next((out / "images").rglob("a.png"))
    assert a_image.read_bytes() == (tmp_path / "lm" / "a.png").read_bytes()

    config = out / "dataset" / "conv.yaml"
    assert result.config_files == [config] and config.read_text().startswith(MARKER)
    assert not (tmp_path / "configs").exists()  # write_config=false
    manifest = json.loads((out / "conversion.json").read_text())
    assert manifest["split_rule"] == {"val_fraction": 0.2, "seed": 0}

    # the dataset config opens through FolderDataset, and check_dataset passes
    search = f"hydra.searchpath=[file://{out}]"
    cfg = compose_dataset_config(["dataset=conv", search])
    assert cfg.dataset.num_classes == 4 and list(cfg.dataset.class_names)[1] == "car"
    assert list(cfg.dataset.crop_size) == [32, 32]  # from the 24x32 images, not 512x512
    val = build_dataset(cfg.dataset.val)
    assert isinstance(val, FolderDataset) and len(val) == 1
    train = build_dataset(cfg.dataset.train, transform=None)
    sample = train[train.names.index("a")]
    assert np.array_equal(sample["label"].numpy(), a)
    assert check_main(["dataset=conv", search]) == 0
    assert "4 bad file" not in capsys.readouterr().out


def test_the_default_crop_follows_the_train_images():
    """Per side the largest multiple of 32 within the median size, at most 512, at least 32."""
    stats = SplitStats(sizes=[(120, 160), (120, 160), (130, 170)])
    assert stats.default_crop() == (96, 160)
    assert SplitStats(sizes=[(1080, 1920)]).default_crop() == (512, 512)
    assert SplitStats(sizes=[(360, 480), (720, 960), (360, 480)]).default_crop() == (352, 480)
    assert SplitStats(sizes=[(20, 40)]).default_crop() == (32, 32)


def test_labelme_split_is_seeded_and_classes_can_be_given(tmp_path):
    make_labelme(tmp_path / "lm")
    source = Source(None, tmp_path / "lm", None)
    splits = []
    for n, seed in enumerate((0, 0, 1, 2, 3)):
        out = tmp_path / f"out{n}"
        convert_annotations(
            settings(format="labelme", source=source, out=out, val_fraction=0.4, seed=seed)
        )
        splits.append(sorted(p.stem for p in (out / "masks" / "val").iterdir()))
        assert len(list((out / "masks" / "train").iterdir())) == 3 and len(splits[-1]) == 2
    assert splits[0] == splits[1]  # same seed, same split
    assert len({tuple(s) for s in splits}) > 1  # other seeds, other splits

    # a given order; unlabelled=ignore: no background class, uncovered pixels 255
    out = tmp_path / "given"
    result = convert_annotations(
        settings(
            format="labelme",
            source=source,
            out=out,
            classes=("tree", "road", "car"),
            unlabelled="ignore",
        )
    )
    assert result.class_names == ["tree", "road", "car"]
    a = mask(out, split_of(out, "a"), "a")
    assert a[0, 0] == 1 and a[3, 5] == 2 and a[20, 0] == 255


def test_labelme_label_not_in_classes_is_named_or_ignored(tmp_path):
    make_labelme(tmp_path / "lm")
    source = Source(None, tmp_path / "lm", None)
    with pytest.raises(DatasetError, match=r"label 'tree' is not one of classes=.*b\.json"):
        convert_annotations(
            settings(format="labelme", source=source, out=tmp_path / "o", classes=("road", "car"))
        )
    assert only_output(tmp_path) == ["lm"]
    convert_annotations(
        settings(
            format="labelme",
            source=source,
            out=tmp_path / "o",
            classes=("road", "car"),
            unknown_labels="ignore",
        )
    )
    b = mask(tmp_path / "o", split_of(tmp_path / "o", "b"), "b")
    assert b[10, 10] == 255 and b[0, 0] == 0


BAD_LABELME = {
    "two_point_polygon": (
        {"shapes": [poly("road", [[0, 0], [5, 5]])]},
        r"shape 0 \(polygon 'road'\) in .*z\.json: a polygon needs at least 3 points, got 2",
    ),
    "unknown_shape_type": (
        {"shapes": [poly("road", [[0, 0], [5, 5]], "mask")]},
        r"shape 0 \(mask 'road'\) in .*z\.json: shape_type 'mask' is not supported",
    ),
    "missing_image": (
        {"image": None},
        r"image not found: .*z\.png \(imagePath 'z\.png', no imageData\): .*z\.json",
    ),
    # found while writing the last file: nothing of the four written before remains
    "size_differs": (
        {"imageHeight": H + 1},
        rf"image .*z\.png is {W}x{H} but .*z\.json says {W}x{H + 1}",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELME))
def test_a_bad_labelme_file_is_one_line_and_nothing_is_left(tmp_path, capsys, case):
    folder = make_labelme(tmp_path / "lm")
    change, message = BAD_LABELME[case]
    shapes = change.get("shapes", [poly("car", [[1, 1], [3, 3]], "rectangle")])
    extra = {k: v for k, v in change.items() if k not in ("shapes", "image")}
    labelme_file(folder, "z", shapes, image=change.get("image", "file"), **extra)
    status = run_in_process(
        "convert_annotations",
        ["format=labelme", f"input={folder}", f"out={tmp_path / 'out'}"],
        convert,
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]
    assert only_output(tmp_path) == ["lm"]  # no output, no temporary folder


def test_bad_json_and_existing_output(tmp_path, capsys):
    folder = make_labelme(tmp_path / "lm")
    (folder / "broken.json").write_text('{"shapes": [')
    args = ["format=labelme", f"input={folder}", f"out={tmp_path / 'out'}"]
    assert run_in_process("convert_annotations", args, convert) == 2
    assert "not a readable JSON file" in capsys.readouterr().err
    (folder / "broken.json").unlink()

    assert run_in_process("convert_annotations", args, convert) == 0
    stdout = capsys.readouterr().out
    assert (
        f"python tools/train.py dataset=out 'hydra.searchpath=[file://{tmp_path / 'out'}]'"
        in stdout
    )
    assert "warning: skipped 1 shape(s) without an area (point: 1)" in stdout
    before = (tmp_path / "out" / "conversion.json").stat().st_mtime_ns
    assert run_in_process("convert_annotations", args, convert) == 2
    assert "output folder exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "conversion.json").stat().st_mtime_ns == before
    assert run_in_process("convert_annotations", [*args, "force=true", "seed=5"], convert) == 0
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["split_rule"]["seed"] == 5
    assert only_output(tmp_path) == ["lm", "out"]


def test_write_config_never_replaces_a_config_it_did_not_write(tmp_path):
    make_labelme(tmp_path / "lm")
    configs = tmp_path / "configs"
    (configs / "dataset").mkdir(parents=True)
    (configs / "dataset" / "mine.yaml").write_text("name: mine\n")
    base = {
        "format": "labelme",
        "source": Source(None, tmp_path / "lm", None),
        "write_config": True,
    }
    with pytest.raises(ConfigError, match="not written by this tool"):
        convert_annotations(settings(**base, out=tmp_path / "o", name="mine", force=True), configs)
    assert not (tmp_path / "o").exists()
    result = convert_annotations(settings(**base, out=tmp_path / "o", name="new"), configs)
    written = configs / "dataset" / "new.yaml"
    assert result.config_files[-1] == written
    assert written.read_text() == (tmp_path / "o" / "dataset" / "new.yaml").read_text()
    assert result.next_commands()[1] == "python tools/train.py dataset=new"
    with pytest.raises(ConfigError, match="exists \\(force=true replaces it\\)"):
        convert_annotations(settings(**base, out=tmp_path / "o2", name="new"), configs)
    convert_annotations(settings(**base, out=tmp_path / "o2", name="new", force=True), configs)


# --------------------------------------------------------------------------- COCO


def rle_compressed(binary: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def rle_uncompressed(binary: np.ndarray) -> dict[str, Any]:
    flat = binary.astype(np.uint8).ravel(order="F")  # column-major, as COCO
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": [H, W], "counts": runs}


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    out = np.zeros((H, W), bool)
    out[y0:y1, x0:x1] = True
    return out


def make_coco(root: Path, annotations: list[dict[str, Any]] | None = None) -> Path:
    """Categories 3 'person', 12 'car', 7 'road' (ids not contiguous, not in order); image 1
    with a polygon, both RLE kinds and a crowd region; image 2 unannotated."""
    images = root / "images"
    for n in (1, 2):
        _write_image(images / f"img{n}.jpg", _image(n))
    road_rle = box(12, 24, 0, 32)  # bottom half
    car_rle = box(14, 18, 20, 26)  # on the road, later... but smaller
    anns = annotations or [
        # listed first but small: painted after (on top of) the larger road
        {"id": 10, "image_id": 1, "category_id": 12, "iscrowd": 0,
         "segmentation": rle_uncompressed(car_rle)},
        {"id": 11, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": rle_compressed(road_rle)},
        {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": [[2, 2, 8, 2, 8, 10, 2, 10]]},  # pixels 2..7 x 2..9
        {"id": 13, "image_id": 1, "category_id": 3, "iscrowd": 1,
         "segmentation": rle_uncompressed(box(0, 4, 28, 32))},
    ]  # fmt: skip
    doc = {
        "images": [{"id": n, "file_name": f"img{n}.jpg", "height": H, "width": W} for n in (1, 2)],
        "annotations": anns,
        "categories": [
            {"id": 12, "name": "car"},
            {"id": 3, "name": "person"},
            {"id": 7, "name": "road"},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def coco_settings(root: Path, out: Path, **kwargs: Any) -> ConversionSettings:
    source = Source(None, root / "instances.json", root / "images")
    return settings(format="coco", source=source, out=out, **kwargs)


def test_coco_polygons_rle_overlap_and_crowd(tmp_path):
    make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    result = convert_annotations(coco_settings(tmp_path / "coco", out, val_fraction=0.5))
    # categories by ascending id: 3 person, 7 road, 12 car
    assert result.class_names == ["background", "person", "road", "car"]
    label = mask(out, split_of(out, "img1"), "img1")
    assert (label[2:10, 2:8] == 1).all() and label[10, 2] == 0 and label[2, 8] == 0
    assert (label[14:18, 20:26] == 3).all()  # the small car on top of the larger road
    assert label[12, 0] == 2 and label[23, 31] == 2 and label[18, 20] == 2
    assert (label[0:4, 28:32] == 1).all()  # crowd: painted as its category
    assert (mask(out, split_of(out, "img2"), "img2") == 0).all()  # no annotation: background
    assert next((out / "images").rglob("img1.*")).suffix == ".jpg"

    ignored = convert_annotations(coco_settings(tmp_path / "coco", tmp_path / "o2", crowd="ignore"))
    label = mask(ignored.out, split_of(ignored.out, "img1"), "img1")
    assert (label[0:4, 28:32] == 255).all() and (label[2:10, 2:8] == 1).all()


def test_coco_input_per_split(tmp_path):
    for split in ("train", "val"):
        make_coco(tmp_path / split)
    out = tmp_path / "out"
    cfg = ConversionSettings(
        format="coco",
        sources=tuple(
            Source(s, tmp_path / s / "instances.json", tmp_path / s / "images")
            for s in ("train", "val")
        ),
        out=out,
        name="percoco",
        unlabelled="ignore",
    )
    result = convert_annotations(cfg)
    assert {s: st.images for s, st in result.stats.items()} == {"train": 2, "val": 2}
    assert result.class_names == ["person", "road", "car"]
    assert (mask(out, "val", "img2") == 255).all()


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"category_id": 99}, r"annotation 5 in .*instances\.json: unknown category id 99"),
        ({"image_id": 42}, r"annotation 5 in .*: unknown image id 42"),
        ({"segmentation": [[1, 1, 5, 5]]}, r"annotation 5 .*: polygon with 2 points"),
        (
            {"segmentation": {"size": [H, W + 1], "counts": [H * (W + 1)]}},
            r"annotation 5 .*: RLE size \[24, 33\] differs from the image's \[24, 32\]",
        ),
        (
            {"segmentation": {"size": [H, W], "counts": [5, 3]}},
            r"annotation 5 .*: RLE run lengths add up to 8",
        ),
        (
            {"segmentation": {"size": [H, W], "counts": "0j0"}},
            r"annotation 5 .*: RLE run lengths add up to",
        ),
    ],
)
def test_a_bad_coco_annotation_is_one_line_and_nothing_is_left(tmp_path, annotation, message):
    good = {"id": 5, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 5, 1, 5, 5]]}
    make_coco(tmp_path / "coco", [{**good, **annotation}])
    with pytest.raises(DatasetError, match=message):
        convert_annotations(coco_settings(tmp_path / "coco", tmp_path / "out"))
    assert only_output(tmp_path) == ["coco"]


def test_a_coco_file_without_images_or_not_coco_is_one_line(tmp_path):
    path = make_coco(tmp_path / "coco")
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match=r"no entries in 'images': .*instances\.json"):
        convert_annotations(coco_settings(tmp_path / "coco", tmp_path / "out"))
    path.write_text(json.dumps({"shapes": []}))
    with pytest.raises(DatasetError, match=r"not a COCO file .*instances\.json"):
        convert_annotations(coco_settings(tmp_path / "coco", tmp_path / "out"))
    assert only_output(tmp_path) == ["coco"]


def test_rle_string_reader_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        binary = rng.random((h, w)) < rng.random()
        counts = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))["counts"]
        runs = rle_string_counts(counts.decode("ascii"))
        assert sum(runs) == h * w and sum(runs[1::2]) == binary.sum()


# --------------------------------------------------------------------------- the tool


def test_a_bad_setting_is_one_line(tmp_path, capsys):
    args = ["format=xml", "input=a", f"out={tmp_path / 'b'}"]
    assert run_in_process("convert_annotations", args, convert) == 2
    assert capsys.readouterr().err.strip() == (
        "error: format must be one of labelme, coco, color, got 'xml'"
    )
    args = ["format=labelme", "input={train:a,extra:b}", f"out={tmp_path / 'b'}"]
    assert run_in_process("convert_annotations", args, convert) == 2
    assert "input has split 'extra'" in capsys.readouterr().err
    args = ["format=labelme", "input=a", "images=b", f"out={tmp_path / 'b'}"]
    assert run_in_process("convert_annotations", args, convert) == 2
    assert "images= is not used by format=labelme" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_converted_labelme_trains_with_the_printed_command(tmp_path, capsys, monkeypatch):
    """The train command the tool prints composes and trains (1 iteration, in-process)."""
    monkeypatch.chdir(tmp_path)
    make_labelme(tmp_path / "lm")
    args = ["format=labelme", "input=lm", "out=data/mine", "crop_size=[24,32]"]
    assert run_in_process("convert_annotations", args, convert) == 0
    printed = capsys.readouterr().out.splitlines()
    command = next(line for line in printed if "tools/train.py" in line).split()
    assert command[:3] == ["python", "tools/train.py", "dataset=mine"]
    overrides = [*command[2:4], "trainer.max_iters=1", "trainer.eval_interval=1"]
    overrides = [o.strip("'") for o in overrides]
    tiny = ["trainer.log_interval=1", "loader.batch_size=2", "loader.num_workers=0"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, *tiny, "trainer.device=cpu"])
    assert cfg.dataset.name == "mine" and cfg.dataset.root == "data/mine"
    result = train_run(cfg, run_dir=tmp_path / "run")
    assert result.iteration == 1 and 0.0 <= result.metrics["mIoU"] <= 1.0

"""SynthCity: determinism, class presence, void ids, atomic and locked generation."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from seg.data.cityscapes import CityscapesDataset
from seg.data.labels import cityscapes_lookup_table
from seg.data.synthcity import (
    MARKER,
    SynthCityDataset,
    SynthCityParams,
    generate_synthcity,
    iter_split,
    render_scene,
)
from seg.errors import ConfigError, DatasetError

TINY = {"height": 64, "width": 128, "num_train": 4, "num_val": 2}


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    params = SynthCityParams(**TINY)
    generate_synthcity(tmp_path / "a", params)
    generate_synthcity(tmp_path / "b", params)
    generate_synthcity(tmp_path / "c", SynthCityParams(**{**TINY, "seed": 1}))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(a) == 12 and a == b
    assert set(a) == set(c) and all(a[k] != c[k] for k in a)


def test_cityscapes_layout_readable_by_cityscapes_dataset(tmp_path):
    generate_synthcity(tmp_path / "sc", SynthCityParams(**TINY))
    assert (
        tmp_path / "sc" / "leftImg8bit" / "train" / "anvil" / "anvil_000000_000019_leftImg8bit.png"
    ).is_file()
    assert (
        tmp_path / "sc" / "gtFine" / "val" / "ember" / "ember_000001_000019_gtFine_labelIds.png"
    ).is_file()
    ds = CityscapesDataset(tmp_path / "sc", "train")
    assert len(ds) == 4 and ds[0]["image"].shape == (64, 128, 3)
    assert json.loads((tmp_path / "sc" / MARKER).read_text())["params"]["height"] == 64


def test_all_classes_present_long_tail_and_void_ids():
    params = SynthCityParams(height=64, width=128, num_train=40)
    lut, valid = cityscapes_lookup_table()
    counts = np.zeros(256, np.int64)
    for _, _, image, label in iter_split(params, "train"):
        assert image.shape == (64, 128, 3) and image.dtype == np.uint8
        assert valid[label].all()  # only real Cityscapes ids
        counts += np.bincount(label.ravel(), minlength=256)
    train = np.bincount(lut, weights=counts, minlength=256)
    assert np.all(train[:19] > 0), np.flatnonzero(train[:19] == 0)
    for void_id in (0, 1, 2):  # unlabeled, ego vehicle, rectification border
        assert counts[void_id] > 0
    common = train[[0, 2, 8, 10]]  # road, building, vegetation, sky
    rare = train[[5, 6, 7, 12, 17, 18]]  # pole, light, sign, rider, motorcycle, bicycle
    assert rare.max() * 5 < common.min()


def test_difficulty_knobs_change_the_image_only():
    easy = SynthCityParams(
        height=64, width=128, noise_std=0, blur_sigma=0, texture=0, colour_overlap=0
    )
    hard = SynthCityParams(
        height=64, width=128, noise_std=20, blur_sigma=1.5, texture=2, colour_overlap=0.9
    )
    image_e, label_e = render_scene(easy, np.random.default_rng(3))
    image_h, label_h = render_scene(hard, np.random.default_rng(3))
    assert np.array_equal(label_e, label_h)  # same layout from the same stream
    road = label_e == 7
    # Without noise/texture/blur the road is nearly flat (lighting gradient and shadow only).
    assert image_e[road].std(0).mean() < image_h[road].std(0).mean()


def test_dataset_generates_only_when_asked_and_checks_params(tmp_path):
    root = tmp_path / "synthcity"
    # Reading is the default: a missing root is one line saying how to make it.
    with pytest.raises(DatasetError, match=r"does not exist .*tools/make_synthcity\.py") as error:
        SynthCityDataset(root, "val", generator=TINY)
    assert len(str(error.value).splitlines()) == 1 and not root.exists()
    ds = SynthCityDataset(root, "val", generator=TINY, generate=True)  # training's first use
    assert len(ds) == 2 and (root / MARKER).is_file()
    assert not list(tmp_path.glob(".synthcity.tmp-*"))  # temp folder renamed away
    mtime = (root / MARKER).stat().st_mtime_ns
    assert len(SynthCityDataset(root, "train", generator=TINY)) == 4
    assert (root / MARKER).stat().st_mtime_ns == mtime  # reused, not regenerated
    for generate in (False, True):  # reading checks the recorded parameters too
        with pytest.raises(DatasetError, match=r"other parameters .*noise_std"):
            SynthCityDataset(root, "train", generator={**TINY, "noise_std": 1.0}, generate=generate)


def test_interrupted_generation_is_not_taken_for_complete(tmp_path):
    root = tmp_path / "synthcity"
    # A leftover temp folder of a killed run, and a root without marker.
    stale = tmp_path / ".synthcity.tmp-99999"
    (stale / "leftImg8bit").mkdir(parents=True)
    generate_synthcity(root, SynthCityParams(**TINY))
    assert not stale.exists() and (root / MARKER).is_file()
    half = tmp_path / "half"
    (half / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a complete SynthCity dataset"):
        SynthCityDataset(half, "train", generator=TINY, generate=True)
    with pytest.raises(DatasetError, match="is not a complete SynthCity dataset"):
        SynthCityDataset(half, "train", generator=TINY)


def test_bad_generator_options():
    with pytest.raises(ConfigError, match=r"unknown SynthCity generator option.*colour_overlapp"):
        SynthCityParams.from_mapping({"colour_overlapp": 0.3})
    with pytest.raises(ConfigError, match="colour_overlap"):
        SynthCityParams.from_mapping({"colour_overlap": 1.5})
    with pytest.raises(ConfigError, match="cars"):
        SynthCityParams.from_mapping({"cars": [3, 1]})


def _ensure(root: str) -> int:
    from seg.data.synthcity import SynthCityParams, ensure_synthcity

    ensure_synthcity(root, SynthCityParams(**TINY))
    return 0


def test_concurrent_first_use_generates_once(tmp_path):
    import multiprocessing as mp

    root = tmp_path / "synthcity"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ensure, args=(str(root),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ref = tmp_path / "ref"
    generate_synthcity(ref, SynthCityParams(**TINY))
    assert _digest(root) == _digest(ref)
    assert not list(tmp_path.glob(".synthcity.tmp-*"))


def test_synthcity_config_composes_and_builds(tmp_path):
    from seg.data.build import build_dataset
    from seg.data.check import compose_dataset_config

    overrides = [
        "dataset=synthcity",
        f"dataset.root={tmp_path / 'sc'}",
        "dataset.generator.height=32",
        "dataset.generator.width=64",
        "dataset.generator.num_train=3",
        "dataset.generator.num_val=2",
        "dataset.crop_size=[24,24]",
    ]
    cfg = compose_dataset_config(overrides)
    with pytest.raises(DatasetError, match="make_synthcity"):
        build_dataset(cfg.dataset.val)  # what evaluation builds only reads
    assert not (tmp_path / "sc").exists()
    train = build_dataset(cfg.dataset.train)  # training's node generates on first use
    val = build_dataset(cfg.dataset.val)
    assert len(train) == 3 and len(val) == 2
    assert train[(0, 1)]["image"].shape == (24, 24, 3)
    assert val[0]["label"].shape == (32, 64)


def test_check_dataset_reports_a_missing_synthcity_root_and_generates_nothing(tmp_path, capsys):
    from seg.data.check import main

    root = tmp_path / "absent"
    assert main([f"dataset.root={root}"]) == 2
    err = capsys.readouterr().err.strip()  # errors go to stderr (seg/cli.py)
    assert len(err.splitlines()) == 1 and "does not exist" in err and "make_synthcity" in err, err
    assert not root.exists() and not list(tmp_path.iterdir())

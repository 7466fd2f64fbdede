"""Decoded cache: same pixels as the PNGs, stat-only validation, stale refusal or rebuild,
resumable and atomic builds, and tools/build_cache.py."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from seg.data import cache as cache_module
from seg.data import folder as folder_module
from seg.data.cache import build_cache, cache_folder, check_cache
from seg.data.cityscapes import CityscapesDataset
from seg.data.folder import FolderDataset
from seg.data.loader import build_train_loader
from seg.data.synthcity import SynthCityParams, generate_synthcity
from seg.data.transforms import build_eval_transform, build_train_transform
from seg.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[1]
TINY = {"height": 48, "width": 96, "num_train": 5, "num_val": 2}


@pytest.fixture(scope="module")
def synthcity(tmp_path_factory) -> Path:
    """Tiny SynthCity in the Cityscapes layout (label ids 0..33, mapped to train ids)."""
    root = tmp_path_factory.mktemp("sc") / "synthcity"
    generate_synthcity(root, SynthCityParams(**TINY))
    return root


def _items_equal(a: dict, b: dict) -> bool:
    return torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_cached_pixels_equal_the_png_path(synthcity, tmp_path):
    for split in ("train", "val"):
        png = CityscapesDataset(synthcity, split)
        cached = CityscapesDataset(synthcity, split, cache=tmp_path / "cache")
        assert cached.cache is not None and len(cached.cache) == len(png)
        for i in range(len(png)):
            assert _items_equal(png[i], cached[i])
            image, label = cached.cache.read(i)
            assert not image.flags.writeable  # a view of the memory-mapped file
            assert image.shape == (48, 96, 3) and label.dtype == np.uint8
    # Train ids are stored (the lookup table is applied at build time): void ids are 255.
    _, label = cached.cache.read(0)
    assert set(np.unique(label)) <= set(range(19)) | {255}
    # The train pipeline gives the same sample from either source for the same seed.
    transform = build_train_transform([32, 64], [0.5, 2.0])
    png = CityscapesDataset(synthcity, "train", transform=transform)
    cached = CityscapesDataset(synthcity, "train", transform=transform, cache=tmp_path / "cache")
    for key in [(0, 11), (3, 12), (4, 13)]:
        assert _items_equal(png[key], cached[key])
    # An identity eval transform hands out the mapped arrays: the tensors own a copy.
    cached = CityscapesDataset(
        synthcity, "val", transform=build_eval_transform(), cache=tmp_path / "cache"
    )
    item = cached[0]
    item["image"][0, 0, 0] = 7  # writable, and the cache file is untouched
    assert _items_equal(CityscapesDataset(synthcity, "val")[0], cached[0])


def test_loader_batches_equal_with_and_without_cache(synthcity, tmp_path):
    transform = build_train_transform([32, 64], [0.5, 2.0])
    sets = [
        CityscapesDataset(synthcity, "train", transform=transform, cache=cache)
        for cache in (None, tmp_path / "cache")
    ]
    loaders = [iter(build_train_loader(ds, 2, num_workers=0, seed=3)) for ds in sets]
    for _ in range(4):
        a, b = (next(it) for it in loaders)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _folder_data(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        _write(root / "images" / f"{i:02d}.png", rng.integers(0, 256, (20, 30, 3), np.uint8))
        _write(root / "masks" / f"{i:02d}.png", rng.choice([0, 1, 99], (20, 30)).astype(np.uint8))
    return root


def test_folder_dataset_caches_train_ids_and_the_table_is_part_of_the_key(tmp_path):
    root = _folder_data(tmp_path / "data")
    kwargs = {"image_dir": root / "images", "mask_dir": root / "masks", "class_names": ["a", "b"]}
    table = {0: 0, 1: 1, 99: 255}
    png = FolderDataset(**kwargs, id_to_trainid=table)
    cached = FolderDataset(**kwargs, id_to_trainid=table, cache=tmp_path / "cache")
    for i in range(len(png)):
        assert _items_equal(png[i], cached[i])
        raw = cv2.imread(str(png.pairs[i][1]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(cached.cache.read(i)[1], np.where(raw == 99, 255, raw))
    # Another label table is another cache (labels are stored as train ids).
    other = FolderDataset(**kwargs, id_to_trainid={0: 1, 1: 0, 99: 255}, cache=tmp_path / "cache")
    assert other.cache.folder != cached.cache.folder
    assert np.array_equal(other.cache.read(0)[1], np.take(other.lut, png.load_raw(0)[1]))


def test_opening_a_valid_cache_reads_no_image_file(synthcity, tmp_path, monkeypatch):
    CityscapesDataset(synthcity, "train", cache=tmp_path / "cache")

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(folder_module, "read_image", no_decoding)
    monkeypatch.setattr(folder_module, "read_label", no_decoding)
    ds = CityscapesDataset(synthcity, "train", cache=tmp_path / "cache", cache_build=False)
    assert ds[2]["image"].shape == (48, 96, 3)


def _copy_tree(src: Path, dst: Path) -> Path:
    for path in src.rglob("*.png"):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return dst


def test_stale_entry_is_refused_in_one_line_or_rebuilt(synthcity, tmp_path):
    root = _copy_tree(synthcity, tmp_path / "sc")
    cache = tmp_path / "cache"
    ds = CityscapesDataset(root, "train", cache=cache)
    label_path = ds.pairs[3][1]
    # Same size, new content and modification time: caught by the stat (mtime_ns).
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[:10] = 7  # road
    _write(label_path, label)
    os.utime(label_path, ns=(1, 10**18))

    with pytest.raises(DatasetError) as info:
        CityscapesDataset(root, "train", cache=cache, cache_build=False)
    message = str(info.value)
    assert "\n" not in message and str(label_path) in message and "stale" in message
    assert "tools/build_cache.py" in message and f"dataset.cache={cache}" in message

    assert check_cache(cache, ds).stale == [3]
    fresh = CityscapesDataset(root, "train", cache=cache, cache_build=True)  # rebuilds entry 3
    assert check_cache(cache, ds).todo == []
    assert np.all(fresh[3]["label"].numpy()[:10] == 0)
    assert _items_equal(fresh[3], CityscapesDataset(root, "train")[3])


def test_missing_cache_or_arrays_are_refused_when_building_is_off(synthcity, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=r"lacks 5 of 5 images .*tools/build_cache.py"):
        CityscapesDataset(synthcity, "train", cache=cache, cache_build=False)
    ds = CityscapesDataset(synthcity, "train", cache=cache)
    (cache_folder(cache, ds) / "images" / "000001.npy").unlink()
    with pytest.raises(DatasetError, match=r"cached arrays of .*000019_leftImg8bit.png are gone"):
        CityscapesDataset(synthcity, "train", cache=cache, cache_build=False)
    assert build_cache(ds, cache).built == 1


def test_interrupted_build_keeps_finished_entries_and_resumes(synthcity, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = CityscapesDataset(synthcity, "train")
    decode = ds.load
    calls = []

    def interrupted(index):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(index)

    monkeypatch.setattr(ds, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(ds, cache, progress=False)
    folder = cache_folder(cache, ds)
    index = json.loads((folder / "index.json").read_text())
    assert sorted(index["entries"]) == ["0", "1"]  # the two finished ones were recorded
    assert not list(folder.rglob("*.partial"))  # no half-written file is left
    monkeypatch.setattr(ds, "load", decode)
    result = build_cache(ds, cache, progress=False)
    assert (result.images, result.built) == (5, 3)
    assert result.bytes == 5 * (48 * 96 * 4 + 2 * 128)  # arrays plus .npy headers
    assert build_cache(ds, cache, progress=False).built == 0


def test_a_corrupt_source_is_named_and_earlier_entries_are_kept(synthcity, tmp_path):
    root = _copy_tree(synthcity, tmp_path / "sc")
    ds = CityscapesDataset(root, "train")
    ds.pairs[2][0].write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=re.escape(str(ds.pairs[2][0]))):
        CityscapesDataset(root, "train", cache=tmp_path / "cache")
    assert check_cache(tmp_path / "cache", ds).missing == [2, 3, 4]


def test_cache_path_that_is_a_file_is_an_error(synthcity, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        CityscapesDataset(synthcity, "train", cache=tmp_path / "file")


def test_index_is_saved_during_a_long_build(synthcity, tmp_path, monkeypatch):
    # SAVE_EVERY_S = 0: the index is rewritten after each entry (as every 5 s on real data).
    monkeypatch.setattr(cache_module, "SAVE_EVERY_S", 0.0)
    saved = []
    real_save = cache_module._save_index
    monkeypatch.setattr(
        cache_module, "_save_index", lambda f, e: (saved.append(len(e)), real_save(f, e))
    )
    build_cache(CityscapesDataset(synthcity, "val"), tmp_path / "cache", progress=False)
    assert saved == [1, 2, 2]  # after each entry, then once more at the end


def _tool_and_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import build_cache as tool
    finally:
        sys.path.remove(str(REPO / "tools"))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return tool, compose(config_name="build_cache", overrides=overrides)


def test_build_cache_tool_in_process(synthcity, tmp_path, capsys):
    cache = tmp_path / "cache"
    tool, cfg = _tool_and_config([f"dataset.root={synthcity}", f"dataset.cache={cache}"])
    cfg.progress = False
    tool.run(cfg)
    tool.run(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("train: 5 images in ")
    assert lines[0].endswith("5 decoded now, 0 already cached")
    assert lines[1].startswith("val: 2 images in ")
    assert lines[2].endswith("0 decoded now, 5 already cached")
    CityscapesDataset(synthcity, "val", cache=cache, cache_build=False)  # built: no error
    tool, cfg = _tool_and_config([f"dataset.root={synthcity}"])
    with pytest.raises(ConfigError, match=r"dataset\.cache is not set"):
        tool.run(cfg)
    tool, cfg = _tool_and_config([f"dataset.root={synthcity}", f"dataset.cache={cache}"])
    cfg.nodes = ["train", "test_set"]
    with pytest.raises(ConfigError, match="no dataset node 'test_set'"):
        tool.run(cfg)


def test_build_cache_tool_bad_input_is_one_error_line(tmp_path):
    command = [
        sys.executable,
        str(REPO / "tools" / "build_cache.py"),
        f"dataset.root={tmp_path / 'nowhere'}",
        f"dataset.cache={tmp_path / 'cache'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: dataset root not found: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # nothing written for a dataset that is not there


def test_cache_reader_pickles_without_its_mappings(synthcity, tmp_path):
    ds = CityscapesDataset(synthcity, "val", cache=tmp_path / "cache")
    image, _ = ds.cache.read(1)
    assert ds.cache.read(1)[0] is image  # the mapping is kept, not made again
    clone = pickle.loads(pickle.dumps(ds.cache))  # as for a spawned loader worker
    assert clone._mapped == {} and np.array_equal(clone.read(1)[0], image)


@pytest.mark.slow
def test_loader_benchmark_section_quick():
    from seg.bench import loader as bench_loader
    from seg.bench.timing import BenchOptions

    section = bench_loader.run(BenchOptions(quick=True, warmup=1))
    keys = {(r["crop"][0], r["source"], r["pipeline"]) for r in section.records}
    assert len(section.records) == 8 and len(keys) == 8
    assert all(r["images_per_s_per_worker"] > 0 for r in section.records)
    if Path("/proc/self/stat").exists():  # the worker's CPU time is read from /proc
        assert all(r["images_per_worker_cpu_s"] > 0 for r in section.records)
    assert "cache" in section.markdown and "x png/old" in section.markdown

"""Prediction on images, folders and videos; colour masks and overlays; checkpoint loading."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from seg.checkpoint import save_checkpoint
from seg.data.batch import normalize_images
from seg.engine.load import load_inference_model
from seg.errors import CheckpointError, ConfigError, DatasetError
from seg.models.bisenetv2 import BiSeNetV2
from seg.predict import Predictor, collect_inputs, output_names, run_prediction
from seg.visualize import cityscapes_palette, colorize, generated_palette, overlay

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]
MEAN, STD = [0.4, 0.45, 0.5], [0.25, 0.25, 0.25]


def minimal_config(num_classes: int = NUM_CLASSES) -> dict:
    """The parts of a resolved training config that prediction reads."""
    return {
        "dataset": {
            "num_classes": num_classes,
            "ignore_index": 255,
            "class_names": [f"c{i}" for i in range(num_classes)],
            "palette": PALETTE[:num_classes],
            "mean": MEAN,
            "std": STD,
        },
        "model": {
            "_target_": "seg.models.bisenetv2.BiSeNetV2",
            "num_classes": num_classes,
            "aux_heads": True,
            "weights": None,
        },
    }


def perturb_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BN layers non-trivial statistics, so that a wrong load would show in outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(1 + 0.2 * torch.rand(module.num_features, generator=generator))
            module.weight.data.copy_(
                1 + 0.1 * torch.randn(module.num_features, generator=generator)
            )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BiSeNetV2]:
    """A checkpoint of a randomly initialised BiSeNetV2 (with aux heads) and its model."""
    torch.manual_seed(0)
    model = BiSeNetV2(NUM_CLASSES, aux_heads=True)
    with torch.no_grad():
        perturb_bn_stats(model)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": minimal_config(), "iteration": 7})
    return path, model.eval()


def write_image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """Write a random RGB image with cv2 (BGR on disk); return it as RGB."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rgb[..., ::-1].copy())
    return rgb


def reference_labels(model: torch.nn.Module, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax of the PyTorch model on one image, computed without the predictor, and the
    mask of pixels whose top two logits differ clearly (batched runs may swap near-ties)."""
    with torch.no_grad():
        logits = model(normalize_images(torch.from_numpy(rgb)[None], MEAN, STD))[0]
    top2 = logits.topk(2, dim=0).values
    return logits.argmax(0).to(torch.uint8).numpy(), (top2[0] - top2[1] > 1e-4).numpy()


# --------------------------------------------------------------------------- visualize


def test_colorize_maps_ids_to_palette_and_unknown_ids_to_black() -> None:
    label = np.array([[0, 1, 2], [3, 255, 4]], dtype=np.uint8)
    color = colorize(label, PALETTE)
    assert color.shape == (2, 3, 3) and color.dtype == np.uint8
    assert color[0, 0].tolist() == PALETTE[0] and color[1, 0].tolist() == PALETTE[3]
    assert color[1, 1].tolist() == [0, 0, 0]  # ignore
    assert color[1, 2].tolist() == [0, 0, 0]  # id past the palette
    wide = colorize(np.array([[2, -1, 300]], dtype=np.int64), PALETTE)
    assert wide.tolist() == [[PALETTE[2], [0, 0, 0], [0, 0, 0]]]


def test_overlay_blends_with_alpha() -> None:
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    color = np.full((2, 2, 3), 200, dtype=np.uint8)
    assert (overlay(image, color, 0.0) == 100).all()
    assert (overlay(image, color, 1.0) == 200).all()
    assert (overlay(image, color, 0.25) == 125).all()
    with pytest.raises(ValueError):
        overlay(image, color[:1], 0.5)


def test_palettes() -> None:
    cityscapes = cityscapes_palette()
    assert len(cityscapes) == 19
    assert cityscapes[0] == [128, 64, 128] and cityscapes[18] == [119, 11, 32]  # road, bicycle
    generated = generated_palette(30)
    assert len({tuple(c) for c in generated}) == 30 and [0, 0, 0] not in generated


# --------------------------------------------------------------------------- loading


def test_load_drops_aux_heads_and_keeps_weights(trained: tuple[Path, BiSeNetV2]) -> None:
    path, model = trained
    net = load_inference_model(path, device="cpu")
    assert not net.model.training
    assert getattr(net.model, "aux_heads", None) is None
    reference = model.state_dict()
    loaded = net.model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in loaded)
    assert len(loaded) < len(reference)  # the aux-head tensors were dropped
    assert (net.mean, net.std, net.palette, net.num_classes) == (MEAN, STD, PALETTE, NUM_CLASSES)


def test_load_rejects_weights_that_do_not_fit(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    _, model = trained
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    bad_key = tmp_path / "extra.pt"
    save_checkpoint(bad_key, {"model": state, "config": minimal_config()})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(extra\.weight\)"):
        load_inference_model(bad_key)
    wrong_classes = tmp_path / "classes.pt"
    save_checkpoint(wrong_classes, {"model": model.state_dict(), "config": minimal_config(3)})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_inference_model(wrong_classes)
    no_mean = minimal_config()
    del no_mean["dataset"]["mean"]
    save_checkpoint(tmp_path / "nomean.pt", {"model": model.state_dict(), "config": no_mean})
    with pytest.raises(CheckpointError, match="mean"):
        load_inference_model(tmp_path / "nomean.pt")


def test_load_accepts_wrapped_state_dicts(tmp_path: Path, trained: tuple[Path, BiSeNetV2]) -> None:
    _, model = trained
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DDP
    save_checkpoint(tmp_path / "ddp.pt", {"model": wrapped, "config": minimal_config()})
    net = load_inference_model(tmp_path / "ddp.pt")
    assert torch.equal(net.model.head.classifier.weight, model.head.classifier.weight)


def test_predictor_rejects_bad_settings(trained: tuple[Path, BiSeNetV2]) -> None:
    net = load_inference_model(trained[0])
    for bad, match in (
        ({"batch_size": 0}, "batch_size"),
        ({"alpha": 1.5}, "alpha"),
        ({"mode": "slide"}, "crop_size"),
        ({"amp": "fp8"}, "amp"),
        # wrong types: one line naming the key, not a ZeroDivisionError or ValueError
        ({"mode": "slide", "crop_size": [32, 32], "stride": [0, 0]}, r"stride must be \[h, w\]"),
        ({"mode": "slide", "crop_size": [32, 32], "stride": [64, 64]}, "larger than crop_size"),
        ({"mode": "slide", "crop_size": "abc", "stride": 8}, "crop_size must be"),
        ({"scales": "abc"}, "scales must be a non-empty list of positive numbers, got 'abc'"),
        ({"scales": [1.0, 0]}, "scales must be"),
        ({"batch_size": "abc"}, "batch_size must be an integer, got 'abc'"),
        ({"batch_size": 2.9}, "batch_size must be a whole number, got 2.9"),
        ({"alpha": "abc"}, "alpha must be a number"),
        ({"flip": "abc"}, "flip must be true or false"),
        ({"tile_size": [0, 64]}, "tile_size must be"),
        ({"tile_size": None}, "tile_size must be"),
        ({"tile_margin": -1}, "tile_margin must be >= 0"),
        ({"tile_pixels": "abc"}, "tile_pixels must be an integer"),
    ):
        with pytest.raises(ConfigError, match=match) as info:
            Predictor(net, **bad)
        assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="device must be"):
        load_inference_model(trained[0], device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_inference_model(trained[0], device="cuda")


def test_collect_inputs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        collect_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images or videos"):
        collect_inputs(tmp_path / "empty")
    for name in ("a.png", "a.jpg", "sub/b.png", "notes.txt", "out/old.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    names = [i.name for i in collect_inputs(tmp_path / "in", exclude=tmp_path / "in" / "out")]
    assert names == ["a_jpg", "a_png", "sub/b"]


def test_output_names_never_collide() -> None:
    paths = [Path(p) for p in ("a.jpg", "a.png", "a_png.png", "A.PNG", "b.png", "s/a.png")]
    names = output_names(paths)
    # a_png.png keeps its own name; a.png, whose suffixed name it takes, gets a number.
    assert names == ["a_jpg", "a_png_2", "a_png", "A_png_3", "b", "s/a"]
    assert len({n.casefold() for n in names}) == len(names)  # distinct on any disk
    many = output_names([Path(f"x.{s}") for s in ("png", "PNG", "jpg")] + [Path("x_png.jpg")])
    assert len({n.casefold() for n in many}) == 4


def test_colliding_names_are_all_predicted(tmp_path: Path, trained: tuple[Path, BiSeNetV2]) -> None:
    """a.jpg, a.png and a_png.png: three images, three distinct sets of outputs."""
    for i, name in enumerate(("a.jpg", "a.png", "a_png.png")):
        write_image(tmp_path / "in" / name, 32, 48, i)
    out = tmp_path / "out"
    summary = run_prediction(ckpt=trained[0], input=tmp_path / "in", out=out, progress=False)
    assert summary.images == 3
    for folder in ("labels", "colors", "overlays"):
        assert sorted(p.name for p in (out / folder).iterdir()) == [
            "a_jpg.png",
            "a_png.png",
            "a_png_2.png",
        ]
    assert "renamed to keep them apart: a.jpg -> a_jpg, a.png -> a_png_2" in summary.describe()


# --------------------------------------------------------------------------- prediction


def test_predict_folder_mixed_sizes_and_corrupt_file(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    ckpt, model = trained
    sizes = {"a": (64, 96), "b": (64, 96), "odd": (101, 157), "sub/c": (64, 96)}
    images = {
        name: write_image(tmp_path / "in" / f"{name}.png", h, w, i)
        for i, (name, (h, w)) in enumerate(sizes.items())
    }
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    summary = run_prediction(
        ckpt, tmp_path / "in", out, device="cpu", batch_size=2, num_workers=1, progress=False
    )
    assert summary.images == 4
    assert [p.name for p, _ in summary.skipped] == ["broken.png"]
    for name, rgb in images.items():
        label = cv2.imread(str(out / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert label.shape == rgb.shape[:2] and label.dtype == np.uint8
        expected, clear = reference_labels(model, rgb)
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(label[clear], expected[clear])
        color = cv2.imread(str(out / "colors" / f"{name}.png"))[..., ::-1]
        np.testing.assert_array_equal(color, colorize(label, PALETTE))
        blended = cv2.imread(str(out / "overlays" / f"{name}.png"))[..., ::-1]
        np.testing.assert_array_equal(blended, overlay(rgb, color, 0.5))
    assert not (out / "labels" / "broken.png").exists()
    assert not list(out.rglob(".*"))  # no partial files left behind


def test_tiles_see_only_their_window_and_match_whole_with_full_context(
    trained: tuple[Path, BiSeNetV2],
) -> None:
    net = load_inference_model(trained[0])
    rgb = write_image_array(64, 96, seed=5)
    whole = Predictor(net, tile_pixels=None, progress=False).predict([rgb])[0]
    # Margins wider than the image: every tile's window is the whole image, so tiles agree
    # with the whole-image prediction exactly.
    full = Predictor(net, tile_pixels=1000, tile_size=[32, 48], tile_margin=1000)
    assert full.needs_tiles(rgb)
    np.testing.assert_array_equal(full.predict([rgb])[0], whole)
    # Narrow margins: the model only ever sees a tile plus its margins (padded to 32).
    shapes = []
    hook = net.model.register_forward_pre_hook(lambda _, args: shapes.append(args[0].shape[-2:]))
    try:
        tiled = Predictor(net, tile_pixels=1000, tile_size=[32, 48], tile_margin=8).predict([rgb])
    finally:
        hook.remove()
    assert tiled.shape == (1, 64, 96) and tiled.dtype == np.uint8
    assert len(shapes) == 2 * 2  # 64 / 32 x 96 / 48 tiles
    assert max(h for h, _ in shapes) <= 64 and max(w for _, w in shapes) <= 64
    assert (tiled[0] == whole).mean() > 0.5  # same model; only the context differs


def write_image_array(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_large_images_are_predicted_in_tiles_by_run_prediction(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    write_image(tmp_path / "in" / "big.png", 80, 120, 1)
    write_image(tmp_path / "in" / "small.png", 32, 32, 2)
    summary = run_prediction(
        trained[0], tmp_path / "in", tmp_path / "out", tile_pixels=64 * 64, tile_size=[48, 48],
        batch_size=4, progress=False,
    )  # fmt: skip
    assert summary.images == 2 and summary.tiled == 1
    assert "1 image(s) in tiles" in summary.describe()
    label = cv2.imread(str(tmp_path / "out" / "labels" / "big.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (80, 120)


def test_stale_partial_files_in_the_output_folder_are_removed(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    write_image(tmp_path / "in" / "a.png", 32, 32, 1)
    out = tmp_path / "out"
    stale = out / "labels" / "sub" / ".a.png.somehost-1-0123abcd.partial"  # kill -9 leftover
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))  # old enough to be stale whichever machine wrote it
    run_prediction(trained[0], tmp_path / "in", out, progress=False)
    assert not stale.exists() and (out / "labels" / "a.png").is_file()


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    frames, shape = 0, (0, 0)
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames, shape = frames + 1, frame.shape[:2]
    capture.release()
    return frames, shape


def test_predict_video_gives_overlay_video(tmp_path: Path, trained: tuple[Path, BiSeNetV2]) -> None:
    ckpt, _ = trained
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (80, 48))
    rng = np.random.default_rng(0)
    for _ in range(5):
        writer.write(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    writer.release()
    assert count_frames(video) == (5, (48, 80))
    summary = run_prediction(
        ckpt, video, tmp_path / "out", device="cpu", batch_size=2, progress=False
    )
    assert (summary.videos, summary.frames, summary.skipped) == (1, 5, [])
    assert count_frames(tmp_path / "out" / "overlays" / "clip.mp4") == (5, (48, 80))


# --------------------------------------------------------------------------- the tool


def run_tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "predict.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_predict_tool_reports_skipped_files(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    ckpt, _ = trained
    write_image(tmp_path / "in" / "good.jpg", 40, 50, 0)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"not a jpeg")
    work = tmp_path / "cwd"
    work.mkdir()
    result = run_tool(
        [f"ckpt={ckpt}", f"input={tmp_path / 'in'}", "out=pred", "num_workers=0"], work
    )
    assert result.returncode == 1, result.stderr
    assert "bad.jpg" in result.stderr and "1 file(s) skipped" in result.stdout
    assert (work / "pred" / "labels" / "good.png").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["pred"]  # nothing else in the cwd

    missing = run_tool([f"ckpt={tmp_path / 'nope.pt'}", f"input={tmp_path / 'in'}"], work)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'nope.pt'}"
    ]

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    unwritable = run_tool([f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"out={blocker}/pred"], work)
    assert unwritable.returncode == 2
    last = unwritable.stderr.strip().splitlines()[-1]  # after the progress bar's lines
    assert last.startswith("error: ") and str(blocker) in last, unwritable.stderr
    assert "Traceback" not in unwritable.stderr


@pytest.mark.gpu
def test_predict_on_gpu_with_amp_matches_cpu(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    ckpt, model = trained
    rgb = write_image(tmp_path / "in" / "odd.png", 101, 157, 0)
    images = normalize_images(torch.from_numpy(rgb)[None], MEAN, STD)
    with torch.no_grad():
        logits = model(images)[0]
        on_gpu = copy.deepcopy(model).cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            half = on_gpu(images.cuda())[0].float().cpu()
    # A random model's logits are small (|logit| < 0.04, top-2 gaps ~1e-2): compare where
    # the CPU winner leads by more than what fp16 actually moved the logits here (an
    # absolute guess such as 0.05 left no pixel to compare on an H100).
    fp16_shift = (half - logits).abs().max().item()
    top2 = logits.topk(2, dim=0).values
    expected = logits.argmax(0).numpy()
    for device, amp in (("cuda", "off"), ("cuda", "fp16")):
        out = tmp_path / f"out_{amp}"
        summary = run_prediction(ckpt, tmp_path / "in", out, device=device, amp=amp, progress=False)
        assert summary.images == 1 and not summary.skipped
        label = cv2.imread(str(out / "labels" / "odd.png"), cv2.IMREAD_UNCHANGED)
        margin = 2 * fp16_shift if amp == "fp16" else 1e-3  # fp32 on CUDA: TF32 convolutions
        clear = (top2[0] - top2[1] > margin).numpy()
        assert clear.mean() > 0.9, (amp, fp16_shift)
        np.testing.assert_array_equal(label[clear], expected[clear])

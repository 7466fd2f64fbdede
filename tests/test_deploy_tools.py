"""The tools on exported models: export quantize=int8, eval and predict with ckpt=*.onnx.

A checkpoint of a tiny conv net (``test_deploy.TinySegmenter``, 19 classes) with a config
composed from ``configs/train.yaml`` on a tiny SynthCity is exported once per module with
``export_checkpoint`` (the tool's own path), so the ONNX metadata comes from the
checkpoint as it does for users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seg.checkpoint import save_checkpoint
from seg.data.synthcity import SynthCityParams, generate_synthcity
from seg.engine.eval_run import CONFIG_DIR, main
from seg.engine.load import load_inference_model
from seg.errors import ConfigError
from seg.export import export_checkpoint, read_onnx_metadata
from seg.instantiate import allow_targets
from seg.predict import Predictor, collect_inputs, run_prediction

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 96
NUM_TRAIN, NUM_VAL = 3, 2
TINY = [
    f"dataset.generator.height={H}",
    f"dataset.generator.width={W}",
    f"dataset.generator.num_train={NUM_TRAIN}",
    f"dataset.generator.num_val={NUM_VAL}",
    "loader.num_workers=0",
]
# The tiny net's module scope to keep float (BiSeNetV2's default, head.classifier, is absent).
TINY_SCOPES = "float_scopes=[classifier]"


@pytest.fixture(scope="module", autouse=True)
def admit_tiny_model() -> Iterator[None]:
    """Checkpoints build only seg's own classes; the tests' tiny net is admitted here."""
    with allow_targets("test_deploy.TinySegmenter"):
        yield


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthcity"
    params = {"height": H, "width": W, "num_train": NUM_TRAIN, "num_val": NUM_VAL, "num_test": 0}
    generate_synthcity(root, SynthCityParams.from_mapping(params))  # eval and export only read
    return root


@pytest.fixture(scope="module")
def checkpoint(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"dataset.root={synth_root}", *TINY])
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config["model"] = {"_target_": "test_deploy.TinySegmenter", "num_classes": 19}
    from test_deploy import TinySegmenter

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, {"model": TinySegmenter(19).state_dict(), "config": config})
    return path


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> Path:
    out = checkpoint.with_name("model.onnx")
    export_checkpoint(checkpoint, out)
    return out


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "tiny_export.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )


# ------------------------------------------------------------------ eval


def test_eval_onnx_matches_the_checkpoint_with_full_agreement(
    checkpoint: Path, exported: Path, synth_root: Path, tmp_path: Path, capsys
) -> None:
    # device=cpu: onnxruntime runs on the CPU, and CUDA's TF32 convolutions could flip a pixel.
    assert (
        main([f"ckpt={checkpoint}", f"out={tmp_path / 'pt'}", "progress=false", "device=cpu"]) == 0
    )
    args = [
        f"ckpt={exported}",
        "dataset=synthcity",
        f"dataset.root={synth_root}",
        *TINY,
        f"reference={checkpoint}",
        "onnx_threads=1",
        f"out={tmp_path / 'onnx'}",
        "progress=false",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"model: {exported} (fp32, 19 classes) on onnxruntime CPU, 1 intra-op" in printed
    assert f"argmax agreement with {checkpoint}: 100.00% of pixels" in printed
    from_pt = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    from_onnx = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert from_onnx["images"] == from_pt["images"] == NUM_VAL
    assert from_onnx["metrics"] == pytest.approx(from_pt["metrics"], abs=1e-9)
    assert from_onnx["argmax_agreement"] == 1.0
    assert from_onnx["onnxruntime"]["intra_op_threads"] == 1


def test_eval_onnx_errors_are_one_line(
    checkpoint: Path, exported: Path, synth_root: Path, tmp_path: Path, capsys
) -> None:
    assert main([f"ckpt={exported}", f"out={tmp_path}", "progress=false"]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"error: {exported} stores no dataset config: name one with dataset=NAME "
        "(a file of configs/dataset/, e.g. dataset=synthcity) and dataset.root=PATH\n"
    )
    assert main([f"ckpt={checkpoint}", "dataset=synthcity", "progress=false"]) == 2
    assert "dataset=NAME is for ONNX models" in capsys.readouterr().err
    # A 19-class model on a 3-class dataset config.
    args = [f"ckpt={exported}", "dataset=folder_example", f"dataset.root={tmp_path}"]
    assert main([*args, "progress=false"]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {exported} predicts 19 classes but dataset.num_classes is 3\n"
    )


# ------------------------------------------------------------------ predict


def test_predict_onnx_on_images_and_video_like_the_checkpoint(
    checkpoint: Path, exported: Path, tmp_path: Path, capsys
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        cv2.imwrite(str(images / f"{name}.png"), rng.integers(0, 256, (40, 64, 3), np.uint8))
    writer = cv2.VideoWriter(str(images / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 40))
    for _ in range(3):
        writer.write(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    writer.release()

    out = tmp_path / "out"
    summary = run_prediction(exported, images, out, onnx_threads=1, progress=False, num_workers=0)
    assert (summary.images, summary.videos, summary.frames) == (2, 1, 3)
    assert f"model: {exported} (fp32, 19 classes) on onnxruntime CPU, 1 intra-op" in (
        capsys.readouterr().out
    )
    assert (out / "overlays" / "clip.mp4").is_file()

    reference = Predictor(load_inference_model(checkpoint, "cpu"), progress=False)
    palette = np.asarray(read_onnx_metadata(exported)["palette"], dtype=np.uint8)
    for item in collect_inputs(images):
        if item.is_video:
            continue
        image = cv2.imread(str(item.path))[..., ::-1]
        expected = reference.predict([image])[0]
        labels = cv2.imread(str(out / "labels" / f"{item.name}.png"), cv2.IMREAD_UNCHANGED)
        assert (labels != expected).mean() <= 1e-3  # only near-ties may flip
        colors = cv2.imread(str(out / "colors" / f"{item.name}.png"))[..., ::-1]
        np.testing.assert_array_equal(colors, palette[labels])

    with pytest.raises(ConfigError, match="amp applies to checkpoints"):
        run_prediction(exported, images, out, amp="bf16", progress=False)


# ------------------------------------------------------------------ export quantize=int8


@pytest.mark.slow
def test_export_tool_writes_fp32_and_calibrated_int8(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = run_tool(
        f"ckpt={checkpoint}", f"out={out}", "quantize=int8", "calibration_images=2", TINY_SCOPES
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnxruntime vs PyTorch, input 2x3x200x300" in result.stdout
    assert f"wrote {tmp_path / 'm_int8.onnx'} (int8 QDQ" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m_int8.onnx"]
    stored = read_onnx_metadata(tmp_path / "m_int8.onnx")
    names = stored["calibration_images"]
    assert len(names) == 2 and names[0].startswith("anvil_")  # first and middle train images
    assert stored["calibration_source"].startswith("synthcity training split at ")
    assert stored["precision"] == "int8" and stored["num_classes"] == 19
    assert read_onnx_metadata(out).get("precision") is None  # the fp32 file is unchanged
    result = run_tool(f"ckpt={checkpoint}", f"out={out}", "quantize=fp16")
    assert (result.returncode, result.stderr) == (
        2,
        "error: quantize must be null or int8, got 'fp16'\n",
    )


def test_export_tool_calibration_set_too_small_is_one_line_and_writes_nothing(
    checkpoint: Path, synth_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    result = run_tool(f"ckpt={checkpoint}", f"out={out}", "quantize=int8", "calibration_images=50")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: calibration_images=50 but synthcity training split at {synth_root} has only "
        f"{NUM_TRAIN} image(s); ask for at most {NUM_TRAIN}\n"
    )
    assert not list(tmp_path.iterdir())

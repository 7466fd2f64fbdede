"""Published BiSeNetV2 weights: the CoinCheung/BiSeNet and mmsegmentation layouts, the
converter (``tools/convert_weights.py``), ``model.backbone_weights`` and the converted
checkpoint in eval, predict, export and fine-tuning.

Both fixtures (``tests/fixtures/coincheung_bisenetv2``, ``tests/fixtures/mmseg_bisenetv2``)
hold the outputs of the source project's own model under deterministic weights, which are
rebuilt here from the recipe in their READMEs.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from seg.checkpoint import load_checkpoint
from seg.errors import CheckpointError, ConfigError
from seg.models.bisenetv2 import BiSeNetV2
from seg.models.convert import convert_state_dict, map_key, module_table
from seg.models.published import MMSEG_NORMALISATION, convert_checkpoint
from seg.models.weights import load_into
from seg.predict import load_inference_model

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
COINCHEUNG = FIXTURES / "coincheung_bisenetv2"
MMSEG = FIXTURES / "mmseg_bisenetv2"
TOLERANCE = 1e-5
HEADS = ("main", "aux2", "aux3", "aux4", "aux5_4")
CITYSCAPES_MEAN, CITYSCAPES_STD = [0.3257, 0.3690, 0.3223], [0.2112, 0.2148, 0.2115]


# ------------------------------------------------------------------------------ helpers


def recipe_weights(entries: list, seed_base: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for ``[name, shape]`` entries, by the fixture README's recipe."""
    state = {}
    for index, (name, shape) in enumerate(entries):
        generator = torch.Generator().manual_seed(seed_base + index)
        if name.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif name.endswith("running_var"):
            value = torch.rand(shape, generator=generator) + 0.5
        elif name.endswith(("running_mean", ".bias")):
            value = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        state[name] = value
    return state


@pytest.fixture(scope="module")
def reference() -> dict:
    """The reference-format state dict, the input and the reference outputs."""
    meta = json.loads((COINCHEUNG / "keys.json").read_text())
    generator = torch.Generator().manual_seed(meta["seed_base"])
    with np.load(COINCHEUNG / "reference_outputs.npz") as npz:
        outputs = {key: npz[key] for key in npz.files}
    return {
        "state": recipe_weights(meta["keys"], meta["seed_base"]),
        "keys": meta["keys"],
        "input": torch.randn(meta["input_shape"], generator=generator),
        "outputs": outputs,
    }


def reference_mode_outputs(model: BiSeNetV2, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Eval-mode logits, and the five train-mode outputs with BatchNorm and dropout in
    eval mode (only the top module in training mode), as the fixture was made."""
    model.eval()
    with torch.no_grad():
        logits = model(images)
        model.training = True
        try:
            heads = model(images)
        finally:
            model.training = False
    return logits, heads


def on_grid(tensor: torch.Tensor, outputs: dict) -> np.ndarray:
    rows, cols = outputs["rows"], outputs["cols"]
    return tensor.numpy()[:, :, rows][:, :, :, cols]


def to_source_layout(state: dict, source_format: str) -> dict:
    """Our state dict in a source's names (the inverse of the converter's table)."""
    inverse = {ours: theirs for theirs, ours in module_table(source_format).items()}
    return {map_key(key, inverse): value for key, value in state.items()}


# ------------------------------------------------------------- CoinCheung, number for number


def test_coincheung_fixture_reproduced_number_for_number(reference: dict) -> None:
    wrapped = {f"module.{key}": value for key, value in reference["state"].items()}
    conversion = convert_state_dict(wrapped, "auto", "fixture")
    assert conversion.source_format == "coincheung" and conversion.dropped == []
    assert len(conversion.mapped) == len(reference["keys"]) == 383
    settings = conversion.model_settings()
    assert settings == {
        "num_classes": 19,
        "aux_heads": True,
        "bga_upsample": "nearest",
        "bga_pointwise_bias": False,
    }
    model = BiSeNetV2(**settings)
    report = load_into(model, conversion.state, "fixture", strict=True)
    assert report.fits and len(report.loaded) == 383
    logits, heads = reference_mode_outputs(model, reference["input"])
    expected = reference["outputs"]
    assert logits.shape == (1, 19, 64, 128)
    assert np.abs(on_grid(logits, expected) - expected["main"]).max() < TOLERANCE
    for name in HEADS:
        assert heads[name].shape == (1, 19, 64, 128)
        assert np.abs(on_grid(heads[name], expected) - expected[name]).max() < TOLERANCE, name
    # Every pixel: the argmax, and the per-class sums (8192 pixels, each within TOLERANCE).
    assert np.array_equal(logits.argmax(1).numpy(), expected["main_argmax"])
    sums = logits.double().sum(dim=(0, 2, 3)).numpy()
    assert np.abs(sums - expected["main_sum"]).max() < 64 * 128 * TOLERANCE


def test_bilinear_bga_does_not_reproduce_the_reference(reference: dict) -> None:
    conversion = convert_state_dict(reference["state"])
    model = BiSeNetV2(19)  # bga_upsample="bilinear", the default
    load_into(model, conversion.state, "fixture")
    logits, heads = reference_mode_outputs(model, reference["input"])
    expected = reference["outputs"]
    assert np.abs(on_grid(logits, expected) - expected["main"]).max() > 1e-2
    # The auxiliary heads do not pass the BGA layer: they agree either way.
    assert np.abs(on_grid(heads["aux3"], expected) - expected["aux3"]).max() < TOLERANCE


def test_coincheung_table_covers_our_model_exactly(reference: dict) -> None:
    conversion = convert_state_dict(reference["state"], "coincheung")
    ours = BiSeNetV2(19, bga_upsample="nearest").state_dict()
    assert sorted(conversion.state) == sorted(ours)
    for key, value in conversion.state.items():
        assert value.shape == ours[key].shape, key
    # The stride-2 GE layers: position in the file is not position in our model.
    pairs = dict(conversion.mapped)
    assert pairs["segment.S3.0.shortcut.2.weight"] == "semantic.s3.0.shortcut.1.conv.weight"
    assert pairs["segment.S3.0.conv2.0.weight"] == "semantic.s3.0.project.conv.weight"
    assert pairs["aux5_4.conv_out.0.1.conv.weight"] == "aux_heads.aux5_4.refine.1.conv.weight"


def test_coincheung_file_without_aux_heads(reference: dict) -> None:
    eval_only = {k: v for k, v in reference["state"].items() if not k.startswith("aux")}
    conversion = convert_state_dict(eval_only)
    assert conversion.aux_heads is False and conversion.num_classes == 19
    deploy = BiSeNetV2(**conversion.model_settings())
    assert deploy.aux_heads is None
    assert load_into(deploy, conversion.state, "eval_only").fits
    logits, _ = reference_mode_outputs(deploy, reference["input"])
    assert (
        np.abs(on_grid(logits, reference["outputs"]) - reference["outputs"]["main"]).max()
        < TOLERANCE
    )


def test_backbone_file_round_trip(reference: dict, tmp_path: Path) -> None:
    """backbone_v2.pth layout: {"detail": ..., "segment": ...} in the reference's names."""
    state = reference["state"]
    backbone = {
        branch: {k[len(branch) + 1 :]: v for k, v in state.items() if k.startswith(f"{branch}.")}
        for branch in ("detail", "segment")
    }
    path = tmp_path / "backbone_v2.pth"
    torch.save(backbone, path, _use_new_zipfile_serialization=False)  # as old releases are
    full = convert_state_dict(state).state
    torch.manual_seed(5)
    net = BiSeNetV2(19, backbone_weights=str(path))
    loaded = net.state_dict()
    branch_keys = [k for k in loaded if k.startswith(("detail.", "semantic."))]
    assert len(branch_keys) == sum(len(b) for b in backbone.values())
    assert all(torch.equal(loaded[k], full[k]) for k in branch_keys)
    assert not torch.equal(loaded["head.conv.conv.weight"], full["head.conv.conv.weight"])
    # Exposed in the model config, strict by default.
    overrides = [f"model.backbone_weights={path}", "dataset=cityscapes"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    from_config = instantiate(cfg.model)
    assert torch.equal(
        from_config.semantic.s5_5.conv_last.conv.weight, full["semantic.s5_5.conv_last.conv.weight"]
    )
    del backbone["segment"]["S5_5.conv_last.conv.weight"]
    torch.save(backbone, path)
    with pytest.raises(
        CheckpointError, match=r"1 missing keys \(semantic\.s5_5\.conv_last\.conv\.weight\)"
    ):
        BiSeNetV2(19, backbone_weights=str(path))
    BiSeNetV2(19, backbone_weights=str(path), weights_strict=False)  # loads the rest


# --------------------------------------------------------------------------- mmsegmentation


@pytest.fixture(scope="module")
def mmseg() -> dict:
    meta = json.loads((MMSEG / "keys.json").read_text())
    generator = torch.Generator().manual_seed(meta["seed_base"])
    with np.load(MMSEG / "reference_outputs.npz") as npz:
        outputs = {key: npz[key] for key in npz.files}
    return {
        "state": recipe_weights(meta["keys"], meta["seed_base"]),
        "input": torch.randn(meta["input_shape"], generator=generator),
        "outputs": outputs,
    }


def test_mmseg_fixture_reproduced_number_for_number(mmseg: dict) -> None:
    state = mmseg["state"]
    conversion = convert_state_dict({f"module.{k}": v for k, v in state.items()}, "auto")
    assert conversion.source_format == "mmseg"
    dropped = [key for key, _ in conversion.dropped]
    assert dropped == [k for k in state if k.startswith("auxiliary_head.")]
    assert len(dropped) == 4 * (2 * 6 + 2)  # four FCN heads: two ConvModules and conv_seg
    assert len(conversion.mapped) + len(dropped) == len(state) == 385
    settings = conversion.model_settings()
    assert settings == {
        "num_classes": 19,
        "aux_heads": False,
        "bga_upsample": "bilinear",
        "bga_pointwise_bias": True,
    }
    model = BiSeNetV2(**settings)
    assert load_into(model, conversion.state, "mmseg", strict=True).fits
    logits, _ = reference_mode_outputs(model, mmseg["input"])
    expected = mmseg["outputs"]
    assert np.abs(on_grid(logits, expected) - expected["main"]).max() < TOLERANCE
    assert np.array_equal(logits.argmax(1).numpy(), expected["main_argmax"])
    sums = logits.double().sum(dim=(0, 2, 3)).numpy()
    assert np.abs(sums - expected["main_sum"]).max() < 64 * 128 * TOLERANCE
    # Without the two BGA biases, or with nearest upsampling, the logits differ.
    for other in ({"bga_upsample": "nearest"}, {"bga_pointwise_bias": False}):
        variant = BiSeNetV2(**{**settings, **other})
        load_into(variant, conversion.state, "mmseg", strict=False)
        changed, _ = reference_mode_outputs(variant, mmseg["input"])
        assert np.abs(on_grid(changed, expected) - expected["main"]).max() > 1e-2, other


def test_mmseg_keys_map_one_to_one_onto_our_deployment_model(mmseg: dict) -> None:
    conversion = convert_state_dict(mmseg["state"], "mmseg")
    settings = conversion.model_settings()
    ours = BiSeNetV2(**settings).state_dict()
    assert sorted(conversion.state) == sorted(ours)
    assert all(conversion.state[k].shape == ours[k].shape for k in ours)
    pairs = dict(conversion.mapped)
    assert (
        pairs["backbone.bga.semantic_dwconv.0.pointwise_conv.conv.bias"]
        == "bga.semantic_keep.1.bias"
    )
    assert (
        pairs["backbone.semantic.stage4_CEBlock.gap.1.running_var"]
        == "semantic.s5_5.bn.running_var"
    )
    assert pairs["decode_head.conv_seg.weight"] == "head.classifier.weight"
    assert pairs["backbone.semantic.stage2.0.shortcut.0.pointwise_conv.bn.weight"] == (
        "semantic.s3.0.shortcut.1.bn.weight"
    )


def test_mmseg_checkpoint_stores_its_normalisation(mmseg: dict, tmp_path: Path) -> None:
    src = tmp_path / "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes.pth"
    meta = {"CLASSES": ("road",), "iter": 160000}
    torch.save({"meta": meta, "state_dict": mmseg["state"]}, src)
    summary = convert_checkpoint(src, tmp_path / "mmseg.pt")
    config = load_checkpoint(tmp_path / "mmseg.pt")["config"]
    assert config["dataset"]["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-12)
    assert config["dataset"]["std"] == pytest.approx([0.229, 0.224, 0.225], abs=1e-12)
    assert config["dataset"]["mean"] == list(MMSEG_NORMALISATION[0])
    assert config["eval"]["mean"] == config["dataset"]["mean"]
    assert config["model"]["bga_upsample"] == "bilinear" and config["model"]["aux_heads"] is False
    assert config["source"]["tensors_dropped"] == 56
    assert "dropped 56 tensors: mmsegmentation's auxiliary FCN heads" in summary.describe()


# ---------------------------------------------------------------- the converted checkpoint


@pytest.fixture(scope="module")
def converted(reference: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    src = folder / "model_final_v2_city.pth"
    torch.save({f"module.{k}": v for k, v in reference["state"].items()}, src)
    out = folder / "coincheung_city.pt"
    convert_checkpoint(src, out)
    return out


def test_converted_checkpoint_contents(converted: Path, reference: dict) -> None:
    checkpoint = load_checkpoint(converted)
    config = checkpoint["config"]
    assert set(config) == {"model", "dataset", "eval", "loader", "source"}
    assert config["model"]["_target_"] == "seg.models.bisenetv2.BiSeNetV2"
    assert config["model"]["num_classes"] == 19 and config["model"]["bga_upsample"] == "nearest"
    assert config["model"]["weights"] is None and config["model"]["backbone_weights"] is None
    dataset = config["dataset"]
    assert dataset["name"] == "cityscapes" and dataset["num_classes"] == 19
    assert dataset["mean"] == CITYSCAPES_MEAN and dataset["std"] == CITYSCAPES_STD
    assert dataset["class_names"][0] == "road" and dataset["palette"][0] == [128, 64, 128]
    assert dataset["val"]["_target_"] == "seg.data.cityscapes.CityscapesDataset"
    assert config["eval"]["_target_"] == "seg.engine.evaluator.Evaluator"
    assert config["eval"]["mode"] == "whole" and config["eval"]["mean"] == CITYSCAPES_MEAN
    assert config["source"]["format"] == "coincheung" and config["source"]["tensors_mapped"] == 383
    # Predict and export load it as they are, with the reference's outputs.
    net = load_inference_model(converted, device="cpu")
    assert net.mean == CITYSCAPES_MEAN and net.class_names[-1] == "bicycle"
    with torch.no_grad():
        logits = net.model(reference["input"])
    assert (
        np.abs(on_grid(logits, reference["outputs"]) - reference["outputs"]["main"]).max()
        < TOLERANCE
    )


def test_model_weights_fine_tunes_from_the_converted_checkpoint(
    converted: Path, reference: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="seg.models.weights"):
        model = BiSeNetV2(19, weights=str(converted), bga_upsample="nearest")  # strict
        assert caplog.records == []
        BiSeNetV2(19, weights=str(converted))  # the default bilinear BGA: loads, and warns
    (record,) = caplog.records
    assert "bga_upsample='nearest', this model has bga_upsample='bilinear'" in record.message
    _, heads = reference_mode_outputs(model, reference["input"])
    assert (
        np.abs(on_grid(heads["aux4"], reference["outputs"]) - reference["outputs"]["aux4"]).max()
        < TOLERANCE
    )
    # Another class count (fine-tuning on another dataset): strict, the five heads'
    # classifiers re-initialised, everything else from the converted file.
    seven = BiSeNetV2(7, weights=str(converted), bga_upsample="nearest")
    assert seven.head.classifier.weight.shape[0] == 7
    assert torch.equal(
        seven.head.conv.conv.weight, load_checkpoint(converted)["model"]["head.conv.conv.weight"]
    )


def test_another_class_count_follows_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ade = to_source_layout(BiSeNetV2(150, bga_upsample="nearest").state_dict(), "coincheung")
    src = tmp_path / "model_final_v2_ade20k.pth"
    torch.save(ade, src)
    convert_checkpoint(src, tmp_path / "ade.pt")
    config = load_checkpoint(tmp_path / "ade.pt")["config"]
    assert config["model"]["num_classes"] == 150 and config["dataset"]["num_classes"] == 150
    assert config["dataset"]["name"] == "ade20k" and len(config["dataset"]["class_names"]) == 150
    assert config["dataset"]["mean"] == [0.4934323, 0.46819794, 0.43106043]
    assert config["dataset"]["val"]["_target_"] == "seg.data.folder.FolderDataset"
    assert (
        config["dataset"]["id_to_trainid"][0] == 255
        and config["dataset"]["id_to_trainid"][150] == 149
    )
    net = load_inference_model(tmp_path / "ade.pt")
    assert net.num_classes == 150 and len(net.palette) == 150
    # A class count whose normalisation is unknown needs it given.
    torch.save(to_source_layout(BiSeNetV2(5).state_dict(), "coincheung"), src)
    with pytest.raises(ConfigError, match="pass mean=\\[r,g,b\\] std=\\[r,g,b\\]"):
        convert_checkpoint(src, tmp_path / "five.pt")
    convert_checkpoint(
        src,
        tmp_path / "five.pt",
        mean=[0.4, 0.4, 0.4],
        std=[0.2, 0.2, 0.2],
        class_names=list("abcde"),
    )
    assert load_checkpoint(tmp_path / "five.pt")["config"]["dataset"]["class_names"] == list(
        "abcde"
    )
    with pytest.raises(ConfigError, match="dataset_config=cityscapes has 19 classes"):
        convert_checkpoint(
            src, tmp_path / "x.pt", dataset_config="cityscapes", mean=[0.4] * 3, std=[0.2] * 3
        )


# ------------------------------------------------------------------------------ bad input


class _MarkerOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_sources(tmp_path: Path, reference: dict) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the one-line error must contain)."""
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": _MarkerOnUnpickle(tmp_path / "pwned")}, hostile)
    resnet = tmp_path / "resnet18.pth"
    torch.save(
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, resnet
    )
    truncated = tmp_path / "cut.pth"
    torch.save(reference["state"], truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    half = tmp_path / "half_bisenet.pth"
    torch.save({**reference["state"], "extra.layer.weight": torch.zeros(2)}, half)
    return {
        "not_a_checkpoint": (text, "not a PyTorch checkpoint"),
        "hostile": (hostile, "refused to load"),
        "other_architecture": (resnet, "not a known BiSeNetV2 state dict"),
        "truncated": (truncated, "truncated or corrupt"),
        "unknown_key": (
            half,
            "1 of 384 keys match no layer of a coincheung BiSeNetV2 (first: extra.layer.weight)",
        ),
    }


@pytest.mark.parametrize(
    "case", ["not_a_checkpoint", "hostile", "other_architecture", "truncated", "unknown_key"]
)
def test_bad_sources_are_one_line_and_write_nothing(
    tmp_path: Path, reference: dict, case: str
) -> None:
    src, expected = _bad_sources(tmp_path, reference)[case]
    out = tmp_path / "out" / "converted.pt"
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(src, out)
    assert "\n" not in str(error.value) and str(src) in str(error.value)
    assert expected in str(error.value)
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_wrong_format_and_unwritable_out(tmp_path: Path, reference: dict) -> None:
    src = tmp_path / "model.pth"
    torch.save(reference["state"], src)
    with pytest.raises(
        CheckpointError, match="383 of 383 keys match no layer of a mmseg BiSeNetV2"
    ):
        convert_checkpoint(src, tmp_path / "a.pt", source_format="mmseg")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=f"cannot save checkpoint {blocker}/sub/out.pt"):
        convert_checkpoint(src, blocker / "sub" / "out.pt")
    with pytest.raises(ConfigError, match="is the source file itself"):
        convert_checkpoint(src, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "model.pth"]


def run_tool(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, reference: dict) -> None:
    sources = _bad_sources(tmp_path, reference)
    src, _ = sources["hostile"]
    result = run_tool("convert_weights.py", f"src={src}", "out=out.pt", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: refused to load") and str(src) in line
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "pwned").exists()
    result = run_tool("convert_weights.py", "out=out.pt", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: src=... is required")
    result = run_tool(
        "convert_weights.py", f"src={src}", "out=out.pt", "formta=mmseg", cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: Could not override 'formta'")  # the tools' one error edge


@pytest.mark.slow
def test_cli_convert_then_eval_predict_export(
    reference: dict, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The converted checkpoint through the three tools as they are, in subprocesses."""
    from seg.data.synthcity import SynthCityParams, generate_synthcity

    data = tmp_path_factory.mktemp("data") / "synthcity"  # Cityscapes layout and label ids
    generate_synthcity(
        data, SynthCityParams(height=64, width=128, num_train=1, num_val=2, num_test=0)
    )
    src = tmp_path / "model_final_v2_city.pth"
    torch.save(reference["state"], src, _use_new_zipfile_serialization=False)
    result = run_tool("convert_weights.py", f"src={src}", "out=weights/city.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "converted 383 tensors" in result.stdout and "bga_upsample=nearest" in result.stdout
    ckpt = tmp_path / "weights" / "city.pt"

    result = run_tool(
        "eval.py", f"ckpt={ckpt}", f"dataset.root={data}", "out=eval", "progress=false",
        "loader.num_workers=0", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 2 and report["dataset"] == "cityscapes"
    assert len(report["per_class"]) == 19 and 0.0 <= report["metrics"]["mIoU"] <= 1.0

    image = next((data / "leftImg8bit" / "val").glob("*/*.png"))
    result = run_tool(
        "predict.py", f"ckpt={ckpt}", f"input={image}", "out=pred", "num_workers=0",
        "progress=false", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pred" / "labels" / f"{image.stem}.png").is_file()

    result = run_tool("export.py", f"ckpt={ckpt}", "out=model.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max |diff|" in result.stdout and (tmp_path / "model.onnx").is_file()

    help_dir = tmp_path / "help"
    help_dir.mkdir()
    result = run_tool("convert_weights.py", "--help", cwd=help_dir)
    assert result.returncode == 0 and "dataset_config" in result.stdout
    assert not list(help_dir.iterdir())  # --help writes nothing


@pytest.mark.slow
def test_fine_tuning_starts_from_the_converted_weights(converted: Path, tmp_path: Path) -> None:
    from seg.engine.train_run import run

    overrides = [
        f"dataset.root={tmp_path / 'synthcity'}",
        "dataset.generator.height=64",
        "dataset.generator.width=128",
        "dataset.generator.num_train=4",
        "dataset.generator.num_val=2",
        "dataset.crop_size=[64,128]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "trainer.max_iters=2",
        "trainer.log_interval=1",
        "optim.lr=0.001",
        f"model.weights={converted}",
        "model.bga_upsample=nearest",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run(cfg, run_dir=tmp_path / "run")
    start = load_checkpoint(converted)["model"]["detail.s1.0.conv.weight"]
    tuned = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    moved = (tuned["detail.s1.0.conv.weight"] - start).norm() / start.norm()
    assert 0.0 < moved < 0.05  # two small steps away from the converted weights

"""ONNX deployment: the onnxruntime model wrapper and static int8 quantization.

A tiny conv net (conv-BN-ReLU, 1x1 classifier, bilinear upsampling: the shape of
BiSeNetV2's head) is exported once per module with the project's exporter; BiSeNetV2
itself is exercised by the slow benchmark test.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from seg.deploy.quantize import CalibrationSet, pick_calibration_images, quantize_int8
from seg.engine.evaluator import Evaluator
from seg.engine.inference import predict_probs
from seg.errors import CheckpointError, ConfigError, DatasetError
from seg.export import export_onnx, read_onnx_metadata
from seg.models.onnx_model import OnnxModel, parse_metadata

NUM_CLASSES = 4
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
NAMES = ["road", "car", "sky", "tree"]
PALETTE = [[128, 64, 128], [0, 0, 142], [70, 130, 180], [107, 142, 35]]


class TinySegmenter(nn.Module):
    """images N x 3 x H x W -> logits N x C x H x W (stride-2 features, upsampled back)."""

    def __init__(self, num_classes: int = NUM_CLASSES, **_: object) -> None:  # aux_heads=False
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def metadata(**changes: object) -> dict[str, str]:
    values: dict[str, object] = {
        "mean": MEAN,
        "std": STD,
        "class_names": NAMES,
        "palette": PALETTE,
        "num_classes": NUM_CLASSES,
    }
    values.update(changes)
    return {k: json.dumps(v) for k, v in values.items()}


class ImageList:
    """A dataset in the data contract: uint8 H x W x 3 images with names."""

    def __init__(self, count: int, size: tuple[int, int] = (32, 48)) -> None:
        generator = torch.Generator().manual_seed(7)
        self.items = [
            {
                "image": torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator),
                "name": f"img_{i:02d}",
            }
            for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self.items[index]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinySegmenter]:
    torch.manual_seed(0)
    model = TinySegmenter()
    with torch.no_grad():  # non-trivial BN statistics, so that folding them is tested
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, path, metadata=metadata())
    return path, model


@pytest.fixture(scope="module")
def quantized(
    exported: tuple[Path, TinySegmenter], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, object]:
    path, _ = exported
    calibration = pick_calibration_images(ImageList(6), 3, "six test images")
    out = tmp_path_factory.mktemp("int8") / "tiny_int8.onnx"
    summary = quantize_int8(path, out, calibration, float_scopes=["classifier"])
    return out, summary


def write_identity_model(path: Path, props: dict[str, str], input_name: str = "images") -> Path:
    """A valid one-node ONNX model (Identity) with the given metadata."""
    value = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 3, "h", "w"])
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "h", "w"])
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["logits"])], "g", [value], [output]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------ the model wrapper


def test_onnx_model_matches_pytorch_and_reads_metadata(
    exported: tuple[Path, TinySegmenter],
) -> None:
    path, model = exported
    net = OnnxModel(path, threads=1)
    assert net.metadata.mean == MEAN and net.metadata.std == STD
    assert net.metadata.class_names == NAMES and net.metadata.palette == PALETTE
    assert net.num_classes == NUM_CLASSES and net.precision == "fp32"
    assert net.session.get_session_options().intra_op_num_threads == 1
    assert net.runtime_settings()["intra_op_threads"] == 1
    generator = torch.Generator().manual_seed(3)
    for shape in ((1, 3, 64, 96), (2, 3, 37, 53)):
        images = torch.randn(shape, generator=generator)
        with torch.inference_mode():
            expected, got = model(images), net(images)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert got.shape == (shape[0], NUM_CLASSES, *shape[2:])
        assert (got - expected).abs().max().item() <= 1e-4


def test_evaluator_runs_the_onnx_model_like_the_pytorch_model(
    exported: tuple[Path, TinySegmenter],
) -> None:
    """The evaluator's own path (padding, multi-scale, flip, argmax, confusion matrix)."""
    path, model = exported
    net = OnnxModel(path)
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 40, 60, generator=generator)
    with torch.inference_mode():
        expected = predict_probs(model, images, scales=(0.75, 1.0), flip=True)
        got = predict_probs(net, images, scales=(0.75, 1.0), flip=True)
    assert (got - expected).abs().max().item() <= 1e-5
    batches = [
        {
            "image": torch.randint(0, 256, (2, 40, 60, 3), dtype=torch.uint8, generator=generator),
            "label": torch.randint(0, NUM_CLASSES, (2, 40, 60), dtype=torch.uint8),
        }
        for _ in range(2)
    ]
    evaluator = Evaluator(NUM_CLASSES, mean=MEAN, std=STD)
    reference = evaluator.evaluate(model, batches, "cpu", progress=False)
    onnx_metrics = evaluator.evaluate(net, batches, "cpu", progress=False)
    assert onnx_metrics["mIoU"] == pytest.approx(reference["mIoU"], abs=1e-6)
    assert onnx_metrics["IoU"] == pytest.approx(reference["IoU"], abs=1e-6, nan_ok=True)


def test_file_without_metadata_is_one_line(tmp_path: Path) -> None:
    path = write_identity_model(tmp_path / "other.onnx", {"producer": "someone"})
    with pytest.raises(CheckpointError) as caught:
        OnnxModel(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "not an ONNX model exported by seg" in message
    assert "lacks mean, std, class_names, palette, num_classes" in message


def test_wrong_input_name_is_one_line(tmp_path: Path) -> None:
    path = write_identity_model(tmp_path / "x.onnx", metadata(), input_name="input")
    with pytest.raises(CheckpointError, match=r"x\.onnx: not an ONNX model exported by seg"):
        OnnxModel(path)


def test_corrupt_truncated_and_missing_files_are_one_line(
    tmp_path: Path, exported: tuple[Path, TinySegmenter]
) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    truncated = tmp_path / "truncated.onnx"
    data = exported[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, truncated):
        with pytest.raises(CheckpointError) as caught:
            OnnxModel(path)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: not a readable ONNX model (")
    with pytest.raises(CheckpointError, match=r"ONNX model not found: .*absent\.onnx"):
        OnnxModel(tmp_path / "absent.onnx")
    with pytest.raises(CheckpointError, match=r"truncated\.onnx: not a readable ONNX model"):
        quantize_int8(truncated, tmp_path / "q.onnx", CalibrationSet(["a"], [torch.zeros(8, 8, 3)]))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"std": [0.2, 0.0, 0.3]}, "metadata mean/std must be 3 numbers"),
        ({"mean": [0.4, 0.5]}, "metadata mean/std must be 3 numbers"),
        ({"num_classes": 0}, "metadata num_classes must lie in 1..255, got 0"),
        ({"class_names": ["a", "b"]}, "metadata class_names must list 4 names"),
        ({"palette": PALETTE[:3]}, "metadata palette must hold 4 RGB triples"),
        ({"palette": [[0, 0, 300]] * 4}, "metadata palette must hold 4 RGB triples"),
    ],
)
def test_bad_metadata_values_name_the_key(changes: dict[str, object], match: str) -> None:
    with pytest.raises(CheckpointError, match=rf"^m\.onnx: {match}"):
        parse_metadata(metadata(**changes), "m.onnx")


def test_metadata_that_is_not_json_names_the_key() -> None:
    raw = metadata()
    raw["palette"] = "[[1, 2, 3"
    with pytest.raises(CheckpointError, match=r"m\.onnx: metadata 'palette' is not valid JSON"):
        parse_metadata(raw, "m.onnx")


def test_threads_must_be_positive(exported: tuple[Path, TinySegmenter]) -> None:
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        OnnxModel(exported[0], threads=0)


# ------------------------------------------------------------------ quantization


def test_quantized_model_is_qdq_int8_with_calibration_metadata(
    exported: tuple[Path, TinySegmenter], quantized: tuple[Path, object]
) -> None:
    path, model = exported
    out, summary = quantized
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 2
    int8_weights = [
        t.name
        for t in proto.graph.initializer
        if t.data_type == TensorProto.INT8 and len(t.dims) == 4  # not the zero points
    ]
    # Both feature convs are int8 with one scale per output channel; the classifier is float.
    assert len(int8_weights) == 2
    scales = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in int8_weights:
            assert list(scales[node.input[1]].dims) == [16]
    classifier = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in scales)
    assert scales[classifier.input[1]].data_type == TensorProto.FLOAT
    assert (summary.conv_int8, summary.conv_float) == (2, 1)
    assert summary.float_nodes == {"classifier": [classifier.name]}

    stored = read_onnx_metadata(out)
    assert stored["mean"] == MEAN and stored["palette"] == PALETTE
    assert stored["precision"] == "int8"
    assert stored["calibration_images"] == ["img_00", "img_02", "img_04"]  # evenly spread
    assert stored["calibration_source"] == "six test images"
    assert stored["quantization"]["weights"] == "int8 per-channel"
    assert stored["quantization"]["float_scopes"] == ["classifier"]
    assert stored["source_model"] == path.name

    net = OnnxModel(out)
    assert net.precision == "int8"
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(1, 3, 48, 64, generator=generator)
    with torch.inference_mode():
        expected, got = model(images), net(images)
    error = (got - expected).abs().mean().item()
    assert 0 < error < 0.1 * expected.abs().mean().item()  # int8 rounding, not a broken graph


def test_calibration_set_smaller_than_asked_is_one_line() -> None:
    with pytest.raises(DatasetError) as caught:
        pick_calibration_images(ImageList(6), 10, "synthcity train split at data/synthcity")
    assert str(caught.value) == (
        "calibration_images=10 but synthcity train split at data/synthcity has only 6 "
        "image(s); ask for at most 6"
    )
    with pytest.raises(ConfigError, match="calibration_images must be a positive integer"):
        pick_calibration_images(ImageList(6), 0, "six images")


def test_quantize_refuses_unknown_scopes_and_int8_input(
    exported: tuple[Path, TinySegmenter], quantized: tuple[Path, object], tmp_path: Path
) -> None:
    calibration = pick_calibration_images(ImageList(2), 2, "two images")
    with pytest.raises(ConfigError, match=r"float_scopes \['head'\] match no node"):
        quantize_int8(exported[0], tmp_path / "a.onnx", calibration, float_scopes=["head"])
    with pytest.raises(ConfigError, match="is already quantized"):
        quantize_int8(quantized[0], tmp_path / "b.onnx", calibration)
    with pytest.raises(ConfigError, match="calibration method must be one of"):
        quantize_int8(exported[0], tmp_path / "c.onnx", calibration, method="mse")
    assert not list(tmp_path.iterdir())  # nothing half-written

"""ONNX export: dynamic sizes, parity with PyTorch in onnxruntime, metadata, missing extra."""

from __future__ import annotations

import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from seg.checkpoint import load_checkpoint, save_checkpoint
from seg.errors import ConfigError
from seg.export import (
    ExportError,
    check_onnx,
    export_checkpoint,
    export_onnx,
    read_onnx_metadata,
)
from seg.extras import DeployDependencyError, require_deploy
from seg.models.bisenetv2 import BiSeNetV2

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 19
MEAN, STD = [0.3257, 0.3690, 0.3223], [0.2112, 0.2148, 0.2115]
# Two sizes, one needing the model's internal padding to a multiple of 32 (odd sides).
SIZES = ((1, 64, 128), (2, 101, 157))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BiSeNetV2]:
    """A checkpoint of a random BiSeNetV2 (19 classes, aux heads, non-trivial BN stats)."""
    torch.manual_seed(0)
    model = BiSeNetV2(NUM_CLASSES, aux_heads=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(1.0, 1.2, generator=generator)
    config = {
        "dataset": {
            "num_classes": NUM_CLASSES,
            "ignore_index": 255,
            "class_names": [f"class{i}" for i in range(NUM_CLASSES)],
            "palette": [[i, 2 * i, 3 * i] for i in range(NUM_CLASSES)],
            "mean": MEAN,
            "std": STD,
        },
        "model": {"_target_": "seg.models.bisenetv2.BiSeNetV2", "num_classes": NUM_CLASSES},
    }
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "iteration": 1})
    return path, model.eval()


def deploy_twin(model: BiSeNetV2) -> BiSeNetV2:
    """The checkpoint's model without aux heads, loaded independently of seg.predict."""
    twin = BiSeNetV2(NUM_CLASSES, aux_heads=False)
    twin.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("aux_heads.")}
    )
    return twin.eval()


def onnxruntime_parity(path: Path, model: torch.nn.Module) -> list[float]:
    """Max |logit diff| per size, run here with onnxruntime directly (not via seg.export)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(123)
    diffs = []
    for n, h, w in SIZES:
        images = torch.randn((n, 3, h, w), generator=generator)
        with torch.no_grad():
            expected = model(images)
        outputs = dict(zip(names, session.run(None, {"images": images.numpy()}), strict=True))
        assert outputs["logits"].shape == (n, NUM_CLASSES, h, w)
        if "labels" in outputs:
            assert outputs["labels"].shape == (n, h, w)
            np.testing.assert_array_equal(outputs["labels"], outputs["logits"].argmax(1))
        diffs.append(float(np.abs(outputs["logits"] - expected.numpy()).max()))
    return diffs


def shape_names(value_info: onnx.ValueInfoProto) -> list[str]:
    return [d.dim_param or str(d.dim_value) for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.slow
def test_export_tool_with_argmax(tmp_path: Path, trained: tuple[Path, BiSeNetV2]) -> None:
    ckpt, model = trained
    out = tmp_path / "model.onnx"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export.py"),
            f"ckpt={ckpt}",
            f"out={out}",
            "argmax=true",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnxruntime vs PyTorch, input 2x3x200x300" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no litter
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == ["logits", "labels"]
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert shape_names(proto.graph.input[0]) == ["batch", "3", "height", "width"]
    assert shape_names(proto.graph.output[0]) == ["batch", str(NUM_CLASSES), "height", "width"]
    assert shape_names(proto.graph.output[1]) == ["batch", "height", "width"]
    metadata = read_onnx_metadata(out)
    assert metadata["mean"] == MEAN and metadata["std"] == STD
    assert metadata["class_names"][3] == "class3" and metadata["palette"][2] == [2, 4, 6]
    assert max(onnxruntime_parity(out, deploy_twin(model))) <= 1e-4


@pytest.mark.slow
def test_export_logits_only_and_check_catches_mismatch(
    tmp_path: Path, trained: tuple[Path, BiSeNetV2]
) -> None:
    ckpt, model = trained
    out = tmp_path / "logits.onnx"
    stale = tmp_path / ".logits.onnx.somehost-1-0123abcd.partial"  # left by a killed export
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    # optimize=False: half the export time; the tool test covers the optimised graph.
    summary = export_checkpoint(ckpt, out, argmax=False, sizes=SIZES, optimize=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.onnx"]  # no litter, old or new
    assert [r.shape for r in summary.parity] == [(1, 3, 64, 128), (2, 3, 101, 157)]
    assert all(r.max_abs_diff <= 1e-4 and r.label_mismatches is None for r in summary.parity)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["logits"]
    twin = deploy_twin(model)
    assert max(onnxruntime_parity(out, twin)) <= 1e-4

    # The check must fail for a model whose weights differ from the exported ones.
    with torch.no_grad():
        twin.head.classifier.bias.add_(1e-3)
    with pytest.raises(ExportError, match=r"max \|diff\| 0\.001"):
        check_onnx(twin, out, sizes=SIZES[:1], tolerance=1e-4)


def test_export_rejects_old_opset(trained: tuple[Path, BiSeNetV2], tmp_path: Path) -> None:
    _, model = trained
    with pytest.raises(ConfigError, match="opset must be >= 18"):
        export_onnx(deploy_twin(model), tmp_path / "m.onnx", opset=16)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"opset": "abc"}, "opset must be an integer, got 'abc'"),
        ({"opset": 18.5}, "opset must be a whole number, got 18.5"),
        ({"opset": 17}, "opset must be >= 18"),
        ({"argmax": "abc"}, "argmax must be true or false, got 'abc'"),
        ({"check": "yes"}, "check must be true or false, got 'yes'"),
        ({"tolerance": "abc"}, "tolerance must be a positive number, got 'abc'"),
    ],
)
def test_export_settings_of_the_wrong_type_are_one_line(
    trained: tuple[Path, BiSeNetV2], tmp_path: Path, settings: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        export_checkpoint(trained[0], tmp_path / "m.onnx", **settings)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_export_refuses_a_planted_target_before_building_anything(
    trained: tuple[Path, BiSeNetV2], tmp_path: Path
) -> None:
    checkpoint = load_checkpoint(trained[0])
    marker = tmp_path / "code_ran"
    planted = {"_target_": "seg.fileio.write_text_atomic", "path": str(marker), "text": "x"}
    checkpoint["config"]["model"]["backbone"] = {"stem": planted}
    save_checkpoint(tmp_path / "evil.pt", checkpoint)
    expected = "model.backbone.stem._target_='seg.fileio.write_text_atomic' is not one of"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        export_checkpoint(tmp_path / "evil.pt", tmp_path / "m.onnx")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_missing_deploy_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, trained: tuple[Path, BiSeNetV2], tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def without_onnxruntime(name: str, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    expected = (
        r"needs the 'deploy' extra \(onnxruntime is not installed\): pip install -e '\.\[deploy\]'"
    )
    with pytest.raises(DeployDependencyError, match=expected):
        require_deploy()
    ckpt, _ = trained
    with pytest.raises(DeployDependencyError, match=expected):
        export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()

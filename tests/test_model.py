"""BiSeNetV2: architecture figures, output contract, any input size, formats, export, weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from seg.errors import CheckpointError, ConfigError
from seg.models.bisenetv2 import AUX_HEADS, BiSeNetV2, GatherExpand, pad_to_multiple
from seg.models.flops import count_flops, count_macs, count_parameters
from seg.models.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
HEAD_NAMES = {"main", *AUX_HEADS}


@pytest.fixture(scope="module")
def model() -> BiSeNetV2:
    torch.manual_seed(0)
    return BiSeNetV2(19)


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / reference


# --- architecture figures -------------------------------------------------------------


def test_parameter_counts_match_reference(model: BiSeNetV2) -> None:
    assert relative_error(count_parameters(model), 5_231_487) < 0.01
    assert relative_error(count_parameters(BiSeNetV2(19, aux_heads=False)), 3_358_627) < 0.01


def test_flops_match_reference(model: BiSeNetV2) -> None:
    # Counted on the meta device: exact shapes at full size, no computation.
    assert relative_error(count_flops(model, (1, 3, 1024, 2048)), 196.8e9) < 0.02
    assert relative_error(count_flops(model, (1, 3, 512, 1024)), 49.2e9) < 0.02
    assert count_macs(model, (1, 3, 512, 1024)) == count_flops(model, (1, 3, 512, 1024)) // 2
    # Train mode adds the auxiliary heads.
    assert count_flops(model, (2, 3, 64, 128), training=True) > count_flops(model, (2, 3, 64, 128))


def test_flop_counter_on_known_layers() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)  # 1 x 16 x 5 x 5 out of 10 x 10
    first = 2 * (16 * 5 * 5) * (8 // 2) * 3 * 3
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(16, 4, 1))
    assert count_flops(net, (1, 8, 10, 10)) == first + 2 * 4 * 25 * 16
    assert count_macs(net, (1, 8, 10, 10)) == (first + 2 * 4 * 25 * 16) // 2


def test_meta_count_equals_real_forward_count(model: BiSeNetV2) -> None:
    """The meta-device count sees the same operations and shapes as a real forward pass."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 96))
    assert counter.get_total_flops() == count_flops(model, (1, 3, 64, 96))


def test_architecture_resolutions(model: BiSeNetV2) -> None:
    """Detail at 1/8 with 128 ch; stem 1/4 x16, S3 1/8 x32, S4 1/16 x64, S5 1/32 x128."""
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 128)
        assert model.detail(x).shape == (1, 128, 8, 16)
        feats = model.semantic(x)
    expected = {
        "stem": (16, 16, 32),
        "s3": (32, 8, 16),
        "s4": (64, 4, 8),
        "s5_4": (128, 2, 4),
        "s5_5": (128, 2, 4),
    }
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == expected
    ge_layers = [m for m in model.semantic.modules() if isinstance(m, GatherExpand)]
    assert len(ge_layers) == 2 + 2 + 4


# --- output contract -------------------------------------------------------------------


def test_train_mode_returns_all_heads_at_input_size(model: BiSeNetV2) -> None:
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == HEAD_NAMES
    for name, logits in out.items():
        assert logits.shape == (2, 19, 64, 96), name
        assert torch.isfinite(logits).all(), name
    out["main"].sum().backward()  # differentiable end to end
    assert model.detail.s1[0].conv.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_without_aux_heads_train_mode_returns_main_only() -> None:
    net = BiSeNetV2(5, aux_heads=False).train()
    assert net.aux_heads is None
    out = net(torch.randn(2, 3, 32, 64))
    assert set(out) == {"main"}
    assert out["main"].shape == (2, 5, 32, 64)


def test_training_with_batch_one_is_a_clear_error() -> None:
    net = BiSeNetV2(3, aux_heads=False).train()
    with pytest.raises(ConfigError, match="at least 2 images"):
        net(torch.randn(1, 3, 32, 32))


def test_eval_mode_returns_tensor_and_skips_aux_heads(model: BiSeNetV2) -> None:
    calls: list[str] = []
    assert model.aux_heads is not None
    handles = [
        head.register_forward_hook(lambda *_args, name=name: calls.append(name))
        for name, head in model.aux_heads.items()
    ]
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        assert isinstance(out, torch.Tensor)
        assert out.shape == (1, 19, 64, 64)
        assert calls == []
        model.train()  # the hooks do fire when the heads run
        model(torch.randn(2, 3, 64, 64))
        assert sorted(calls) == sorted(AUX_HEADS)
    finally:
        for handle in handles:
            handle.remove()


# --- any input size --------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_odd_input_size_500x700(model: BiSeNetV2, batch: int) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 500, 700))
    assert out.shape == (batch, 19, 500, 700)
    assert torch.isfinite(out).all()


def test_odd_size_in_train_mode() -> None:
    torch.manual_seed(0)
    net = BiSeNetV2(4).train()
    out = net(torch.randn(2, 3, 50, 70))
    assert {k: tuple(v.shape) for k, v in out.items()} == dict.fromkeys(HEAD_NAMES, (2, 4, 50, 70))


def test_padding_is_bottom_right_zero_and_cropped_back(model: BiSeNetV2) -> None:
    model.eval()
    x = torch.randn(1, 3, 45, 77)
    with torch.no_grad():
        odd = model(x)
        padded = model(F.pad(x, [0, 96 - 77, 0, 64 - 45]))
    torch.testing.assert_close(odd, padded[..., :45, :77])


def test_padding_is_skipped_for_multiples_of_32() -> None:
    x = torch.randn(1, 3, 64, 96)
    assert pad_to_multiple(x) is x
    assert pad_to_multiple(torch.randn(1, 3, 65, 96)).shape == (1, 3, 96, 96)


# --- formats, precision, compilation, export ---------------------------------------------


def test_channels_last_matches_nchw(model: BiSeNetV2) -> None:
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        net = model.to(memory_format=torch.channels_last)
        try:
            out = net(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_autocast_bf16_on_cpu(model: BiSeNetV2) -> None:
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    # bf16 keeps ~3 significant digits; the logits must still agree closely overall.
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def check_compiles_whole_graph(training: bool) -> None:
    """fullgraph=True fails on any graph break; the eager backend keeps this fast."""
    torch.manual_seed(0)
    net = BiSeNetV2(3).train(training)
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 40, 72)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = net(x)
    torch.manual_seed(1)  # same dropout masks in train mode
    with torch.no_grad():
        out = compiled(x)
    if training:
        assert set(out) == HEAD_NAMES
        for name in HEAD_NAMES:
            torch.testing.assert_close(out[name], ref[name])
    else:
        torch.testing.assert_close(out, ref)


def test_torch_compile_captures_whole_graph_eval() -> None:
    check_compiles_whole_graph(training=False)


@pytest.mark.slow
def test_torch_compile_captures_whole_graph_train() -> None:
    check_compiles_whole_graph(training=True)


@pytest.mark.slow
def test_torch_compile_inductor_eval() -> None:
    torch.manual_seed(0)
    net = BiSeNetV2(3, aux_heads=False).eval()
    compiled = torch.compile(net, dynamic=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter: fast here
def test_onnx_export_with_dynamic_size(model: BiSeNetV2, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "bisenetv2.onnx"
    model.eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 64, 96),),
        str(path),
        dynamo=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": axes, "logits": axes},
        opset_version=17,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A size that needs padding, although the export saw one that did not.
    x = torch.randn(2, 3, 50, 70)
    (logits,) = session.run(None, {"images": x.numpy()})
    assert logits.shape == (2, 19, 50, 70)


# --- initialisation and weights -----------------------------------------------------------


def test_init_kaiming_and_zero_last_bn_of_ge_layers(model: BiSeNetV2) -> None:
    fresh = BiSeNetV2(19)
    ge_layers = [m for m in fresh.modules() if isinstance(m, GatherExpand)]
    zero_bns = {id(ge.project.bn) for ge in ge_layers}
    for ge in ge_layers:
        assert torch.count_nonzero(ge.project.bn.weight) == 0
    for module in fresh.modules():
        if isinstance(module, nn.BatchNorm2d) and id(module) not in zero_bns:
            assert torch.all(module.weight == 1)
            assert torch.all(module.bias == 0)
    conv = fresh.head.conv.conv  # 128 -> 1024, 3x3: kaiming fan_out std = sqrt(2 / (1024 * 9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (1024 * 9)), rel=0.05)
    assert torch.all(fresh.head.classifier.bias == 0)


def test_classifiers_start_small_so_every_head_starts_near_log_c() -> None:
    torch.manual_seed(0)
    net = BiSeNetV2(19).train()
    for head in [net.head, *net.aux_heads.values()]:
        assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    labels = torch.randint(0, 19, (2, 64, 128))
    with torch.no_grad():
        outputs = net(torch.randn(2, 3, 64, 128))
    for name, logits in outputs.items():
        loss = nn.functional.cross_entropy(logits, labels).item()
        assert loss == pytest.approx(math.log(19), abs=0.3), name


def test_weights_roundtrip_from_state_dict_and_checkpoint(
    model: BiSeNetV2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = model.state_dict()
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": state, "iteration": 7, "config": {"a": 1}}, ckpt)
    for path in (raw, ckpt):
        loaded = BiSeNetV2(19, weights=str(path))
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key
    # Deployment model from a training checkpoint: the aux heads are not "unexpected".
    with caplog.at_level(logging.INFO, logger="seg.models.weights"):
        deploy = BiSeNetV2(19, aux_heads=False, weights=str(ckpt))
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert f"loaded {len(deploy.state_dict())} tensors" in caplog.text
    assert torch.equal(deploy.head.classifier.weight, model.head.classifier.weight)


def test_weights_report_missing_unexpected_and_mismatched(
    model: BiSeNetV2, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = dict(model.state_dict())
    del state["bga.fuse.conv.weight"]
    state["not.a.layer"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    net = BiSeNetV2(7)  # 7 classes: the classifier layers do not fit
    with pytest.raises(
        CheckpointError, match=r"1 missing keys .* 1 unexpected keys .* 10 shape mismatches"
    ):
        load_weights(net, path)  # strict by default
    with caplog.at_level(logging.WARNING, logger="seg.models.weights"):
        report = load_weights(net, path, strict=False)
    assert report.missing == ["bga.fuse.conv.weight"]
    assert report.unexpected == ["not.a.layer"]
    assert any(item.startswith("head.classifier.weight") for item in report.mismatched)
    assert "bga.fuse.conv.weight" in caplog.text
    assert "not.a.layer" in caplog.text
    assert torch.equal(net.detail.s1[0].conv.weight, model.detail.s1[0].conv.weight)


def test_backbone_only_loading_with_prefix(model: BiSeNetV2, tmp_path: Path) -> None:
    backbone = {
        f"backbone.{key}": value
        for key, value in model.state_dict().items()
        if key.startswith(("detail.", "semantic."))
    }
    path = tmp_path / "backbone.pt"
    torch.save(backbone, path)
    torch.manual_seed(123)
    net = BiSeNetV2(19)
    head_before = net.head.conv.conv.weight.clone()
    report = load_weights(net, path, prefix="backbone.", only=("detail", "semantic"))
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(backbone)
    assert torch.equal(
        net.semantic.s5_5.conv_last.conv.weight, model.semantic.s5_5.conv_last.conv.weight
    )
    assert torch.equal(net.head.conv.conv.weight, head_before)  # head keeps its init
    # The same through the constructor.
    net2 = BiSeNetV2(19, weights=str(path), weights_prefix="backbone.", backbone_only=True)
    assert torch.equal(net2.detail.s3[2].conv.weight, model.detail.s3[2].conv.weight)


def test_bad_weights_files_raise_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"nope\.pt"):
        BiSeNetV2(3, weights=str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        BiSeNetV2(3, weights=str(garbage))
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"foo": torch.zeros(2)}, unrelated)
    with pytest.raises(CheckpointError, match=r"do not fit BiSeNetV2: .* 1 unexpected keys"):
        BiSeNetV2(3, weights=str(unrelated))
    with pytest.raises(CheckpointError, match=r"no tensor of .* fits"):
        BiSeNetV2(3, weights=str(unrelated), weights_strict=False)


# --- config -------------------------------------------------------------------------------


def test_hydra_config_instantiates() -> None:
    node = OmegaConf.load(REPO / "configs" / "model" / "bisenetv2.yaml")
    cfg = OmegaConf.create({"dataset": {"num_classes": 7}, "model": node})
    net = hydra.utils.instantiate(cfg.model)
    assert isinstance(net, BiSeNetV2)
    assert net.num_classes == 7
    assert net.aux_heads is not None


# ------------------------------------------------------------------ head upsampling
@pytest.mark.parametrize(
    ("height", "width", "factor"), [(8, 16, 8), (5, 7, 4), (4, 4, 16), (1, 3, 2)]
)
def test_matmul_upsampling_equals_interpolate_values_and_gradients(
    height: int, width: int, factor: int
) -> None:
    from seg.models.upsample import upsample_bilinear_matmul

    x = torch.randn(2, 3, height, width, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)
    got = upsample_bilinear_matmul(x, factor)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad(expected, x, grad_out)
    (grad_got,) = torch.autograd.grad(got, x, grad_out)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-12)


def test_model_with_matmul_head_upsampling_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    reference = BiSeNetV2(5, head_upsample="interpolate")
    matmul = BiSeNetV2(5, head_upsample="matmul")
    matmul.load_state_dict(reference.state_dict())  # no new parameters
    images = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    reference.train()
    matmul.train()
    torch.manual_seed(1)
    expected = reference(images)
    torch.manual_seed(1)  # the same dropout masks
    got = matmul(images)
    assert got.keys() == expected.keys() == {"main", *AUX_HEADS}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"model\.head_upsample .*'bicubic'"):
        BiSeNetV2(5, head_upsample="bicubic")

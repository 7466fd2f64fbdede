"""``load_into`` (the one state-dict loader), safe reading of weight files, and the
BiSeNetV2 arguments around them: ``weights_strict``, ``bga_upsample``, ``bga_pointwise_bias``."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from seg.errors import CheckpointError, ConfigError
from seg.models.bisenetv2 import BiSeNetV2
from seg.models.weights import (
    WEIGHT_FILE_ARGUMENTS,
    load_into,
    load_weights,
    read_state_dict,
    read_weights_file,
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """A training state dict (with aux heads) of a 19-class BiSeNetV2."""
    torch.manual_seed(0)
    return BiSeNetV2(19).state_dict()


def one_line(error: pytest.ExceptionInfo[CheckpointError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


class _MarkerOnUnpickle:
    """Unpickling this object creates a marker file: a stand-in for hostile code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- load_into


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_load_into_strips_wrapper_prefixes(state: dict, prefix: str) -> None:
    wrapped = {prefix + key: value for key, value in state.items()}
    net = BiSeNetV2(19)
    report = load_into(net, wrapped, "wrapped.pt")
    assert report.fits and len(report.loaded) == len(state) and report.dropped == []
    assert all(torch.equal(value, state[key]) for key, value in net.state_dict().items())


def test_aux_heads_are_dropped_only_for_a_model_without_them(
    state: dict, caplog: pytest.LogCaptureFixture
) -> None:
    deploy = BiSeNetV2(19, aux_heads=False)
    with caplog.at_level(logging.INFO, logger="seg.models.weights"):
        report = load_into(deploy, state, "train.pt")
    aux_keys = [key for key in state if key.startswith("aux_heads.")]
    assert sorted(report.dropped) == sorted(aux_keys) and report.fits
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    # A model with aux heads does not drop them: a file without them is "missing" them.
    main_only = {key: value for key, value in state.items() if not key.startswith("aux_heads.")}
    with pytest.raises(CheckpointError) as error:
        load_into(BiSeNetV2(19), main_only, "deploy.pt")
    assert f"{len(aux_keys)} missing keys (aux_heads." in one_line(error)
    # Other unknown keys stay unexpected even for a deployment model.
    extra = {**state, "aux_headsX.w": torch.zeros(1), "other.w": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="2 unexpected keys"):
        load_into(BiSeNetV2(19, aux_heads=False), extra, "extra.pt")


def test_strict_error_names_source_counts_and_first_keys(state: dict) -> None:
    bad = dict(state)
    for key in (
        "bga.fuse.conv.weight",
        "bga.fuse.bn.weight",
        "head.conv.conv.weight",
        "detail.s1.0.conv.weight",
    ):
        del bad[key]
    bad["not.a.layer"] = torch.zeros(3)
    net = BiSeNetV2(7)  # 7 classes: the five classifiers do not fit
    before = {key: value.clone() for key, value in net.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_into(net, bad, "/data/partial.pt")
    message = one_line(error)
    assert message.startswith("weights from /data/partial.pt do not fit BiSeNetV2: ")
    assert (
        "4 missing keys (detail.s1.0.conv.weight, bga.fuse.conv.weight, bga.fuse.bn.weight, ...)"
        in message
    )
    assert "1 unexpected keys (not.a.layer)" in message
    assert (
        "10 shape mismatches (" in message
        and "(19, 1024, 1, 1) in the file vs (7, 1024, 1, 1) in the model" in message
    )
    # Nothing was loaded.
    assert all(torch.equal(value, before[key]) for key, value in net.state_dict().items())


def test_non_strict_loads_what_fits_and_warns(
    state: dict, caplog: pytest.LogCaptureFixture
) -> None:
    net = BiSeNetV2(7)
    with caplog.at_level(logging.WARNING, logger="seg.models.weights"):
        report = load_into(net, {**state, "extra.w": torch.zeros(1)}, "city.pt", strict=False)
    assert len(report.mismatched) == 10 and report.unexpected == ["extra.w"]
    assert report.missing == [] and len(report.loaded) == len(state) - 10
    assert torch.equal(
        net.semantic.s5_5.conv_last.conv.weight, state["semantic.s5_5.conv_last.conv.weight"]
    )
    assert torch.equal(net.head.conv.conv.weight, state["head.conv.conv.weight"])
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert (
        "skipped 1 unexpected keys (extra.w); 10 shape mismatches (head.classifier.weight"
        in record.message
    )


def test_nothing_fitting_is_an_error_even_when_not_strict() -> None:
    with pytest.raises(CheckpointError) as error:
        load_into(BiSeNetV2(3), {"foo": torch.zeros(2)}, "foo.pt", strict=False)
    assert "no tensor of foo.pt fits BiSeNetV2" in one_line(error)


# ------------------------------------------------------------------------ reading files


def test_reads_zip_and_pre_zip_files_and_checkpoint_layouts(state: dict, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert not legacy.read_bytes().startswith(b"PK")
    for payload in (state, {"model": state, "config": {}}, {"meta": {"a": 1}, "state_dict": state}):
        path = tmp_path / "file.pt"
        torch.save(payload, path)
        loaded = read_state_dict(path)
        assert loaded.keys() == state.keys()
    assert read_state_dict(legacy).keys() == state.keys()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_hostile_files_run_nothing(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if zip_format:
        torch.save({"model": _MarkerOnUnpickle(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": _MarkerOnUnpickle(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as error:
        read_weights_file(path)
    assert "refused to load" in one_line(error) and str(path) in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_files_are_one_line(state: dict, tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "cut.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        read_weights_file(path)
    assert "truncated or corrupt" in one_line(error) and str(path) in str(error.value)


def test_files_without_a_state_dict(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(text)
    backbone = tmp_path / "backbone_v2.pth"
    torch.save({"detail": {"S1.0.conv.weight": torch.zeros(1)}, "segment": {}}, backbone)
    with pytest.raises(CheckpointError, match=r"model\.backbone_weights=PATH"):
        read_state_dict(backbone)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")


# ------------------------------------------------------------------ model.weights=PATH


def test_model_weights_is_strict_by_default(state: dict, tmp_path: Path, caplog) -> None:
    path = tmp_path / "city.pt"
    partial = {key: value for key, value in state.items() if key != "bga.fuse.conv.weight"}
    torch.save({"model": partial, "config": {}}, path)
    with pytest.raises(CheckpointError) as error:
        BiSeNetV2(19, weights=str(path))
    assert "1 missing keys (bga.fuse.conv.weight)" in one_line(error)
    assert str(path) in str(error.value)
    with caplog.at_level(logging.WARNING, logger="seg.models.weights"):
        net = BiSeNetV2(19, weights=str(path), weights_strict=False)
    assert "skipped 1 missing keys" in caplog.text
    assert torch.equal(net.detail.s1[0].conv.weight, state["detail.s1.0.conv.weight"])


CLASSIFIER_KEYS = [
    f"{head}.classifier.{leaf}"
    for head in ("head", "aux_heads.aux2", "aux_heads.aux3", "aux_heads.aux4", "aux_heads.aux5_4")
    for leaf in ("weight", "bias")
]


def test_classifier_modules_are_the_five_heads_classifiers() -> None:
    assert [f"{name}.weight" for name in BiSeNetV2(3).classifier_modules()] == [
        key for key in CLASSIFIER_KEYS if key.endswith("weight")
    ]
    assert BiSeNetV2(3, aux_heads=False).classifier_modules() == ["head.classifier"]


@pytest.mark.parametrize("strict", [True, False])
def test_other_class_count_reinitialises_exactly_the_classifiers(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, strict: bool
) -> None:
    """19-class weights into an 11-class model (fine-tuning on CamVid): every other tensor
    is the file's, the ten classifier tensors are the model's own fresh initialisation."""
    path = tmp_path / "city19.pt"
    torch.save({"model": state, "config": {}}, path)
    torch.manual_seed(5)
    fresh = BiSeNetV2(11).state_dict()
    torch.manual_seed(5)
    with caplog.at_level(logging.INFO, logger="seg.models.weights"):
        net = BiSeNetV2(11, weights=str(path), weights_strict=strict)
    loaded = net.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        if key in CLASSIFIER_KEYS:
            assert value.shape[0] == 11 and value.shape[1:] == state[key].shape[1:], key
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, state[key]), key
    summary, names = (r.getMessage() for r in caplog.records)
    assert summary == (
        f"weights: loaded {len(state) - 10} tensors from {path}; re-initialised 10 classifier "
        "tensors of the heads (the file predicts 19 classes, this model 11; names below)"
    )
    assert names == f"weights: re-initialised (class count): {', '.join(CLASSIFIER_KEYS)}"
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_report_of_a_class_count_change(state: dict, tmp_path: Path) -> None:
    net = BiSeNetV2(11)
    report = load_into(net, state, "s.pt", classifiers=net.classifier_modules())
    assert report.fits and report.reinitialised == CLASSIFIER_KEYS
    assert report.class_counts == (19, 11) and len(report.loaded) == len(state) - 10
    # Checkpoint loaders (eval, predict, export) name no classifiers: still one error line.
    with pytest.raises(CheckpointError, match="10 shape mismatches"):
        load_into(BiSeNetV2(11), state, "s.pt")


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        (
            "detail.s1.0.conv.weight",
            (32, 3, 3, 3),
            "1 shape mismatches (detail.s1.0.conv.weight (32, 3, 3, 3) in the file vs "
            "(64, 3, 3, 3) in the model)",
        ),
        (
            "head.classifier.weight",
            (19, 1000, 1, 1),
            "1 shape mismatches (head.classifier.weight (19, 1000, 1, 1) in the file vs "
            "(11, 1024, 1, 1) in the model)",
        ),
        (
            "aux_heads.aux3.classifier.bias",
            (7,),
            "10 shape mismatches (head.classifier.weight (19, 1024, 1, 1) in the file vs "
            "(11, 1024, 1, 1) in the model, ",
        ),
    ],
    ids=["backbone", "classifier_input_side", "classifiers_disagree"],
)
def test_anything_else_that_does_not_fit_stays_one_error_line(
    state: dict, tmp_path: Path, key: str, shape: tuple[int, ...], expected: str
) -> None:
    """A mismatched non-classifier tensor, a classifier whose input side differs, or
    classifiers that disagree on the class count: the strict error of before."""
    path = tmp_path / "bad.pt"
    torch.save({"model": {**state, key: torch.zeros(shape)}}, path)
    with pytest.raises(CheckpointError) as error:
        BiSeNetV2(11, weights=str(path))
    message = one_line(error)
    assert message.startswith(f"weights from {path} do not fit BiSeNetV2: ")
    assert expected in message


def test_a_published_layout_names_the_converter(tmp_path: Path) -> None:
    reference_keys = {
        "detail.S1.0.conv.weight": torch.zeros(64, 3, 3, 3),
        "head.conv_out.1.bias": torch.zeros(19),
    }
    path = tmp_path / "model_final_v2_city.pth"
    torch.save({f"module.{k}": v for k, v in reference_keys.items()}, path)
    with pytest.raises(CheckpointError) as error:
        BiSeNetV2(19, weights=str(path))
    message = one_line(error)
    assert "coincheung BiSeNetV2 state dict" in message and "tools/convert_weights.py" in message


def test_backbone_only_loads_the_two_branches(state: dict, tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    torch.save(
        {f"backbone.{k}": v for k, v in state.items() if k.startswith(("detail.", "semantic."))},
        path,
    )
    torch.manual_seed(1)
    net = BiSeNetV2(5)
    head_before = net.head.conv.conv.weight.clone()
    report = load_weights(net, path, prefix="backbone.", only=("detail", "semantic"))
    assert report.fits and len(report.loaded) == sum(
        k.startswith(("detail.", "semantic.")) for k in state
    )
    assert torch.equal(net.semantic.stem.fuse.conv.weight, state["semantic.stem.fuse.conv.weight"])
    assert torch.equal(net.head.conv.conv.weight, head_before)


def test_weight_file_arguments_are_constructor_arguments() -> None:
    import inspect

    parameters = inspect.signature(BiSeNetV2).parameters
    assert all(
        name in parameters and parameters[name].default is None for name in WEIGHT_FILE_ARGUMENTS
    )


# ------------------------------------------------------------------------ BGA settings


def test_bga_upsample_setting() -> None:
    torch.manual_seed(0)
    bilinear = BiSeNetV2(4, aux_heads=False).eval()
    nearest = BiSeNetV2(4, aux_heads=False, bga_upsample="nearest").eval()
    nearest.load_state_dict(bilinear.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert not torch.allclose(bilinear(x), nearest(x))
        # Nearest x4 upsampling repeats each 1/32 value over a 4 x 4 block at 1/8.
        up = nearest.bga._up4(torch.arange(6.0).view(1, 1, 2, 3))
    assert up.shape == (1, 1, 8, 12) and torch.equal(up[0, 0, :4, :4], torch.zeros(4, 4))
    with pytest.raises(ConfigError, match="bga_upsample must be one of"):
        BiSeNetV2(4, bga_upsample="bicubic")


def test_bga_pointwise_bias_adds_two_biases() -> None:
    plain = set(BiSeNetV2(4, aux_heads=False).state_dict())
    biased = BiSeNetV2(4, aux_heads=False, bga_pointwise_bias=True)
    assert set(biased.state_dict()) - plain == {
        "bga.detail_keep.1.bias",
        "bga.semantic_keep.1.bias",
    }
    assert isinstance(biased.bga.detail_keep[1], nn.Conv2d)
    assert torch.equal(biased.bga.semantic_keep[1].bias, torch.zeros(128))  # zero init

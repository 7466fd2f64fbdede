"""Inference modes (whole / flip / multi-scale / slide) and the Evaluator on tiny data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from seg.engine.eval_run import CONFIG_DIR
from seg.engine.evaluator import Evaluator
from seg.engine.inference import _window_starts, forward_padded, predict_probs, slide_logits
from seg.errors import ConfigError
from seg.metrics import ConfusionMatrix

C = 5


class PixelNet(nn.Module):
    """Per-pixel 1x1 conv: its output at a pixel depends on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ContextNet(nn.Module):
    """Two 3x3 convs: local context, not symmetric under flips."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, C, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Needs32(nn.Module):
    """Wraps a model, refuses inputs whose sides are not multiples of 32, records shapes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0, tuple(x.shape)
        self.shapes.append(tuple(x.shape[-2:]))
        return self.inner(x)


def _images(h: int, w: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h * w))


@torch.no_grad()
def test_whole_pads_odd_sizes_to_32_and_crops_back() -> None:
    net = PixelNet().eval()
    x = _images(37, 53)
    out = forward_padded(Needs32(net), x)
    assert out.shape == (2, C, 37, 53)
    torch.testing.assert_close(out, net(x))
    probs = predict_probs(Needs32(net), x)
    torch.testing.assert_close(probs, net(x).softmax(1))
    assert torch.allclose(probs.sum(1), torch.ones(2, 37, 53))


@torch.no_grad()
def test_flip_averages_flipped_pass_flipped_back() -> None:
    net = ContextNet().eval()
    x = _images(64, 96)
    expected = (net(x).softmax(1) + net(x.flip(-1)).softmax(1).flip(-1)) / 2
    torch.testing.assert_close(predict_probs(net, x, flip=True), expected)
    assert not torch.allclose(expected, net(x).softmax(1), atol=1e-4)  # flip matters here
    pixel = PixelNet().eval()  # a per-pixel model is flip-equivariant: flip changes nothing
    torch.testing.assert_close(predict_probs(pixel, x, flip=True), pixel(x).softmax(1))


@torch.no_grad()
def test_multi_scale_averages_probabilities_at_label_size() -> None:
    net = ContextNet().eval()
    x = _images(64, 96)

    def at(scale_hw: tuple[int, int], flip: bool) -> torch.Tensor:
        xs = F.interpolate(x, size=scale_hw, mode="bilinear", align_corners=False)
        xs = xs.flip(-1) if flip else xs
        p = forward_padded(net, xs).softmax(1)  # 32 x 48 runs padded to 32 x 64
        p = p.flip(-1) if flip else p
        return F.interpolate(p, size=(64, 96), mode="bilinear", align_corners=False)

    probs = predict_probs(net, x, scales=[0.5, 1.0])
    torch.testing.assert_close(probs, (at((32, 48), False) + net(x).softmax(1)) / 2)
    flipped = predict_probs(net, x, scales=[0.5, 1.0], flip=True)
    expected = (
        at((32, 48), False) + at((32, 48), True) + at((64, 96), False) + at((64, 96), True)
    ) / 4
    torch.testing.assert_close(flipped, expected)
    # Labels of another size (e.g. an upscaled scale only): probabilities come at label size.
    assert predict_probs(net, x, scales=[1.5], out_size=(64, 96)).shape == (2, C, 64, 96)


def test_window_starts_cover_the_image_with_the_last_window_flush() -> None:
    assert _window_starts(64, 32, 20) == [0, 20, 32]
    assert _window_starts(30, 32, 20) == [0]
    for size, crop, stride in [(100, 32, 32), (101, 40, 13), (64, 64, 10)]:
        starts = _window_starts(size, crop, stride)
        covered = set()
        for s in starts:
            covered.update(range(s, s + crop))
        assert covered == set(range(size)) and starts[-1] == size - crop


@torch.no_grad()
@pytest.mark.parametrize("hw", [(64, 96), (50, 70)])
def test_slide_with_overlap_matches_whole_for_a_per_pixel_model(hw: tuple[int, int]) -> None:
    net = Needs32(PixelNet().eval())
    x = _images(*hw)
    out = slide_logits(net, x, crop_size=(32, 48), stride=(20, 30))
    assert out.shape == (2, C, *hw)
    torch.testing.assert_close(out, net.inner(x), atol=1e-5, rtol=1e-5)
    rows, cols = len(_window_starts(hw[0], 32, 20)), len(_window_starts(hw[1], 48, 30))
    assert len(net.shapes) == rows * cols > 1
    assert set(net.shapes) == {(32, 64)}  # 32 x 48 windows padded to 32 x 64


@torch.no_grad()
def test_slide_agrees_with_whole_on_a_context_model() -> None:
    net = ContextNet().eval()
    x = _images(64, 96)
    whole = predict_probs(net, x).argmax(1)
    slide = predict_probs(net, x, mode="slide", crop_size=(32, 32), stride=(16, 16)).argmax(1)
    agreement = (whole == slide).float().mean().item()
    assert agreement > 0.9  # differences only near window borders (zero padding there)


@torch.no_grad()
def test_bf16_autocast_gives_float32_probabilities() -> None:
    evaluator = Evaluator(num_classes=C, amp="bf16")
    probs = evaluator.predict(ContextNet().eval(), _images(32, 32), (32, 32))
    assert probs.dtype == torch.float32 and probs.shape == (2, C, 32, 32)


# ---------------------------------------------------------------------------- Evaluator
class TinySet(torch.utils.data.Dataset):
    """Items of the data contract: uint8 RGB H x W x 3, uint8 train-id labels with ignore."""

    def __init__(self, n: int = 4, h: int = 37, w: int = 45) -> None:
        g = torch.Generator().manual_seed(7)
        self.images = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, C, (n, h, w), generator=g).to(torch.uint8)
        self.labels[:, :3] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "name": f"img{i}"}


MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"flip": True},
        {"scales": [0.75, 1.0, 1.25], "flip": True},
        {"mode": "slide", "crop_size": [32, 32], "stride": [24, 24]},
    ],
    ids=["whole", "flip", "ms_flip", "slide"],
)
def test_evaluator_metrics_equal_manual_confusion_matrix(settings: dict) -> None:
    net = ContextNet()
    net.train()
    evaluator = Evaluator(C, 255, MEAN, STD, **settings)
    data = TinySet()
    loader = DataLoader(data, batch_size=2)
    seen: list[str] = []
    metrics = evaluator.evaluate(
        net, loader, "cpu", progress=False, on_prediction=lambda b, p: seen.extend(b["name"])
    )
    assert net.training  # mode restored
    assert seen == [f"img{i}" for i in range(len(data))]

    net.eval()
    manual = ConfusionMatrix(C)
    with torch.no_grad():
        for batch in loader:
            x = batch["image"].permute(0, 3, 1, 2).float() / 255
            x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            probs = predict_probs(net, x, **settings)
            manual.update(probs.argmax(1), batch["label"].long())
    expected = manual.compute()
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"])
    assert metrics["aAcc"] == pytest.approx(expected["aAcc"])
    assert 0.0 <= metrics["mIoU"] <= 1.0


def test_evaluator_keeps_eval_mode() -> None:
    net = PixelNet().eval()
    Evaluator(C).evaluate(net, DataLoader(TinySet(1), batch_size=1), "cpu", progress=False)
    assert not net.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "tiles"}, "eval.mode"),
        ({"amp": "fp8"}, "eval.amp"),
        ({"scales": []}, "eval.scales"),
        ({"mode": "slide"}, "crop_size"),
        ({"mode": "slide", "crop_size": [32, 32], "stride": [40, 16]}, "stride"),
        ({"crop_size": [0, 4]}, "crop_size"),
    ],
)
def test_evaluator_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Evaluator(C, **kwargs)


@pytest.mark.parametrize("preset", ["whole", "slide", "ms_flip"])
def test_eval_presets_instantiate_with_dataset_interpolations(preset: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        tool = compose(config_name="eval", overrides=[f"eval={preset}"])
    dataset = {
        "num_classes": C,
        "ignore_index": 255,
        "mean": MEAN,
        "std": STD,
        "class_names": [f"c{i}" for i in range(C)],
        "crop_size": [48, 96],
    }
    cfg = OmegaConf.create({"dataset": dataset, "eval": tool.eval})
    evaluator = instantiate(cfg.eval)
    assert isinstance(evaluator, Evaluator)
    assert evaluator.num_classes == C and evaluator.class_names == dataset["class_names"]
    assert evaluator.amp == "off" and evaluator.batch_size == 1
    if preset == "slide":
        assert evaluator.mode == "slide" and evaluator.crop_size == (48, 96)
        assert evaluator.stride == (32, 64)  # default: two thirds of the crop
    if preset == "ms_flip":
        assert evaluator.flip and len(evaluator.scales) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
def test_evaluator_on_cuda_matches_cpu(amp: str) -> None:
    net = ContextNet()
    loader = DataLoader(TinySet(), batch_size=2)
    cpu = Evaluator(C, 255, MEAN, STD, flip=True).evaluate(net, loader, "cpu", progress=False)
    gpu = Evaluator(C, 255, MEAN, STD, flip=True, amp=amp).evaluate(
        net.cuda(), loader, "cuda", progress=False
    )
    tolerance = 1e-6 if amp == "off" else 0.02  # half precision flips a few near-ties
    assert gpu["mIoU"] == pytest.approx(cpu["mIoU"], abs=tolerance)
    assert gpu["aAcc"] == pytest.approx(cpu["aAcc"], abs=tolerance)

"""Class weights in the losses (``loss.class_weight``): CE, OHEM and focal loss against
direct computations, the refusals, and the loss configs passing the one setting to every head."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seg.errors import ConfigError
from seg.instantiate import build
from seg.losses import CrossEntropyLoss, FocalLoss, GhmcLoss, MultiHeadLoss, OhemCELoss

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
C = 19
IGNORE = 255
SELECTIONS = ["host", "device"]


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """One 1 x 4 image, 3 classes: true-class probabilities 0.5, 0.6, 0.8 and one ignored pixel."""
    probs = torch.tensor(
        [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]], dtype=torch.float64
    )
    logits = probs.log().float().T.reshape(1, 3, 1, 4)
    labels = torch.tensor([[[0, 1, 2, IGNORE]]])
    return logits, labels


# The three valid pixels' cross-entropies, -log p_t, and the class weights used below.
L0, L1, L2 = -math.log(0.5), -math.log(0.6), -math.log(0.8)
W = [1.0, 2.0, 4.0]


def test_cross_entropy_by_hand() -> None:
    logits, labels = tiny_batch()
    loss = CrossEntropyLoss(class_weights=W, num_classes=3)(logits, labels)
    assert loss.item() == pytest.approx((1 * L0 + 2 * L1 + 4 * L2) / (1 + 2 + 4), rel=1e-6)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_ohem_by_hand(selection: str) -> None:
    logits, labels = tiny_batch()
    # thresh 0.7: pixels 0 and 1 (p_t 0.5, 0.6) are hard; n_min = 1; the weighted mean of
    # the kept pixels.
    ohem = OhemCELoss(thresh=0.7, class_weights=W, num_classes=3, selection=selection)
    loss, stats = ohem.forward_with_stats(logits, labels)
    assert loss.item() == pytest.approx((1 * L0 + 2 * L1) / (1 + 2), rel=1e-6)
    assert stats["kept_fraction"].item() == pytest.approx(2 / 3)  # still counts pixels
    # thresh 0.4: nothing is hard; the n_min = 1 largest loss (pixel 0) is kept, whatever
    # its weight: w0 * L0 / w0.
    ohem = OhemCELoss(thresh=0.4, class_weights=W, num_classes=3, selection=selection)
    assert ohem(logits, labels).item() == pytest.approx(L0, rel=1e-6)


def test_focal_by_hand() -> None:
    logits, labels = tiny_batch()
    f0, f1, f2 = 0.5**2 * L0, 0.4**2 * L1, 0.2**2 * L2  # (1 - p_t)^2 * CE
    loss = FocalLoss(gamma=2.0, class_weights=W, num_classes=3)(logits, labels)
    assert loss.item() == pytest.approx((1 * f0 + 2 * f1 + 4 * f2) / 7, rel=1e-6)
    # With alpha too: alpha multiplies each term, the mean still divides by sum w[y].
    alpha = [0.5, 1.0, 0.25]
    loss = FocalLoss(gamma=2.0, alpha=alpha, class_weights=W, num_classes=3)(logits, labels)
    expected = (1 * 0.5 * f0 + 2 * 1.0 * f1 + 4 * 0.25 * f2) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def make_batch(regime: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits 2 x C x 16 x 24 and labels with a few ignored pixels (``confident``: no pixel
    is hard for thresh 0.7, so OHEM takes its top-n_min path)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (2, 16, 24), generator=gen)
    labels[:, 0, :5] = IGNORE
    logits = torch.randn(2, C, 16, 24, generator=gen)
    if regime == "confident":
        safe = torch.where(labels == IGNORE, 0, labels).unsqueeze(1)
        logits = (0.5 * logits).scatter_add_(1, safe, torch.full((2, 1, 16, 24), 8.0))
    return logits, labels


def class_weights(seed: int = 1) -> torch.Tensor:
    return torch.rand(C, generator=torch.Generator().manual_seed(seed)) * 3 + 0.05


def direct(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """The documented definitions in float64 autograd (gradients to compare with)."""
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    log_p = torch.log_softmax(logits, 1).gather(1, safe.unsqueeze(1)).squeeze(1)[valid]
    ce, w_pix = -log_p, w.double()[safe][valid]
    if kind == "ce":
        return (w_pix * ce).sum() / w_pix.sum()
    if kind == "focal":  # gamma 2, no alpha
        return (w_pix * (1 - log_p.exp()) ** 2 * ce).sum() / w_pix.sum()
    # OHEM: kept by the unweighted CE (hard: CE > -log 0.7, else the n_min largest).
    n_min = max(ce.numel() // 16, 1)
    hard = ce.detach() > -math.log(0.7)
    kept = hard if int(hard.sum()) >= n_min else ce.detach() >= ce.detach().topk(n_min).values[-1]
    return (w_pix[kept] * ce[kept]).sum() / w_pix[kept].sum()


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("ce", lambda w: CrossEntropyLoss(class_weights=w)),
        ("focal", lambda w: FocalLoss(gamma=2.0, class_weights=w)),
        ("ohem", lambda w: OhemCELoss(class_weights=w, selection="host")),
        ("ohem", lambda w: OhemCELoss(class_weights=w, selection="device")),
    ],
    ids=["ce", "focal", "ohem-host", "ohem-device"],
)
@pytest.mark.parametrize("regime", ["random", "confident"])
def test_weighted_losses_match_the_definitions_value_and_gradient(kind, make, regime) -> None:
    logits, labels = make_batch(regime)
    w = class_weights()
    x = logits.clone().requires_grad_()
    loss = make(w.tolist())(x, labels)
    x_ref = logits.double().requires_grad_()
    ref = direct(x_ref, labels, w, kind)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad.float(), atol=1e-7, rtol=1e-4)


def test_focal_gamma_zero_with_class_weights_is_weighted_cross_entropy_exactly() -> None:
    logits, labels = make_batch("random")
    w = class_weights().tolist()
    focal = FocalLoss(gamma=0.0, class_weights=w)(logits, labels)
    assert torch.equal(focal, CrossEntropyLoss(class_weights=w)(logits, labels))


@pytest.mark.parametrize(
    "make",
    [
        lambda w: CrossEntropyLoss(class_weights=w),
        lambda w: FocalLoss(class_weights=w),
        lambda w: OhemCELoss(class_weights=w),
    ],
    ids=["ce", "focal", "ohem"],
)
def test_pixels_that_all_weigh_zero_give_zero_not_nan(make) -> None:
    logits, labels = make_batch("random")
    labels = torch.where(labels == IGNORE, IGNORE, 3)  # every valid pixel is class 3
    w = [1.0] * C
    w[3] = 0.0
    x = logits.clone().requires_grad_()
    loss = make(w)(x, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("make", [CrossEntropyLoss, FocalLoss, OhemCELoss])
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("auto", "resolved by tools/train.py"),
        ([1.0, 2.0], "one value per class"),
        ([1.0] * (C - 1) + [-1.0], "finite and non-negative"),
        ([1.0] * (C - 1) + [math.nan], "finite and non-negative"),
        ([1.0] * (C - 1) + [math.inf], "finite and non-negative"),
        ([1.0] * (C - 1) + ["x"], "list of numbers"),
    ],
)
def test_bad_class_weights_are_refused_in_one_line(make, values, message) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        make(class_weights=values, num_classes=C)
    assert "\n" not in str(error.value) and "class_weights" in str(error.value)


def test_ghm_refuses_class_weights_and_multi_head_refuses_unresolved_auto() -> None:
    with pytest.raises(ConfigError, match="GhmcLoss takes no class weights"):
        GhmcLoss(class_weights=[1.0] * C)
    heads = {"main": {"loss": CrossEntropyLoss()}}
    with pytest.raises(ConfigError, match="must be resolved to a list"):
        MultiHeadLoss(heads, class_weight="auto")
    assert MultiHeadLoss(heads, class_weight=[1, 2]).class_weight == [1.0, 2.0]


def compose_loss_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+loss={name}", *overrides])
    stub = OmegaConf.create({"dataset": {"num_classes": C, "ignore_index": IGNORE}})
    return OmegaConf.merge(stub, cfg)


@pytest.mark.parametrize("name", ["ohem", "ce", "focal", "ohem_main_ce_aux"])
def test_one_class_weight_setting_reaches_every_head(name: str) -> None:
    w = [round(0.1 * (c + 1), 1) for c in range(C)]
    default = instantiate(compose_loss_cfg(name).loss)
    assert all(m.class_weights is None for m in default.losses.values())  # unchanged default
    loss = instantiate(compose_loss_cfg(name, f"loss.class_weight={w}").loss)
    assert loss.class_weight == w
    for module in loss.losses.values():
        assert module.class_weights.tolist() == pytest.approx(w)


def test_ce_weighted_config_is_ce_with_auto_and_ghm_refuses_weights() -> None:
    cfg = compose_loss_cfg("ce_weighted")
    assert cfg.loss.name == "ce_weighted" and cfg.loss.class_weight == "auto"
    plain = compose_loss_cfg("ce")
    assert OmegaConf.to_container(cfg.loss.heads) == OmegaConf.to_container(plain.loss.heads)
    with pytest.raises(ConfigError, match=r"'auto' is resolved by tools/train\.py"):
        build(cfg.loss, "loss")  # the heads are built first: CrossEntropyLoss says it
    with pytest.raises(ConfigError, match="GhmcLoss takes no class weights"):
        build(compose_loss_cfg("ghm", f"loss.class_weight={[1.0] * C}").loss, "loss")


WEIGHTED = [
    lambda: CrossEntropyLoss(class_weights=class_weights().tolist()),
    lambda: FocalLoss(class_weights=class_weights().tolist()),
    lambda: OhemCELoss(class_weights=class_weights().tolist()),  # device selection on CUDA
]


@pytest.mark.gpu
@pytest.mark.parametrize("make_loss", WEIGHTED, ids=["ce", "focal", "ohem"])
@pytest.mark.parametrize("regime", ["random", "confident"])
def test_cuda_weighted_losses_match_cpu_and_make_no_host_device_sync(make_loss, regime) -> None:
    logits, labels = make_batch(regime)
    cpu_x, gpu_x = logits.clone().requires_grad_(), logits.cuda().requires_grad_()
    cpu_loss = make_loss()(cpu_x, labels)
    loss_fn, gpu_labels = make_loss().cuda(), labels.cuda()
    loss_fn(gpu_x, gpu_labels).backward()  # warm-up: first-call allocations are not checked
    gpu_x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_loss = loss_fn(gpu_x, gpu_labels)
        gpu_loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_loss.backward()
    assert abs(cpu_loss.item() - gpu_loss.item()) < 1e-5
    torch.testing.assert_close(gpu_x.grad.cpu(), cpu_x.grad, atol=1e-6, rtol=1e-4)

"""Unit tests of seg.losses: values against direct references, edge cases, AMP dtypes."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from seg.errors import ConfigError, DatasetError
from seg.losses import CrossEntropyLoss, FocalLoss, GhmcLoss, OhemCELoss, top_k_weights

C = 19
IGNORE = 255

# GHM-C with momentum 0: its weights come from the batch alone, so calling one instance
# twice on the same input gives the same value, as for the other losses (the moving
# counts and their momentum are tested in test_losses_ghm.py).
StatelessGhmc = partial(GhmcLoss, momentum=0.0)


def make_batch(
    regime: str, n: int = 2, h: int = 16, w: int = 24, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 N x C x H x W and labels int64 N x H x W with a few ignored pixels.

    ``random``: nearly every pixel is hard. ``confident``: logits favour the label by 8, so no
    pixel is hard for thresh 0.7 and OHEM must take its top-n_min path.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n, h, w), generator=gen)
    labels[:, 0, :5] = IGNORE
    logits = torch.randn(n, C, h, w, generator=gen)
    if regime == "confident":
        logits = 0.5 * logits
        logits.scatter_add_(
            1, torch.where(labels == IGNORE, 0, labels).unsqueeze(1), torch.full((n, 1, h, w), 8.0)
        )
    return logits, labels


def reference_pixel_ce(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per-pixel CE of every non-ignored pixel, in float64, one pixel at a time."""
    x = logits.double()
    losses = []
    for i in range(labels.shape[0]):
        for r in range(labels.shape[1]):
            for c in range(labels.shape[2]):
                y = int(labels[i, r, c])
                if y == IGNORE:
                    continue
                column = x[i, :, r, c]
                losses.append(torch.logsumexp(column, 0) - column[y])
    return losses


def reference_ohem(logits: torch.Tensor, labels: torch.Tensor, thresh: float = 0.7):
    """The OHEM definition, written plainly: returns (loss, number of kept pixels)."""
    losses = reference_pixel_ce(logits, labels)
    n_min = len(losses) // 16
    hard = [loss for loss in losses if loss.item() > -math.log(thresh)]
    if len(hard) < n_min:
        hard = sorted(losses, key=lambda t: t.item(), reverse=True)[:n_min]
    return torch.stack(hard).mean(), len(hard)


# Both ways of selecting the kept pixels (host counts vs sync-free on the device) must meet
# the same definition; every OHEM test below runs with each.
SELECTIONS = ["host", "device"]


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("regime", ["random", "confident"])
def test_ohem_matches_reference_value_and_gradient(regime: str, selection: str) -> None:
    logits, labels = make_batch(regime)
    n_valid = int((labels != IGNORE).sum())
    x = logits.clone().requires_grad_()
    loss, stats = OhemCELoss(selection=selection).forward_with_stats(x, labels)
    x_ref = logits.clone().requires_grad_()
    ref, n_kept = reference_ohem(x_ref, labels)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) < 1e-6
    assert stats["kept_fraction"].item() == pytest.approx(n_kept / n_valid)
    if regime == "confident":  # the top-n_min path was the one taken
        assert n_kept == n_valid // 16
    else:
        assert n_kept > n_valid // 16
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad.float(), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_ohem_thresh_changes_the_kept_set(selection: str) -> None:
    logits, labels = make_batch("random", seed=3)
    for thresh in (0.05, 0.3, 0.9):
        ref, n_kept = reference_ohem(logits, labels, thresh=thresh)
        ohem = OhemCELoss(thresh=thresh, selection=selection)
        loss, stats = ohem.forward_with_stats(logits, labels)
        assert abs(loss.item() - ref.item()) < 1e-6
        assert stats["kept_fraction"].item() == pytest.approx(n_kept / int((labels != 255).sum()))


@pytest.mark.parametrize("selection", SELECTIONS)
def test_ohem_ties_at_the_cut_give_exact_top_k_mean_and_split_gradient(selection: str) -> None:
    # Every pixel has the same confident logits: all losses tie, none is hard.
    n, h, w = 1, 8, 8
    column = torch.zeros(C)
    column[3] = 6.0
    logits = column.view(1, C, 1, 1).expand(n, C, h, w).clone().requires_grad_()
    labels = torch.full((n, h, w), 3)
    loss, stats = OhemCELoss(selection=selection).forward_with_stats(logits, labels)
    pixel_loss = torch.logsumexp(column.double(), 0) - 6.0
    assert abs(loss.item() - pixel_loss.item()) < 1e-6
    assert stats["kept_fraction"].item() == pytest.approx(1 / 16)
    loss.backward()
    # The kept weight (total 1) is shared by the 64 tied pixels: same gradient everywhere.
    per_pixel = logits.grad.sum(dim=1)
    assert torch.allclose(logits.grad, logits.grad[:, :, :1, :1].expand_as(logits.grad))
    torch.testing.assert_close(per_pixel, torch.zeros_like(per_pixel), atol=1e-7, rtol=0)
    softmax = torch.softmax(column.double(), 0)
    expected = (softmax - F.one_hot(torch.tensor(3), C).double()) / (h * w)
    torch.testing.assert_close(logits.grad[0, :, 0, 0].double(), expected, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("case", ["small", "large", "biased_sample", "ties"])
def test_top_k_weights_pick_the_k_largest(case: str) -> None:
    gen = torch.Generator().manual_seed(1)
    if case == "small":
        values, k = torch.rand(1000, generator=gen), 37
    elif case == "large":  # big enough for the sampled-threshold path (>= 4 x 65536)
        values, k = torch.randn(300_000, generator=gen), 300_000 // 16
    elif case == "biased_sample":
        # Large values sit exactly where the stride-4 sample looks: the sample overestimates
        # the threshold, too few candidates pass, and the exact fallback must take over.
        values = torch.rand(4 * 65536, generator=gen)
        values[::4] = 10.0 + torch.rand(65536, generator=gen)
        k = 100_000
    else:
        values = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 3.0, 0.5])
        k = 3
    weights = top_k_weights(values, k)
    expected = values.double().sort(descending=True).values[:k].sum()
    assert weights.shape == values.shape
    assert weights.sum().item() == pytest.approx(k)
    assert ((weights >= 0) & (weights <= 1)).all()
    assert (weights * values).double().sum().item() == pytest.approx(expected.item(), rel=1e-9)


def test_top_k_weights_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        top_k_weights(torch.rand(5), 6)


@pytest.mark.parametrize(
    "loss_fn",
    [
        OhemCELoss(selection="host"),
        OhemCELoss(selection="device"),
        CrossEntropyLoss(),
        FocalLoss(),
        GhmcLoss(),
    ],
    ids=["ohem-host", "ohem-device", "ce", "focal", "ghm"],
)
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(loss_fn) -> None:
    logits = torch.randn(2, C, 8, 8, requires_grad=True)
    labels = torch.full((2, 8, 8), IGNORE)
    loss, stats = loss_fn.forward_with_stats(logits, labels)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    for value in stats.values():
        assert value.item() == 0.0


@pytest.mark.parametrize("selection", SELECTIONS)
def test_fewer_than_16_valid_pixels(selection: str) -> None:
    labels = torch.full((1, 4, 4), IGNORE)
    labels[0, 0, :3] = torch.tensor([1, 2, 3])
    labels[0, 1, :2] = torch.tensor([4, 5])
    logits = 0.5 * torch.randn(1, C, 4, 4, generator=torch.Generator().manual_seed(0))
    logits.scatter_add_(
        1, torch.where(labels == IGNORE, 0, labels).unsqueeze(1), torch.full((1, 1, 4, 4), 8.0)
    )
    # 5 valid pixels: n_min = 5 // 16 = 0. None is hard; the reference would average an empty
    # set (NaN). We keep at least one pixel: the loss is the largest per-pixel loss.
    losses = reference_pixel_ce(logits, labels)
    assert all(loss.item() < -math.log(0.7) for loss in losses)
    loss, stats = OhemCELoss(selection=selection).forward_with_stats(logits, labels)
    assert abs(loss.item() - max(v.item() for v in losses)) < 1e-6
    assert stats["kept_fraction"].item() == pytest.approx(1 / 5)
    # With hard pixels among them, the mean of the hard ones, as in the reference.
    logits[0, :, 0, 0] = torch.randn(C)
    logits[0, 1, 0, 0] = -5.0
    ref, n_kept = reference_ohem(logits, labels)
    loss, stats = OhemCELoss(selection=selection).forward_with_stats(logits, labels)
    assert n_kept >= 1 and abs(loss.item() - ref.item()) < 1e-6
    assert stats["kept_fraction"].item() == pytest.approx(n_kept / 5)


@pytest.mark.parametrize("thresh", [0.0, 1.0, -0.1, 1.5])
def test_ohem_rejects_thresh_outside_open_unit_interval(thresh: float) -> None:
    with pytest.raises(ConfigError, match="thresh"):
        OhemCELoss(thresh=thresh)


def test_ohem_rejects_bad_min_kept_ratio_and_selection() -> None:
    with pytest.raises(ConfigError, match="min_kept_ratio"):
        OhemCELoss(min_kept_ratio=0.0)
    with pytest.raises(ConfigError, match="selection must be one of"):
        OhemCELoss(selection="sort")


@pytest.mark.parametrize("regime", ["random", "confident"])
@pytest.mark.parametrize("shape", [(2, 64, 96), (1, 7, 9)])
def test_ohem_selections_agree_on_larger_batches(regime: str, shape: tuple[int, int, int]) -> None:
    """Host and device selection: same loss, kept fraction and gradient, at sizes where
    n_min and the ignored pixels make the static topk bound differ from n_min."""
    n, h, w = shape
    logits, labels = make_batch(regime, n=n, h=h, w=w, seed=5)
    labels[:, -1, :] = IGNORE  # a whole ignored row: n_min < the shape's bound
    results = []
    for selection in SELECTIONS:
        x = logits.clone().requires_grad_()
        loss, stats = OhemCELoss(selection=selection).forward_with_stats(x, labels)
        loss.backward()
        results.append((loss, stats["kept_fraction"], x.grad))
    (loss_h, kept_h, grad_h), (loss_d, kept_d, grad_d) = results
    torch.testing.assert_close(loss_d, loss_h, atol=1e-6, rtol=1e-6)
    assert kept_d.item() == kept_h.item()
    torch.testing.assert_close(grad_d, grad_h, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize(
    "loss_fn",
    [OhemCELoss(), CrossEntropyLoss(), FocalLoss(), GhmcLoss()],
    ids=["ohem", "ce", "focal", "ghm"],
)
@pytest.mark.parametrize("bad", [19, 254, -1])
def test_out_of_range_label_raises_dataset_error(loss_fn, bad: int) -> None:
    logits, labels = make_batch("random")
    labels[1, 3, 4] = bad
    with pytest.raises(DatasetError, match=f"label value {bad} is outside \\[0, 19\\)"):
        loss_fn(logits, labels)


def test_shape_and_num_classes_mismatch_raise_config_error() -> None:
    logits, labels = make_batch("random")
    with pytest.raises(ConfigError, match="resolution"):
        OhemCELoss()(logits, labels[:, :8])
    with pytest.raises(ConfigError, match="num_classes is 21"):
        CrossEntropyLoss(num_classes=21)(logits, labels)
    with pytest.raises(ConfigError, match="integer"):
        FocalLoss()(logits, labels.float())
    with pytest.raises(ConfigError, match="one value per class"):
        CrossEntropyLoss(class_weights=[1.0, 2.0], num_classes=C)
    with pytest.raises(ConfigError, match="gamma"):
        FocalLoss(gamma=-1.0)


def test_cross_entropy_matches_torch_with_and_without_class_weights() -> None:
    logits, labels = make_batch("random")
    class_weights = torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.1
    for ours, theirs in [
        (CrossEntropyLoss(), {}),
        (CrossEntropyLoss(class_weights=class_weights.tolist()), {"weight": class_weights}),
    ]:
        x = logits.clone().requires_grad_()
        x_ref = logits.double().requires_grad_()
        loss = ours(x, labels)
        ref = F.cross_entropy(
            x_ref, labels, ignore_index=IGNORE, **{k: v.double() for k, v in theirs.items()}
        )
        assert abs(loss.item() - ref.item()) < 1e-6
        loss.backward()
        ref.backward()
        torch.testing.assert_close(x.grad, x_ref.grad.float(), atol=1e-7, rtol=1e-5)


def test_focal_with_gamma_zero_and_no_alpha_is_cross_entropy_exactly() -> None:
    logits, labels = make_batch("random")
    x_focal = logits.clone().requires_grad_()
    x_ce = logits.clone().requires_grad_()
    focal = FocalLoss(gamma=0.0)(x_focal, labels)
    ce = CrossEntropyLoss()(x_ce, labels)
    assert torch.equal(focal, ce)
    focal.backward()
    ce.backward()
    torch.testing.assert_close(x_focal.grad, x_ce.grad, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("regime", ["random", "confident"])
def test_focal_matches_direct_formula_with_alpha(gamma: float, regime: str) -> None:
    logits, labels = make_batch(regime)
    alpha = torch.linspace(0.25, 1.0, C)
    x = logits.clone().requires_grad_()
    loss = FocalLoss(gamma=gamma, alpha=alpha.tolist(), num_classes=C)(x, labels)
    # -alpha_t (1 - p_t)^gamma log p_t, mean over valid pixels, float64 autograd.
    x_ref = logits.double().requires_grad_()
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    log_p = torch.log_softmax(x_ref, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    per_pixel = -alpha.double()[safe] * (1 - log_p.exp()) ** gamma * log_p
    ref = per_pixel[valid].sum() / valid.sum()
    assert abs(loss.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    loss.backward()
    ref.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, x_ref.grad.float(), atol=1e-7, rtol=1e-4)


def test_focal_gamma_below_one_has_finite_gradient_when_p_rounds_to_one() -> None:
    logits = torch.zeros(1, C, 2, 2)
    logits[:, 0] = 200.0  # p_t == 1 in float32 for label 0
    logits.requires_grad_()
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    loss = FocalLoss(gamma=0.5)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "make_loss",
    [OhemCELoss, CrossEntropyLoss, FocalLoss, StatelessGhmc],
    ids=["ohem", "ce", "focal", "ghm"],
)
@pytest.mark.parametrize("regime", ["random", "confident"])
def test_half_precision_logits_give_float32_loss(dtype, make_loss, regime) -> None:
    logits, labels = make_batch(regime)
    loss_fn = make_loss()
    x = logits.to(dtype).requires_grad_()
    loss = loss_fn(x, labels)
    assert loss.dtype == torch.float32
    # Computed in float32 from the rounded logits: identical to the float32 path on them.
    assert torch.equal(loss, loss_fn(x.detach().float(), labels))
    # And close to the loss of the unrounded logits.
    assert loss.item() == pytest.approx(loss_fn(logits, labels).item(), rel=2e-2, abs=2e-3)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize(
    "make_loss",
    [OhemCELoss, CrossEntropyLoss, FocalLoss, StatelessGhmc],
    ids=["ohem", "ce", "focal", "ghm"],
)
def test_losses_under_cpu_autocast_stay_float32(make_loss) -> None:
    logits, labels = make_batch("random")
    loss_fn = make_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(logits, labels)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, loss_fn(logits, labels))


def test_second_backward_through_the_same_graph_is_refused() -> None:
    # The backward reuses the saved log-softmax buffer in place; autograd must notice.
    logits, labels = make_batch("random")
    x = logits.clone().requires_grad_()
    loss = CrossEntropyLoss()(x, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_forward_works() -> None:
    logits, labels = make_batch("confident")
    with torch.no_grad():
        loss = OhemCELoss()(logits.requires_grad_(), labels)
    assert abs(loss.item() - reference_ohem(logits.detach(), labels)[0].item()) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["random", "confident"])
def test_cuda_losses_match_cpu(regime: str) -> None:
    logits, labels = make_batch(regime, n=2, h=64, w=96)
    for make_loss in (OhemCELoss, CrossEntropyLoss, FocalLoss, StatelessGhmc):
        cpu_x = logits.clone().requires_grad_()
        gpu_x = logits.cuda().requires_grad_()
        cpu_loss = make_loss()(cpu_x, labels)
        gpu_loss = make_loss().cuda()(gpu_x, labels.cuda())
        assert abs(cpu_loss.item() - gpu_loss.item()) < 1e-5
        cpu_loss.backward()
        gpu_loss.backward()
        torch.testing.assert_close(gpu_x.grad.cpu(), cpu_x.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_bad_label_is_reported_without_device_assert() -> None:
    logits, labels = make_batch("random")
    labels[0, 2, 2] = 40
    for loss_fn in (CrossEntropyLoss(), OhemCELoss()):
        with pytest.raises(DatasetError, match="label value 40"):
            for _ in range(3):  # the check is deferred: it reports at a later call
                loss_fn(logits.cuda(), labels.cuda())
                torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("make_loss", [OhemCELoss, CrossEntropyLoss, FocalLoss, GhmcLoss])
def test_cuda_losses_make_no_host_device_sync(make_loss) -> None:
    logits, labels = make_batch("confident", n=2, h=64, w=96)
    x, y = logits.cuda().requires_grad_(), labels.cuda()
    loss_fn = make_loss().cuda()  # GHM-C's bin counts live on the logits' device
    loss_fn(x, y).backward()  # warm-up: first-call allocations are not what is checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn(x, y)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize(
    "make_loss",
    [OhemCELoss, CrossEntropyLoss, FocalLoss, StatelessGhmc],
    ids=["ohem", "ce", "focal", "ghm"],
)
def test_channels_last_logits_give_the_same_loss_and_gradient(make_loss) -> None:
    # The model hands over channels_last outputs on CUDA; strides must not matter.
    logits, labels = make_batch("confident")
    x = logits.clone().requires_grad_()
    x_cl = logits.contiguous(memory_format=torch.channels_last).requires_grad_()
    loss, loss_cl = make_loss()(x, labels), make_loss()(x_cl, labels)
    assert abs(loss.item() - loss_cl.item()) < 1e-6
    loss.backward()
    loss_cl.backward()
    torch.testing.assert_close(x_cl.grad, x.grad, atol=1e-8, rtol=1e-5)

"""GhmcLoss (softmax GHM-C) against a direct, loop-based reading of its definition."""

from __future__ import annotations

import copy

import pytest
import torch

from seg.errors import ConfigError
from seg.losses import CrossEntropyLoss, GhmcLoss, MultiHeadLoss, ghm_pixel_weights

C = 7
IGNORE = 255


def make_batch(seed: int, n: int = 2, h: int = 6, w: int = 8, spread: float = 3.0):
    """Logits float32 N x C x H x W whose p_t covers [0, 1], labels with a few ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n, h, w), generator=gen)
    labels[0, 0, :3] = IGNORE
    logits = spread * torch.randn(n, C, h, w, generator=gen)
    # A random margin for the label: some pixels easy (p_t near 1), some hard.
    margin = 8.0 * torch.rand(n, 1, h, w, generator=gen)
    logits.scatter_add_(1, torch.where(labels == IGNORE, 0, labels).unsqueeze(1), margin)
    return logits, labels


class ReferenceGhmc:
    """GHM-C as the paper and the official code define it, one pixel and one bin at a time.

    Float64; ``acc`` is the list of moving bin counts (the official ``acc_sum``).
    """

    def __init__(self, bins: int, momentum: float) -> None:
        self.bins = bins
        self.momentum = momentum
        self.edges = [float(torch.tensor(i, dtype=torch.float32) / bins) for i in range(bins + 1)]
        self.edges[-1] += 1e-6  # g = 1 belongs to the last region
        self.acc = [0.0] * bins

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor):
        """Returns (loss as a float64 autograd scalar of ``logits``, pixels per region)."""
        log_probs = torch.log_softmax(logits.double(), dim=1)
        pixels = []  # (CE tensor, g)
        for i in range(labels.shape[0]):
            for r in range(labels.shape[1]):
                for c in range(labels.shape[2]):
                    y = int(labels[i, r, c])
                    if y == IGNORE:
                        continue
                    log_p = log_probs[i, y, r, c]
                    pixels.append((-log_p, 1.0 - float(log_p.detach().exp())))
        tot = max(len(pixels), 1)
        region_of = []
        for _, g in pixels:
            hits = [k for k in range(self.bins) if self.edges[k] <= g < self.edges[k + 1]]
            assert len(hits) == 1
            region_of.append(hits[0])
        counts = [region_of.count(k) for k in range(self.bins)]
        beta = [0.0] * self.bins
        nonempty = 0
        for k in range(self.bins):
            if counts[k] > 0:
                if self.momentum > 0:
                    self.acc[k] = self.momentum * self.acc[k] + (1 - self.momentum) * counts[k]
                    beta[k] = tot / self.acc[k]
                else:
                    beta[k] = tot / counts[k]
                nonempty += 1
        if nonempty > 0:
            beta = [b / nonempty for b in beta]
        loss = torch.zeros((), dtype=torch.float64)
        for (ce, _), k in zip(pixels, region_of, strict=True):
            loss = loss + beta[k] * ce
        return loss / tot, counts


@pytest.mark.parametrize(("bins", "momentum"), [(10, 0.0), (10, 0.75), (3, 0.5), (30, 0.75)])
def test_matches_reference_value_gradient_and_moving_counts_over_calls(bins, momentum) -> None:
    ours = GhmcLoss(bins=bins, momentum=momentum)
    ref = ReferenceGhmc(bins, momentum)
    for call, seed in enumerate((0, 1, 2)):
        logits, labels = make_batch(seed, spread=1.0 + call)
        x = logits.clone().requires_grad_()
        x_ref = logits.clone().double().requires_grad_()
        loss, stats = ours.forward_with_stats(x, labels)
        expected, counts = ref(x_ref, labels)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert sum(c > 0 for c in counts) >= 2  # the weighting is really exercised
        assert stats["easy_fraction"].item() == pytest.approx(counts[0] / sum(counts))
        if momentum > 0:
            torch.testing.assert_close(
                ours.bin_counts, torch.tensor(ref.acc, dtype=torch.float32), rtol=1e-6, atol=0
            )
        else:
            assert torch.equal(ours.bin_counts, torch.tensor(counts, dtype=torch.float32))
        loss.backward()
        expected.backward()
        torch.testing.assert_close(x.grad, x_ref.grad.float(), atol=1e-7, rtol=1e-4)


def test_momentum_update_of_the_bin_counts_over_two_calls() -> None:
    m = 0.75
    loss_fn = GhmcLoss(bins=4, momentum=m)
    logits, labels = make_batch(3)
    g = 1 - torch.softmax(logits.double(), 1).gather(1, labels.clamp(max=C - 1)[:, None])
    r1 = torch.histc(g.squeeze(1)[labels != IGNORE], bins=4, min=0, max=1)
    assert (r1 > 0).all()
    loss_fn(logits, labels)
    torch.testing.assert_close(loss_fn.bin_counts, ((1 - m) * r1).float(), rtol=1e-6, atol=0)
    # Second batch: every pixel confident (g ~ 0), so only region 0 is non-empty. It moves
    # towards the batch's count; the empty regions keep theirs.
    confident = torch.zeros(1, C, 4, 4)
    confident[:, 2] = 20.0
    loss_fn(confident, torch.full((1, 4, 4), 2))
    expected = (1 - m) * r1
    expected[0] = m * expected[0] + (1 - m) * 16
    torch.testing.assert_close(loss_fn.bin_counts, expected.float(), rtol=1e-6, atol=0)


def test_single_bin_is_cross_entropy_up_to_the_momentum_scale() -> None:
    logits, labels = make_batch(5)
    x, x_ce = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ghm = GhmcLoss(bins=1, momentum=0.0)(x, labels)
    ce = CrossEntropyLoss()(x_ce, labels)
    assert ghm.item() == pytest.approx(ce.item(), rel=1e-6)  # beta = N / (1 * N) = 1
    ghm.backward()
    ce.backward()
    torch.testing.assert_close(x.grad, x_ce.grad, atol=1e-8, rtol=1e-5)

    # With momentum m and fresh counts A = (1 - m) N: beta = 1 / (1 - m) on the first call;
    # on the second, beta = N2 / (m (1 - m) N1 + (1 - m) N2).
    m = 0.75
    loss_fn = GhmcLoss(bins=1, momentum=m)
    n1 = int((labels != IGNORE).sum())
    assert loss_fn(logits, labels).item() == pytest.approx(ce.item() / (1 - m), rel=1e-6)
    logits2, labels2 = make_batch(6)
    labels2[1, :2] = IGNORE
    n2 = int((labels2 != IGNORE).sum())
    ce2 = CrossEntropyLoss()(logits2, labels2).item()
    beta = n2 / (m * (1 - m) * n1 + (1 - m) * n2)
    assert loss_fn(logits2, labels2).item() == pytest.approx(beta * ce2, rel=1e-6)


def test_all_ignored_gives_zero_finite_gradients_and_keeps_the_counts() -> None:
    loss_fn = GhmcLoss()
    loss_fn(*make_batch(0))
    before = loss_fn.bin_counts.clone()
    logits = torch.randn(2, C, 5, 5, requires_grad=True)
    loss, stats = loss_fn.forward_with_stats(logits, torch.full((2, 5, 5), IGNORE))
    assert loss.item() == 0.0 and stats["easy_fraction"].item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.equal(loss_fn.bin_counts, before)


def test_state_dict_round_trip_resumes_exactly() -> None:
    batches = [make_batch(seed, spread=1.0 + seed) for seed in range(4)]
    uninterrupted = GhmcLoss()
    values = [uninterrupted(*batch) for batch in batches]
    assert "bin_counts" in uninterrupted.state_dict()

    interrupted = GhmcLoss()
    for batch in batches[:2]:
        interrupted(*batch)
    saved = copy.deepcopy(interrupted.state_dict())
    resumed = GhmcLoss()
    resumed.load_state_dict(saved)
    for batch, value in zip(batches[2:], values[2:], strict=True):
        assert torch.equal(resumed(*batch), value)
    assert torch.equal(resumed.bin_counts, uninterrupted.bin_counts)
    # Without the saved counts the value differs: the state is what makes resume exact.
    assert not torch.equal(GhmcLoss()(*batches[2]), values[2])


def test_each_head_keeps_its_own_counts_in_the_multi_head_state_dict() -> None:
    loss = MultiHeadLoss({h: {"loss": GhmcLoss()} for h in ("main", "aux2")})
    logits, labels = make_batch(0)
    out = loss({"main": logits, "aux2": 0.1 * logits}, labels)
    assert set(out.stats) == {"main/easy_fraction", "aux2/easy_fraction"}
    state = loss.state_dict()
    assert set(state) == {"losses.main.bin_counts", "losses.aux2.bin_counts"}
    assert not torch.equal(state["losses.main.bin_counts"], state["losses.aux2.bin_counts"])


def test_weights_need_no_data_dependent_host_read() -> None:
    # On meta tensors any .item(), bool() or data-dependent shape would raise: the weight
    # computation runs on shapes alone, so it makes no host-device sync on CUDA either.
    n, h, w, bins = 2, 4, 5, 10
    weights, counts, easy = ghm_pixel_weights(
        torch.empty(n, h, w, device="meta"),
        torch.empty(n, h, w, dtype=torch.bool, device="meta"),
        torch.empty(bins, device="meta"),
        torch.empty(bins - 1, device="meta"),
        0.75,
    )
    assert weights.shape == (n, h, w) and counts.shape == (bins,) and easy.shape == ()
    assert weights.dtype == counts.dtype == easy.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bins": 0}, "bins must be an integer >= 1"),
        ({"bins": 2.5}, "bins must be an integer >= 1"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        GhmcLoss(**kwargs)


def test_counts_on_another_device_than_the_logits_is_one_clear_error() -> None:
    logits = torch.empty(1, C, 4, 4, device="meta")
    labels = torch.zeros(1, 4, 4, dtype=torch.long, device="meta")
    with pytest.raises(ConfigError, match=r"move the loss to the model's device"):
        GhmcLoss()(logits, labels)

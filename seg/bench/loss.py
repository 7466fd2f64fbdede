"""Loss benchmark: forward + backward time of OHEM and focal loss against plain cross-entropy.

Two regimes, each timed side by side (interleaved) in one run:
- ``random``: random logits, so nearly every pixel is hard and OHEM keeps the loss > -log(0.7)
  pixels (its threshold path);
- ``confident``: logits that favour the label strongly on all but a few pixels, so fewer than
  n_min pixels are hard and OHEM takes its top-n_min path.
Ratios divide by our ``CrossEntropyLoss`` (what ``loss=ce`` trains with); ``torch_ce``
(``F.cross_entropy``) is shown for reference. ``ohem`` selects its pixels the way the trainer
does on this device (``selection="auto"``: host counts on CPU, sync-free on CUDA); the row
``ohem[device]`` (CPU) or ``ohem[host]`` (CUDA) times the other way, side by side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from seg.bench.timing import BenchOptions, Section, ratio, time_side_by_side
from seg.losses import CrossEntropyLoss, FocalLoss, OhemCELoss
from seg.tables import markdown_table

FULL_SHAPE = (8, 19, 512, 512)  # N, C, H, W
QUICK_SHAPE = (2, 19, 64, 128)
IGNORED_ROWS = 0.05  # a band of ignored rows at the bottom, like a car bonnet (label 255)
WRONG_FRACTION = 0.02  # confident regime: pixels confidently assigned to a wrong class


def make_batch(
    regime: str, shape: tuple[int, int, int, int], device: str, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits float32 N x C x H x W (requires grad) and labels int64 N x H x W for a regime."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    labels[:, h - max(1, int(h * IGNORED_ROWS)) :, :] = 255
    if regime == "random":
        logits = torch.randn(shape, generator=gen)
    elif regime == "confident":
        logits = 0.5 * torch.randn(shape, generator=gen)
        target = torch.where(labels == 255, 0, labels)
        wrong = torch.rand((n, h, w), generator=gen) < WRONG_FRACTION
        target = torch.where(wrong, (target + 1) % c, target)
        logits.scatter_add_(1, target.unsqueeze(1), torch.full((n, 1, h, w), 8.0))
    else:
        raise ValueError(f"unknown regime {regime!r}; use 'random' or 'confident'")
    return logits.to(device).requires_grad_(), labels.to(device)


def _step(loss_fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, labels: Tensor):
    def run_once() -> None:
        loss_fn(logits, labels).backward()
        logits.grad = None

    return run_once


def _torch_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, ignore_index=255)


def run(options: BenchOptions) -> Section:
    """Time forward + backward of ce, ohem, focal and torch's cross_entropy in both regimes."""
    shape = QUICK_SHAPE if options.quick else FULL_SHAPE
    repeats = min(options.repeats, 3) if options.quick else options.repeats
    warmup = min(options.warmup, 1) if options.quick else options.warmup
    rows = []
    records = []
    for regime in ("random", "confident"):
        logits, labels = make_batch(regime, shape, options.device)
        other = "device" if torch.device(options.device).type == "cpu" else "host"
        losses = {
            "ce": CrossEntropyLoss(),
            "ohem": OhemCELoss(),
            f"ohem[{other}]": OhemCELoss(selection=other),
            "focal": FocalLoss(),
            "torch_ce": _torch_ce,
        }
        _, stats = losses["ohem"].forward_with_stats(logits.detach(), labels)
        kept = float(stats["kept_fraction"])
        timings = time_side_by_side(
            {name: _step(fn, logits, labels) for name, fn in losses.items()},
            repeats=repeats,
            warmup=warmup,
            device=options.device,
        )
        for name, timing in timings.items():
            vs_ce = ratio(timing, timings["ce"])
            vs_torch = ratio(timing, timings["torch_ce"])
            rows.append([regime, name, timing.median_ms, vs_ce, vs_torch])
            timing.extra = {
                "regime": regime,
                "shape": list(shape),
                "device": options.device,
                "ratio_vs_ce": vs_ce,
                "ratio_vs_torch_ce": vs_torch,
                "ohem_kept_fraction": kept,
            }
            records.append(timing.as_dict())
        rows.append([regime, "(ohem kept fraction)", kept, "", ""])
    header = ["regime", "loss", "fwd+bwd ms (median)", "x ce", "x torch_ce"]
    title = f"Losses: forward + backward on {'x'.join(map(str, shape))} logits ({options.device})"
    return Section(title=title, markdown=markdown_table(header, rows), records=records)

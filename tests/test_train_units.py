"""Unit tests of the trainer's parts: schedule, optimizer groups, AMP choice, the skipping
step, running statistics, RNG state and run-folder helpers."""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from seg.engine.amp import build_grad_scaler, resolve_amp
from seg.engine.build import (
    dataset_palette,
    parse_settings,
    per_rank_batch,
    use_channels_last,
    use_cudnn_benchmark,
)
from seg.engine.optim import build_sgd, is_fused, split_decay_params
from seg.engine.schedule import WarmupPolyLR
from seg.engine.state import capture_rng_state, find_auto_resume, resolve_resume, restore_rng_state
from seg.engine.step import RunningStats, StepOutput, TrainStep
from seg.errors import ConfigError
from seg.losses import LossOutput


# ------------------------------------------------------------------------------ schedule
def _optimizer(lr: float = 0.05) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def test_warmup_poly_values() -> None:
    opt = _optimizer(0.05)
    sched = WarmupPolyLR(opt, max_iters=100, power=0.9, warmup_iters=10, warmup_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.05 * 0.1)  # warm-up starts at ratio * lr (poly(0) = 1)
    assert lrs[5] == pytest.approx(0.05 * (0.1 + 0.9 * 0.5) * 0.95**0.9)
    assert lrs[10] == pytest.approx(0.05 * 0.9**0.9)  # warm-up over, pure poly
    assert lrs[99] == pytest.approx(0.05 * 0.01**0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # reaches 0 at max_iters
    assert all(b < a for a, b in itertools.pairwise(lrs[10:]))


def test_exp_warmup_and_min_lr() -> None:
    opt = _optimizer(1.0)
    sched = WarmupPolyLR(
        opt, max_iters=10, warmup_iters=4, warmup="exp", warmup_ratio=0.01, min_lr=0.1
    )
    assert sched.lr_at(0, 1.0) == pytest.approx(0.01)
    assert sched.lr_at(2, 1.0) == pytest.approx(0.1 * (0.9 * 0.8**0.9 + 0.1))
    assert sched.lr_at(10, 1.0) == pytest.approx(0.1)


def test_schedule_state_round_trip_and_bad_values() -> None:
    opt = _optimizer()
    sched = WarmupPolyLR(opt, max_iters=50, warmup_iters=5)
    for _ in range(7):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = _optimizer()
    sched2 = WarmupPolyLR(opt2, max_iters=50, warmup_iters=5)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert "max_iters" not in state  # settings come from the config
    longer = WarmupPolyLR(_optimizer(), max_iters=200, warmup_iters=5)
    longer.load_state_dict(state)  # resuming with a larger trainer.max_iters extends the run
    assert longer.last_epoch == 7 and longer.max_iters == 200
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(longer.lr_at(7, 0.05))
    with pytest.raises(ConfigError, match="warmup"):
        WarmupPolyLR(_optimizer(), max_iters=10, warmup="cosine")
    with pytest.raises(ConfigError, match="max_iters"):
        WarmupPolyLR(_optimizer(), max_iters=0)


# ----------------------------------------------------------------------------- optimizer
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 5, 1)  # weight + bias

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.head(torch.relu(self.bn(self.conv(x))))}


def test_no_weight_decay_on_norm_layers_and_biases() -> None:
    net = _Net()
    decay, no_decay = split_decay_params(net)
    assert {id(p) for p in decay} == {id(net.conv.weight), id(net.head.weight)}
    assert {id(p) for p in no_decay} == {id(net.bn.weight), id(net.bn.bias), id(net.head.bias)}
    opt = build_sgd(net, lr=0.1, weight_decay=5e-4)
    wds = sorted(g["weight_decay"] for g in opt.param_groups)
    assert wds == [0.0, 5e-4]
    assert is_fused(opt)  # CPU and CUDA have the fused kernel
    assert not is_fused(build_sgd(net, lr=0.1, impl="foreach"))
    with pytest.raises(ConfigError, match=r"optim\.impl"):
        build_sgd(net, lr=0.1, impl="fastest")
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        build_sgd(net, lr=0.0)


@pytest.mark.parametrize("impl", ["fused", "foreach", "plain"])
def test_eager_momentum_buffers_match_torch_sgd(impl: str) -> None:
    """Zero-initialised momentum buffers give exactly PyTorch's updates."""
    torch.manual_seed(0)
    net_a = _Net()
    net_b = _Net()
    net_b.load_state_dict(net_a.state_dict())
    ours = build_sgd(net_a, lr=0.1, momentum=0.9, weight_decay=0.01, impl=impl)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}
    ref = torch.optim.SGD(
        net_b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, **flags[impl]
    )
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for net, opt in ((net_a, ours), (net_b, ref)):
            opt.zero_grad()
            net(x)["main"].square().mean().backward()
            if net is net_b:  # the reference decays every parameter: undo for the no-decay ones
                for p in (net_b.bn.weight, net_b.bn.bias, net_b.head.bias):
                    p.grad.sub_(0.01 * p.detach())
            opt.step()
    for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ amp
def test_amp_auto_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: fp16 on CUDA; bf16 on a CPU with native bfloat16, float32 on one without."""
    assert resolve_amp("auto", "cuda").dtype is torch.float16
    assert resolve_amp("auto", "cuda").use_scaler
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    native = resolve_amp("auto", "cpu")
    assert (native.name, native.use_scaler, native.requested) == ("bf16", False, "auto")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_amp("auto", "cpu").name == "fp32"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_amp("auto", "cpu").name == "fp32"  # a torch without the probes: float32


def test_amp_resolution() -> None:
    cpu16 = resolve_amp("fp16", "cpu")
    assert cpu16.dtype is None and not cpu16.use_scaler and cpu16.name == "fp32"
    cpu_bf16 = resolve_amp("bf16", "cpu")
    assert cpu_bf16.dtype is torch.bfloat16 and not cpu_bf16.use_scaler
    assert resolve_amp("off", "cpu").dtype is None
    gpu16 = resolve_amp("fp16", "cuda")
    assert gpu16.dtype is torch.float16 and gpu16.use_scaler
    gpu_bf16 = resolve_amp("bf16", "cuda")
    assert gpu_bf16.dtype is torch.bfloat16 and not gpu_bf16.use_scaler
    assert not build_grad_scaler(cpu16).is_enabled()
    with pytest.raises(ConfigError, match=r"trainer\.amp"):
        resolve_amp("fp8", "cpu")


def test_device_tuning_switches() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_channels_last("auto", cpu) and use_channels_last("auto", cuda)
    assert not use_channels_last(False, cuda)
    assert use_cudnn_benchmark("auto", cuda) and not use_cudnn_benchmark("auto", cpu)
    assert not use_cudnn_benchmark(True, cpu)  # no cuDNN on CPU, whatever is asked
    assert not use_cudnn_benchmark(False, cuda)
    with pytest.raises(ConfigError, match=r"trainer\.cudnn_benchmark"):
        use_cudnn_benchmark("yes", cuda)
    with pytest.raises(ConfigError, match=r"trainer\.channels_last"):
        use_channels_last("on", cpu)


# ------------------------------------------------------------------------ skipping step
class _ToggleLoss(nn.Module):
    """Mean squared logits, times NaN while ``poison`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> LossOutput:
        total = outputs["main"].float().square().mean()
        if self.poison:
            total = total * float("nan")
        return LossOutput(total, {"main": total}, {"main/kept_fraction": torch.tensor(0.5)})


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [t.clone() for t in net.state_dict().values()]
    state += [s["momentum_buffer"].clone() for s in opt.state.values()]
    return state


def _check_nonfinite_step_changes_nothing(impl: str, amp_mode: str, device: str) -> None:
    torch.manual_seed(0)
    net = _Net().to(device)
    opt = build_sgd(net, lr=0.1, impl=impl)
    sched = WarmupPolyLR(opt, max_iters=10, warmup_iters=0)
    amp = resolve_amp(amp_mode, device)
    loss = _ToggleLoss()
    step = TrainStep(
        net, loss, opt, sched, build_grad_scaler(amp), amp, [0.5] * 3, [0.25] * 3,
        torch.device(device), channels_last=device != "cpu", buffers_of=net,
    )  # fmt: skip
    batch = {
        "image": torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8),
        "label": torch.zeros(2, 8, 8, dtype=torch.uint8),
    }
    assert not bool(step(batch).skipped)
    before = _snapshot(net, opt)
    loss.poison = True
    out = step(batch)
    assert bool(out.skipped)
    after = _snapshot(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # BN stats too
    loss.poison = False
    assert not bool(step(batch).skipped)
    assert not all(torch.equal(a, b) for a, b in zip(after, _snapshot(net, opt), strict=True))
    assert sched.last_epoch == 3  # the schedule counts skipped iterations


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("amp_mode", ["off", "bf16"])
def test_nonfinite_step_changes_nothing(impl: str, amp_mode: str) -> None:
    _check_nonfinite_step_changes_nothing(impl, amp_mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("amp_mode", ["fp16", "bf16"])
def test_nonfinite_step_changes_nothing_on_cuda(impl: str, amp_mode: str) -> None:
    """fp16: the GradScaler skips the step; bf16: the fused kernel's found_inf (or a sync)."""
    _check_nonfinite_step_changes_nothing(impl, amp_mode, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_kind", ["ohem", "ce"])
@pytest.mark.parametrize("amp_mode", ["fp16", "bf16"])
def test_cuda_train_step_makes_no_host_device_sync(loss_kind: str, amp_mode: str) -> None:
    """The whole tuned step (BiSeNetV2, five heads, GradScaler, fused SGD) never waits."""
    from seg.bench.train_step import Variant, build_step, make_batch
    from seg.models.bisenetv2 import BiSeNetV2

    step = build_step(
        Variant("t", loss=loss_kind, amp=amp_mode), "cuda", BiSeNetV2(19).state_dict()
    )
    batch = make_batch((2, 128, 256), "cuda")
    for _ in range(2):  # warm-up: cuDNN autotuning and first allocations are not checked
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(out.skipped)


def test_running_stats_skip_bad_steps_and_track_streaks() -> None:
    stats = RunningStats(torch.device("cpu"))

    def add(value: float) -> None:
        total = torch.tensor(value)
        stats.add(
            StepOutput(
                total, {"main": total}, {"main/kept": torch.tensor(0.25)}, ~torch.isfinite(total)
            )
        )

    for value in (1.0, float("nan"), 3.0, float("nan"), float("inf"), float("nan"), 5.0):
        add(value)
    values = stats.flush()
    assert values["loss"] == pytest.approx(3.0) and values["loss/main"] == pytest.approx(3.0)
    assert values["main/kept"] == pytest.approx(0.25)
    assert values["nonfinite_steps"] == 4 and values["max_nonfinite_streak"] == 3
    add(float("nan"))
    assert stats.read_max_streak() == 1
    values = stats.flush()
    assert math.isnan(values["loss"]) and values["nonfinite_steps"] == 5


# ------------------------------------------------------------------------------ RNG state
def test_rng_state_round_trips_through_weights_only_load() -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ------------------------------------------------------------------------- run helpers
def _settings_cfg(**trainer: object) -> DictConfig:
    base = {"max_iters": 10, "eval_interval": 5, "ckpt_interval": 5, "log_interval": 1}
    return OmegaConf.create(
        {"trainer": {**base, "device": "cpu", **trainer}, "loader": {"batch_size": 2}}
    )


def test_trainer_settings_reject_bad_intervals() -> None:
    settings = parse_settings(_settings_cfg())
    assert (settings.max_iters, settings.eval_interval, settings.batch_per_rank) == (10, 5, 2)
    with pytest.raises(ConfigError, match=r"trainer\.eval_interval must be >= 1, got 0"):
        parse_settings(_settings_cfg(eval_interval=0))
    with pytest.raises(ConfigError, match=r"trainer\.max_nonfinite_steps"):
        parse_settings(_settings_cfg(max_nonfinite_steps=0))


def test_per_rank_batch() -> None:
    assert per_rank_batch(16, 4) == 4
    with pytest.raises(ConfigError, match=r"loader\.batch_size=6"):
        per_rank_batch(6, 4)


def test_auto_resume_picks_newest_last_pt(tmp_path: Path) -> None:
    """Among runs with this config, the newest (issue 16: runs with another config are
    never taken; tests/test_resume.py checks that)."""
    from seg.checkpoint import save_checkpoint

    config = {"seed": 0, "trainer": {"max_iters": 10}}
    outputs = tmp_path / "outputs" / "exp"
    new_run = outputs / "2026-01-03_00-00-00"
    new_run.mkdir(parents=True)
    assert find_auto_resume(new_run, config).path is None
    paths = []
    for i, name in enumerate(["2026-01-01_00-00-00", "2026-01-02_00-00-00"]):
        path = outputs / name / "checkpoints" / "last.pt"
        save_checkpoint(path, {"config": config, "iteration": 3})
        os.utime(path, (time.time() + i, time.time() + i))
        paths.append(path)
    assert find_auto_resume(new_run, config).path == paths[1]
    assert resolve_resume("auto", new_run, config).path == paths[1]
    assert resolve_resume(None, new_run, config).path is None
    with pytest.raises(ConfigError, match="resume="):
        resolve_resume(str(tmp_path / "missing.pt"), new_run, config)


# ------------------------------------------------------------------------- loss state
def test_loss_state_is_checkpointed_and_kept_by_skipped_steps() -> None:
    """GHM-C's moving bin counts go into checkpoints and come back on restore, and a skipped
    (non-finite) step leaves them as they were, like the BatchNorm statistics."""
    from seg.engine.state import TrainState, checkpoint_payload, restore
    from seg.losses import GhmcLoss, MultiHeadLoss

    def make() -> tuple[nn.Module, TrainStep]:
        torch.manual_seed(0)
        net = _Net()
        opt = build_sgd(net, lr=0.1, impl="fused")
        amp = resolve_amp("off", "cpu")
        loss = MultiHeadLoss({"main": {"loss": GhmcLoss(num_classes=5)}})
        step = TrainStep(
            net, loss, opt, WarmupPolyLR(opt, max_iters=10, warmup_iters=0),
            build_grad_scaler(amp), amp, [0.5] * 3, [0.25] * 3, torch.device("cpu"),
            channels_last=False, buffers_of=[net, loss],
        )  # fmt: skip
        return net, step

    batch = {
        "image": torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8),
        "label": torch.randint(0, 5, (2, 8, 8), dtype=torch.uint8),
    }
    net, step = make()
    step(batch)
    counts = step.criterion.state_dict()["losses.main.bin_counts"].clone()
    assert counts.sum() > 0
    payload = checkpoint_payload(net, step, TrainState(iteration=1), {})
    assert torch.equal(payload["loss"]["losses.main.bin_counts"], counts)

    net2, step2 = make()
    restore(payload, Path("ckpt.pt"), net2, step2)
    assert torch.equal(step2.criterion.state_dict()["losses.main.bin_counts"], counts)

    with torch.no_grad():  # NaN weights make the loss non-finite: the step is skipped
        next(net2.parameters()).fill_(float("nan"))
    assert bool(step2(batch).skipped)
    assert torch.equal(step2.criterion.state_dict()["losses.main.bin_counts"], counts)


def test_lr_multipliers_by_top_level_module() -> None:
    net = _Net()
    opt = build_sgd(net, lr=0.1, weight_decay=1e-4, lr_mult={"head": 10})
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert by_param[id(net.head.weight)] == (pytest.approx(1.0), 1e-4)
    assert by_param[id(net.head.bias)] == (pytest.approx(1.0), 0.0)
    assert by_param[id(net.conv.weight)] == (pytest.approx(0.1), 1e-4)
    assert by_param[id(net.bn.weight)] == (pytest.approx(0.1), 0.0)
    assert len(by_param) == len(list(net.parameters()))
    with pytest.raises(ConfigError, match=r"optim\.lr_mult names \['heads'\]"):
        build_sgd(net, lr=0.1, lr_mult={"heads": 10})
    with pytest.raises(ConfigError, match=r"optim\.lr_mult\.head must be > 0"):
        build_sgd(net, lr=0.1, lr_mult={"head": 0})


def test_poly_after_warmup_starts_the_decay_at_the_end_of_the_warmup() -> None:
    opt = _optimizer(1.0)
    sched = WarmupPolyLR(
        opt, max_iters=110, warmup_iters=10, warmup="exp", warmup_ratio=0.1, poly_after_warmup=True
    )
    assert sched.lr_at(0, 1.0) == pytest.approx(0.1)
    assert sched.lr_at(10, 1.0) == pytest.approx(1.0)  # exactly the base rate after warm-up
    assert sched.lr_at(60, 1.0) == pytest.approx(0.5**0.9)
    assert sched.lr_at(110, 1.0) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="poly_after_warmup"):
        WarmupPolyLR(_optimizer(), max_iters=10, warmup_iters=10, poly_after_warmup=True)


def test_a_dataset_without_palette_gets_the_generated_one() -> None:
    """A folder dataset may set palette: null; the val panels then use the colours that eval,
    predict and export generate (the run used to stop at its first evaluation)."""
    from seg.visualize import generated_palette, palette_array

    plain = dataset_palette(OmegaConf.create({"num_classes": 3, "palette": None}))
    assert plain == generated_palette(3) and palette_array(plain).shape == (256, 3)
    given = OmegaConf.create({"num_classes": 2, "palette": [[1, 2, 3], [4, 5, 6]]})
    assert dataset_palette(given) == [[1, 2, 3], [4, 5, 6]]

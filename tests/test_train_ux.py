"""Unit tests of the day-to-day training features: gradient accumulation, the EMA of the
weights (update, checkpoint round trip, use by evaluation and inference loading),
iteration snapshots, the TensorBoard layout and HPARAMS entry, the progress bars."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from seg.engine.amp import build_grad_scaler, resolve_amp
from seg.engine.build import ema_settings, parse_settings
from seg.engine.ema import EmaSettings, ModelEma
from seg.engine.logging import (
    BEST_MIOU_TAG,
    HEAD_LOSS_TAG,
    LOSS_TAG,
    MIOU_TAG,
    RunLog,
    TensorBoardLog,
    train_tag,
)
from seg.engine.optim import build_sgd
from seg.engine.schedule import WarmupPolyLR
from seg.engine.state import TrainState, checkpoint_payload, restore
from seg.engine.step import RunningStats, TrainStep
from seg.errors import ConfigError
from seg.losses import LossOutput

MEAN, STD = [0.5] * 3, [0.25] * 3


class _Net(nn.Module):
    """conv - BatchNorm - ReLU - 1x1 classifier (5 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.head(torch.relu(self.bn(self.conv(x))))}


class _CrossEntropy(nn.Module):
    """Mean cross-entropy over every pixel (no ignored pixels), times NaN when ``poison``."""

    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> LossOutput:
        total = nn.functional.cross_entropy(outputs["main"].float(), labels)
        if self.poison:
            total = total * float("nan")
        return LossOutput(total, {"main": total}, {"main/stat": total.detach() * 0 + 0.5})


def _step(net: nn.Module, ema: ModelEma | None = None, loss: nn.Module | None = None) -> TrainStep:
    opt = build_sgd(net, lr=0.1, momentum=0.9, weight_decay=1e-3, impl="fused")
    amp = resolve_amp("off", "cpu")
    return TrainStep(
        net, loss or _CrossEntropy(), opt, WarmupPolyLR(opt, max_iters=20, warmup_iters=2),
        build_grad_scaler(amp), amp, MEAN, STD, torch.device("cpu"), channels_last=False,
        buffers_of=net, ema=ema,
    )  # fmt: skip


def _batches(count: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (size, 8, 8, 3), dtype=torch.uint8, generator=gen),
            "label": torch.randint(0, 5, (size, 8, 8), dtype=torch.uint8, generator=gen),
        }
        for _ in range(count)
    ]


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    """Bit-identical state dicts (weights and buffers)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _halves(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    half = batch["image"].shape[0] // 2
    return [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]


# ----------------------------------------------------------------------- accumulation
def test_accumulating_two_half_batches_equals_one_full_batch() -> None:
    """K=2 at batch 2 gives the weights of K=1 at batch 4 (BatchNorm in eval mode, so that
    its statistics do not depend on how the batch is split): three SGD steps with momentum
    and weight decay, to float tolerance."""
    torch.manual_seed(0)
    full, accumulated = _Net(), _Net()
    accumulated.load_state_dict(full.state_dict())
    full.bn.eval(), accumulated.bn.eval()
    step_full, step_accumulated = _step(full), _step(accumulated)
    for batch in _batches(3, 4):
        out_full = step_full(batch)
        out_accumulated = step_accumulated(_halves(batch))
        # The reported loss is the mean over the micro-batches: the full batch's mean here.
        torch.testing.assert_close(out_accumulated.total, out_full.total, rtol=1e-6, atol=1e-7)
    assert step_accumulated.scheduler.last_epoch == 3  # one schedule step per optimizer step
    torch.manual_seed(0)
    assert not torch.equal(full.conv.weight, _Net().conv.weight)  # the steps trained
    for name, value in full.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_accumulation_with_train_mode_batchnorm_differs_as_documented() -> None:
    """With BatchNorm in train mode each micro-batch is normalised by its own statistics
    and moves the running statistics once: the weights differ from one full batch."""
    torch.manual_seed(0)
    full, accumulated = _Net(), _Net()
    accumulated.load_state_dict(full.state_dict())
    (batch,) = _batches(1, 4)
    _step(full)(batch)
    _step(accumulated)(_halves(batch))
    assert int(accumulated.bn.num_batches_tracked) == 2 and int(full.bn.num_batches_tracked) == 1
    assert not torch.allclose(full.bn.running_mean, accumulated.bn.running_mean, atol=1e-4)
    assert not torch.equal(full.conv.weight, accumulated.conv.weight)


def test_a_nonfinite_micro_batch_skips_the_whole_step() -> None:
    torch.manual_seed(0)
    net = _Net()
    loss = _CrossEntropy()
    step = _step(net, loss=loss)
    batches = _batches(4, 2)
    step(batches[:2])
    before = [t.clone() for t in net.state_dict().values()]

    class SecondPoisoned(nn.Module):  # the first micro-batch is fine, the second is NaN
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> LossOutput:
            self.calls += 1
            loss.poison = self.calls == 2
            return loss(outputs, labels)

    step.criterion = SecondPoisoned()
    out = step(batches[2:])
    assert bool(out.skipped)
    after = list(net.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # BN stats too


def test_trainer_settings_for_accumulation_snapshots_and_ema() -> None:
    base = {"max_iters": 10, "eval_interval": 5, "ckpt_interval": 5, "log_interval": 1}

    def parse(**trainer: object) -> Any:
        cfg = {"trainer": {**base, "device": "cpu", **trainer}, "loader": {"batch_size": 4}}
        return parse_settings(OmegaConf.create(cfg))

    defaults = parse()
    assert (defaults.accumulate, defaults.keep_snapshots, defaults.ema) == (1, 0, None)
    settings = parse(accumulate=3, keep_snapshots=2, ema={"decay": 0.99, "every": 2})
    assert settings.global_batch == 12 and settings.batch_per_rank == 4
    assert settings.keep_snapshots == 2
    assert settings.ema == EmaSettings(decay=0.99, every=2, warmup=True)
    assert parse(ema={"decay": None, "every": 1}).ema is None  # the shipped default: off
    for bad, key in [
        ({"accumulate": 0}, r"trainer\.accumulate"),
        ({"keep_snapshots": -1}, r"trainer\.keep_snapshots"),
        ({"ema": {"decay": 1.0}}, r"trainer\.ema\.decay"),
        ({"ema": {"decay": 0.9, "every": 0}}, r"trainer\.ema\.every"),
        ({"ema": {"decay": 0.9, "rate": 2}}, r"trainer\.ema has unknown keys \['rate'\]"),
        ({"ema": 0.9}, r"trainer\.ema must be null or"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse(**bad)
    assert ema_settings(None) is None


# -------------------------------------------------------------------------------- EMA
def test_ema_follows_the_formula_for_weights_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    net = _Net()
    ema = ModelEma(net, EmaSettings(decay=0.9, every=2, warmup=False))
    expected = {k: v.clone().float() for k, v in net.state_dict().items()}
    step = _step(net, ema=ema)
    for index, batch in enumerate(_batches(6, 2)):
        step(batch)
        if (index + 1) % 2 == 0:  # every second optimizer step
            for key, value in net.state_dict().items():
                if value.is_floating_point():
                    expected[key] = 0.9 * expected[key] + 0.1 * value
                else:
                    expected[key] = value.clone()
    assert (ema.steps, ema.updates) == (6, 3)
    averaged = ema.model.state_dict()
    assert "bn.running_mean" in averaged and "bn.running_var" in averaged
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key].float(), value.float(), rtol=1e-6, atol=1e-7)
    # The integer counter is copied, not averaged.
    assert int(ema.model.bn.num_batches_tracked) == int(net.bn.num_batches_tracked) == 6
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_warmup_lowers_the_early_decay() -> None:
    ema = ModelEma(_Net(), EmaSettings(decay=0.999, warmup=True))
    assert ema.decay() == pytest.approx(1 / 10)
    ema.updates = 90
    assert ema.decay() == pytest.approx(91 / 100)
    ema.updates = 10**6
    assert ema.decay() == pytest.approx(0.999)
    assert ModelEma(_Net(), EmaSettings(decay=0.999, warmup=False)).decay() == 0.999


def _roundtrip(payload: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_ema_is_checkpointed_and_restored_exactly() -> None:
    """Save after 3 steps, restore into fresh parts, take 3 more steps on both: the EMA (and
    the weights) are bit-identical; a checkpoint without EMA restarts it from the weights."""
    settings = EmaSettings(decay=0.8, every=1, warmup=True)

    def make() -> tuple[nn.Module, TrainStep]:
        torch.manual_seed(0)
        net = _Net()
        return net, _step(net, ema=ModelEma(net, settings))

    batches = _batches(6, 2)
    net_a, step_a = make()
    for batch in batches[:3]:
        step_a(batch)
    payload = _roundtrip(checkpoint_payload(net_a, step_a, TrainState(iteration=3), {}))
    assert payload["ema"]["updates"] == 3 and payload["ema"]["decay"] == 0.8
    net_b, step_b = make()
    restore(payload, Path("ckpt.pt"), net_b, step_b)
    assert (step_b.ema.steps, step_b.ema.updates) == (3, 3)
    for batch in batches[3:]:
        step_a(batch)
        step_b(batch)
    for key, value in step_a.ema.model.state_dict().items():
        assert torch.equal(step_b.ema.model.state_dict()[key], value), key
    assert weights_equal(net_a, net_b)

    without = {k: v for k, v in payload.items() if k != "ema"}
    net_c, step_c = make()
    restore(without, Path("ckpt.pt"), net_c, step_c)
    assert step_c.ema.updates == 0
    for key, value in net_c.state_dict().items():
        assert torch.equal(step_c.ema.model.state_dict()[key], value), key


def test_evaluation_scores_the_ema_and_inference_loads_it(tmp_path: Path) -> None:
    """The loop's evaluation gets ``parts.eval_model`` (the EMA when on), and a checkpoint
    with ``"ema"`` gives eval/predict/export its averaged weights (``ema=False``: raw)."""
    from seg.checkpoint import save_checkpoint
    from seg.engine.build import TrainParts
    from seg.engine.load import load_inference_model
    from seg.models.bisenetv2 import BiSeNetV2

    torch.manual_seed(0)
    net = _Net()
    ema = ModelEma(net, EmaSettings(decay=0.5))
    parts = SimpleNamespace(step=SimpleNamespace(ema=ema), model=net)
    assert TrainParts.eval_model.fget(parts) is ema.model
    parts.step.ema = None
    assert TrainParts.eval_model.fget(parts) is net

    raw, averaged = BiSeNetV2(3, aux_heads=False), BiSeNetV2(3, aux_heads=False)
    config = {
        "model": {"_target_": "seg.models.bisenetv2.BiSeNetV2", "num_classes": 3},
        "dataset": {"num_classes": 3, "mean": MEAN, "std": STD},
    }
    path = tmp_path / "last.pt"
    payload = {"model": raw.state_dict(), "config": config, "ema": {"model": averaged.state_dict()}}
    save_checkpoint(path, payload)
    loaded = load_inference_model(path)
    assert loaded.weights == "ema"
    for key, value in averaged.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    plain = load_inference_model(path, ema=False)
    assert plain.weights == "model"
    assert torch.equal(
        plain.model.state_dict()["head.classifier.weight"], raw.head.classifier.weight
    )
    del payload["ema"]
    save_checkpoint(path, payload)
    assert load_inference_model(path).weights == "model"


# ------------------------------------------------------------------------- snapshots
def _save_parts(tmp_path: Path, keep: int) -> tuple[SimpleNamespace, TrainState, RunningStats]:
    torch.manual_seed(0)
    net = _Net()
    parts = SimpleNamespace(
        settings=SimpleNamespace(keep_snapshots=keep),
        model=net,
        step=_step(net),
        config={},
        dataset_templates={},
    )
    return parts, TrainState(), RunningStats(torch.device("cpu"))


def test_snapshots_keep_the_last_n_and_never_delete_before_the_new_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seg.checkpoint import load_checkpoint
    from seg.engine import loop

    parts, state, stats = _save_parts(tmp_path, keep=2)
    folder = tmp_path / "checkpoints"
    for iteration in (150, 300, 450):
        state.iteration = iteration
        loop.save(parts, state, stats, tmp_path, "last.pt", snapshot=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["iter_000300.pt", "iter_000450.pt", "last.pt"]
    assert load_checkpoint(folder / "iter_000300.pt")["iteration"] == 300
    loop.save(parts, state, stats, tmp_path, "best.pt")  # not a snapshot time: no snapshot
    assert len(list(folder.glob("iter_*.pt"))) == 2

    real_save = loop.save_checkpoint

    def failing_save(path: Path, payload: dict) -> None:
        if path.name.startswith("iter_"):
            raise OSError("disk full")
        real_save(path, payload)

    monkeypatch.setattr(loop, "save_checkpoint", failing_save)
    state.iteration = 600
    with pytest.raises(OSError, match="disk full"):
        loop.save(parts, state, stats, tmp_path, "last.pt", snapshot=True)
    # The failed snapshot deleted nothing and left no partial file.
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "best.pt"])


def test_pruning_leaves_later_snapshots_of_an_abandoned_branch(tmp_path: Path) -> None:
    from seg.engine.loop import prune_snapshots, snapshot_path

    for iteration in (2, 4, 6, 8, 1_000_000):
        snapshot_path(tmp_path, iteration).write_bytes(b"x")
    (tmp_path / "iter_notanumber.pt").write_bytes(b"x")
    deleted = prune_snapshots(tmp_path, keep=1, iteration=6)
    assert sorted(p.name for p in deleted) == ["iter_000002.pt", "iter_000004.pt"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["iter_000006.pt", "iter_000008.pt", "iter_1000000.pt", "iter_notanumber.pt"]


# ----------------------------------------------------------------------- TensorBoard
def test_train_tags_put_the_watched_curves_first() -> None:
    names = ["loss", "main/kept_fraction", "lr", "images_per_s"]
    tags = [train_tag(n) for n in [*names, "nonfinite_steps"]]
    assert tags == [
        "overview/loss",
        "train/stats/main/kept_fraction",
        "train/lr",
        "train/speed/images_per_s",
        "train/nonfinite_steps",
    ]
    with pytest.raises(ValueError, match="head_losses"):
        train_tag("loss/aux2")  # a head's loss has its own sub-run, not a card per head
    # Time Series sorts groups and the cards in a group by name and opens two groups:
    # overview comes first, with the total loss, then val mIoU, then the per-head card.
    overview = sorted([LOSS_TAG, MIOU_TAG, HEAD_LOSS_TAG])
    assert overview == [LOSS_TAG, MIOU_TAG, HEAD_LOSS_TAG]
    groups = sorted({t.split("/")[0] for t in [*tags, MIOU_TAG, BEST_MIOU_TAG, "val_detail/aAcc"]})
    assert groups == ["overview", "train", "val", "val_detail"]


def test_each_head_loss_is_a_line_of_one_card(tmp_path: Path) -> None:
    """The per-head losses share the tag overview/per_head_loss, one sub-run per head."""
    log = TensorBoardLog(tmp_path)
    log.head_losses({"main": 2.0, "aux2": 3.0}, step=10)
    log.head_losses({"main": 1.5, "aux2": 2.5}, step=20)
    log.scalars({LOSS_TAG: 5.0}, step=10)
    log.close()
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["aux2", "main"]
    main = _events(tmp_path / "heads" / "main")
    assert main.Tags()["scalars"] == [HEAD_LOSS_TAG]
    assert [(e.step, e.value) for e in main.Scalars(HEAD_LOSS_TAG)] == [(10, 2.0), (20, 1.5)]
    assert _events(tmp_path / "heads" / "aux2").Scalars(HEAD_LOSS_TAG)[-1].value == 2.5
    assert set(_events(tmp_path).Tags()["scalars"]) == {LOSS_TAG}
    TensorBoardLog(None).head_losses({"main": 1.0}, step=1)  # other ranks: nothing written


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_run_log_writes_hparams_at_start_and_metrics_at_each_evaluation(tmp_path: Path) -> None:
    """An interrupted run (never closed as completed) already has its HPARAMS entry; the
    entry's metrics are existing scalar tags, no ``hparam/*`` cards; events are in the run
    folder itself; each evaluation adds the confusion matrix and per-class IoU."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    from seg.engine.logging import HPARAM_METRICS

    log = RunLog(
        tmp_path,
        max_iters=10,
        start=0,
        global_batch=2,
        class_names=["road", "car", "sky"],
        palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]],
        hparams={"loss": "ohem", "lr": 0.01, "seed": 3, "crop_size": [64, 128], "warmup": None},
        is_main=True,
    )
    log.config({"trainer": {"max_iters": 10}, "loss": {"name": "ohem"}}, 0)
    collector = log.eval_collector(1, num_classes=3, ignore_index=255, device=torch.device("cpu"))
    batch = {
        "image": torch.zeros(1, 4, 4, 3, dtype=torch.uint8),
        "label": torch.tensor([[[0, 0, 1, 255]] * 4], dtype=torch.uint8),
    }
    collector(batch, torch.tensor([[[0, 1, 1, 2]] * 4]))
    confusion = collector.finish()
    assert confusion.tolist() == [[4, 4, 0], [0, 4, 0], [0, 0, 0]]
    metrics = {"mIoU": 0.5, "mAcc": 0.75, "aAcc": 0.66, "fwIoU": 0.5, "IoU": [0.5, 0.5, 0.0]}
    log.evaluation(5, metrics, collector.panels, confusion, best_score=0.5, what="EMA")
    log.tb.flush()  # not closed: as a run killed here

    assert list(tmp_path.glob("events.out.tfevents.*")) and not list(tmp_path.glob("*/"))
    events = _events(tmp_path)
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_end_info" not in hparams
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["loss"].string_value == "ohem"
    assert start.session_start_info.hparams["crop_size"].string_value == "[64, 128]"
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    shown_first = {h.name for h in experiment.hparam_infos if h.differs}
    assert shown_first == {"loss", "lr", "seed"}  # the headline ones this run has
    scalars = set(events.Tags()["scalars"])
    assert {MIOU_TAG, BEST_MIOU_TAG} <= scalars
    assert {"val_detail/mAcc", "val_detail/aAcc"} <= scalars  # HPARAMS metrics exist as scalars
    assert {"val_detail/IoU/road", "val_detail/IoU/car", "val_detail/IoU/sky"} <= scalars
    assert not any(t.startswith("hparam/") for t in scalars)
    assert events.Scalars("val/mIoU_best")[0].value == pytest.approx(0.5)
    (figure,) = events.Images("val_detail/confusion_matrix")
    assert figure.step == 5 and figure.width > 200 and figure.height > 200
    assert [e.step for e in events.Images("val/sample_0")] == [5]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    trainer:" in config and "max_iters: 10" in config

    log.close(completed=True)
    hparams = _events(tmp_path).PluginTagToContent("hparams")
    assert "_hparams_/session_end_info" in hparams


def test_confusion_image_is_rgb() -> None:
    from seg.engine.confusion_plot import confusion_image

    matrix = torch.tensor([[5, 1], [0, 0]])
    image = confusion_image(matrix, ["a"], [0.8, float("nan")], "title")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0  # something was drawn


def test_eval_progress_bar_is_nested_and_erased(tmp_path: Path) -> None:
    log = RunLog(
        tmp_path, max_iters=4, start=0, global_batch=1, class_names=[], palette=[],
        hparams={}, is_main=True,
    )  # fmt: skip
    bar = log.eval_progress([1, 2, 3], "eval EMA @ 4")
    # tqdm keeps a fixed position as its negative: line 1, below the training bar (line 0).
    assert (abs(bar.pos), bar.leave, bar.desc, bar.total) == (1, False, "eval EMA @ 4", 3)
    assert abs(log.bar.pos) == 0
    assert list(bar) == [1, 2, 3]
    log.close(completed=False)
    other = RunLog(
        tmp_path / "rank1", max_iters=4, start=0, global_batch=1, class_names=[], palette=[],
        hparams={}, is_main=False,
    )  # fmt: skip
    assert other.eval_progress([1], "x").disable and not (tmp_path / "rank1").exists()
    other.close(completed=True)


# ------------------------------------------------------------------ accumulation, DDP
def _ddp_accumulation_worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: two steps of K=2 micro-batches of one image (its quarter of each
    global batch of 4), counting the gradient all-reduces with a DDP communication hook."""
    import os

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = _Net()
        net.bn.eval()
        ddp = DistributedDataParallel(net)
        calls = [0]

        # No annotations: DDP checks them against its own types, which string annotations
        # (``from __future__ import annotations``) would fail.
        def counting(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting)
        opt = build_sgd(net, lr=0.1, momentum=0.9, weight_decay=1e-3, impl="fused")
        amp = resolve_amp("off", "cpu")
        step = TrainStep(
            ddp, _CrossEntropy(), opt, WarmupPolyLR(opt, max_iters=20, warmup_iters=2),
            build_grad_scaler(amp), amp, MEAN, STD, torch.device("cpu"), channels_last=False,
            buffers_of=net, no_sync=ddp.no_sync,
        )  # fmt: skip
        for batch in _batches(2, 4):
            step(_halves({k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}))
        torch.save({"state": net.state_dict(), "calls": calls[0]}, Path(out) / f"rank{rank}.pt")
        # Both ranks done before either tears down: a rank that destroys its gloo group while
        # the other still talks to it can abort the other ("terminate called without an
        # active exception", seen once under load).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_accumulation_all_reduces_once_per_step_and_matches_one_process(
    tmp_path: Path,
) -> None:
    """2 ranks x K=2 micro-batches of 1 image = one process at batch 4: same weights (float
    tolerance), one gradient all-reduce per step (``no_sync`` on the first micro-batch)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_accumulation_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["calls"] for r in ranks] == [2, 2]  # one bucket, two optimizer steps
    torch.manual_seed(0)
    reference = _Net()
    reference.bn.eval()
    step = _step(reference)
    for batch in _batches(2, 4):
        step(batch)
    for name, value in reference.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_mode", ["fp16", "bf16"])
def test_cuda_step_with_accumulation_and_ema_makes_no_host_device_sync(amp_mode: str) -> None:
    """The tuned BiSeNetV2 step with K=2 micro-batches and an EMA update never waits."""
    from seg.bench.train_step import Variant, build_step, make_batch
    from seg.models.bisenetv2 import BiSeNetV2

    step = build_step(Variant("t", amp=amp_mode), "cuda", BiSeNetV2(19).state_dict())
    step.ema = ModelEma(step.model, EmaSettings(decay=0.999))
    batches = [make_batch((2, 128, 256), "cuda", seed=seed) for seed in (0, 1)]
    for _ in range(2):  # warm-up: cuDNN autotuning and first allocations are not checked
        step(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(out.skipped) and step.ema.updates == 3

"""End-to-end training on tiny SynthCity: train, evaluate, checkpoint, interrupt, resume.

``trained``: one 32-iteration run with OHEM on all five heads (loss, checkpoints,
TensorBoard). ``resumed``: a short uninterrupted run (A), and the same run as a
``tools/train.py`` process interrupted by Ctrl-C (SIGINT to its process group, loader
workers included) (B), then resumed in-process with ``resume=auto`` (C). B and C load data
with two worker processes, A with none, so C == A also shows that the data order and
augmentation do not depend on the workers.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seg.checkpoint import CHECKPOINT_KEYS, load_checkpoint
from seg.engine.build import build_datasets, build_parts, parse_settings
from seg.engine.load import load_inference_model
from seg.engine.logging import run_logging
from seg.engine.loop import NonFiniteLossError
from seg.engine.state import seed_everything
from seg.engine.train_run import TrainResult, run, train
from seg.instantiate import build
from seg.losses import LossOutput

REPO = Path(__file__).resolve().parents[1]
HEADS = ("main", "aux2", "aux3", "aux4", "aux5_4")
MAX_ITERS = 32
RESUME_ITERS = 12


def tiny_overrides(data_root: Path) -> list[str]:
    """SynthCity at 64x128 (12 train / 4 val images), whole-image crops, global batch 2, CPU."""
    return [
        f"dataset.root={data_root}",
        "dataset.generator.height=64",
        "dataset.generator.width=128",
        "dataset.generator.num_train=12",
        "dataset.generator.num_val=4",
        "dataset.crop_size=[64,128]",
        "loader.batch_size=2",
        "loader.num_workers=0",
        "trainer.device=cpu",
        "trainer.log_interval=4",
        "schedule.warmup_iters=4",
        "optim.lr=0.01",
    ]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scalars(run_dir: Path, tag: str) -> list[float]:
    """The values of one TensorBoard scalar of a run, in step order."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    base = tmp_path_factory.mktemp("train")
    cfg = compose_cfg(
        [
            *tiny_overrides(base / "synthcity"),
            "+experiment=synthcity_ohem",
            f"trainer.max_iters={MAX_ITERS}",
            "trainer.eval_interval=16",
            "trainer.ckpt_interval=16",
            "trainer.log_interval=8",
        ]
    )
    return run(cfg, run_dir=base / "outputs" / "synthcity_ohem" / "run")


def interrupt_with_ctrl_c(
    args: list[str], cwd: Path, log: Path, after: str, signum: int = signal.SIGINT
) -> tuple[str, int]:
    """Run ``tools/train.py`` and press Ctrl-C (SIGINT to its process group, as a terminal
    does; ``signum``: another signal to the whole group) once ``log`` holds ``after``;
    returns the process's output and exit status."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and after in log.read_text():
            os.killpg(process.pid, signum)
            break
        time.sleep(0.01)
    output, _ = process.communicate(timeout=240)
    return output, process.returncode


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("resume")
    common = [
        *tiny_overrides(base / "synthcity"),
        "+experiment=synthcity_ohem",
        f"trainer.max_iters={RESUME_ITERS}",
        "trainer.eval_interval=4",
        "trainer.ckpt_interval=2",
        "trainer.log_interval=2",
    ]
    a = run(compose_cfg(common), run_dir=base / "a" / "run_a")
    outputs = base / "outputs" / "synthcity_ohem"
    workers = ["loader.num_workers=2"]
    output, status = interrupt_with_ctrl_c(
        [*common, *workers, f"hydra.run.dir={outputs / 'run_b'}"],
        cwd=base,
        log=outputs / "run_b" / "train.log",
        after=f"iter 2/{RESUME_ITERS}",
    )
    b_last = load_checkpoint(
        outputs / "run_b" / "checkpoints" / "last.pt", required_keys=CHECKPOINT_KEYS
    )
    c = run(compose_cfg([*common, *workers, "resume=auto"]), run_dir=outputs / "run_c")
    return {
        "a": a,
        "b_last": b_last,
        "b_output": output,
        "b_status": status,
        "c": c,
        "outputs": outputs,
    }


@pytest.mark.slow
def test_training_lowers_the_loss_and_evaluates(trained: TrainResult) -> None:
    assert trained.iteration == MAX_ITERS and trained.stopped_by is None
    losses = scalars(trained.run_dir, "overview/loss")
    assert len(losses) == MAX_ITERS // 8
    assert all(math.isfinite(v) for v in losses)
    # Every head starts near ln 19 = 2.9 (small classifiers); a model that does not learn
    # stays near the first value.
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < losses[1], losses
    assert 0.0 <= trained.metrics["mIoU"] <= 1.0 and len(trained.metrics["IoU"]) == 19
    for head in HEADS:  # OHEM on all five heads: each reports its kept fraction
        kept = scalars(trained.run_dir, f"train/stats/{head}/kept_fraction")
        assert all(0.0 < v <= 1.0 for v in kept)


@pytest.mark.slow
def test_checkpoints_hold_everything_to_resume(trained: TrainResult) -> None:
    ckpt_dir = trained.run_dir / "checkpoints"
    last = load_checkpoint(ckpt_dir / "last.pt", required_keys=CHECKPOINT_KEYS)
    best = load_checkpoint(ckpt_dir / "best.pt", required_keys=CHECKPOINT_KEYS)
    assert last["iteration"] == MAX_ITERS
    assert best["iteration"] in (16, 32)
    assert best["metrics"]["val"]["mIoU"] == pytest.approx(last["metrics"]["best_mIoU"])
    assert set(last["rng"]) >= {"torch", "numpy", "python"}
    assert last["config"]["experiment_name"] == "synthcity_ohem"
    assert last["config"]["optim"]["lr"] == 0.01  # resolved plain containers
    assert last["metrics"]["val"]["mIoU"] == trained.metrics["mIoU"]
    assert not list(ckpt_dir.glob("*.tmp"))  # atomic writes leave no temporaries
    # The stored weights are the final ones: evaluating them again gives the final metrics.
    cfg = compose_cfg([*tiny_overrides(trained.run_dir.parents[2] / "synthcity")])
    net = load_inference_model(ckpt_dir / "last.pt")
    loader = torch.utils.data.DataLoader(build(cfg.dataset.val, "val"), batch_size=1)
    again = build(cfg.eval, "evaluator").evaluate(net.model, loader, "cpu", progress=False)
    assert again["mIoU"] == pytest.approx(trained.metrics["mIoU"], abs=1e-12)


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_is_exact(resumed: dict[str, Any]) -> None:
    b_last, c = resumed["b_last"], resumed["c"]
    stopped_at = b_last["iteration"]
    assert 2 <= stopped_at < RESUME_ITERS, resumed["b_output"][-2000:]
    assert "Traceback" not in resumed["b_output"]  # the loader workers ignored their SIGINT
    assert resumed["b_status"] == 130  # 128 + SIGINT: a scheduler sees an interrupted run
    # resume=auto found run_b's last.pt and kept writing into run_b
    assert c.run_dir == resumed["outputs"] / "run_b"
    assert c.iteration == RESUME_ITERS and c.stopped_by is None
    a_last = load_checkpoint(resumed["a"].run_dir / "checkpoints" / "last.pt")
    c_last = load_checkpoint(c.run_dir / "checkpoints" / "last.pt")
    assert weights_equal(c_last["model"], a_last["model"])
    assert c.metrics["mIoU"] == resumed["a"].metrics["mIoU"]
    log = (resumed["outputs"] / "run_b" / "train.log").read_text()
    assert f"stopped (SIGINT) at iteration {stopped_at}" in log and "resuming from" in log
    assert not (resumed["outputs"] / "run_c" / "train.log").exists()


@pytest.mark.slow
def test_sigterm_to_every_process_saves_last_pt(tmp_path: Path) -> None:
    """`timeout`, `kill -- -PGID` or a scheduler signal every process of a run at once; the
    loader workers outlast that SIGTERM, so the main process saves last.pt and exits 143
    (they used to die at once and take the main process down mid-step, nothing saved)."""
    run_dir = tmp_path / "outputs" / "run"
    output, status = interrupt_with_ctrl_c(
        [
            *tiny_overrides(tmp_path / "synthcity"),
            "trainer.max_iters=200",
            "trainer.eval_interval=1000",
            "trainer.ckpt_interval=1000",
            "trainer.log_interval=2",
            "loader.num_workers=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        log=run_dir / "train.log",
        after="iter 2/200",
        signum=signal.SIGTERM,
    )
    assert status == 143, output[-2000:]
    assert "Traceback" not in output and "killed by signal" not in output
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt", required_keys=CHECKPOINT_KEYS)
    assert 2 <= last["iteration"] < 200
    assert (
        f"stopped (SIGTERM) at iteration {last['iteration']}" in (run_dir / "train.log").read_text()
    )


@pytest.mark.slow
def test_tensorboard_tags(trained: TrainResult) -> None:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    # Events in the run folder itself: `tensorboard --logdir outputs` names the run
    # synthcity_ohem/run (no tb/ level).
    assert list(trained.run_dir.glob("events.out.tfevents.*"))
    assert not (trained.run_dir / "tb").exists()
    events = EventAccumulator(str(trained.run_dir))
    events.Reload()
    tags = events.Tags()
    scalar_tags = set(tags["scalars"])
    expected = {"overview/loss", "overview/mIoU", "val/mIoU_best"}
    expected |= {"train/lr", "train/speed/images_per_s", "val_detail/mAcc", "val_detail/aAcc"}
    expected |= {f"train/stats/{h}/kept_fraction" for h in HEADS}
    assert expected <= scalar_tags, expected - scalar_tags
    # Time Series opens on the overview group: total loss, val mIoU, then one card with a
    # line per head (sub-runs heads/<head>); detail, per-class IoU and the confusion matrix
    # are in val_detail.
    assert min(t.split("/")[0] for t in {*scalar_tags, *tags["images"]}) == "overview"
    assert sorted(t for t in scalar_tags if t.startswith("overview/")) == [
        "overview/loss",
        "overview/mIoU",
    ]
    assert not any(t.startswith("train/loss") for t in scalar_tags)
    assert sorted(p.name for p in (trained.run_dir / "heads").iterdir()) == sorted(HEADS)
    for head in HEADS:
        per_head = EventAccumulator(str(trained.run_dir / "heads" / head))
        per_head.Reload()
        assert per_head.Tags()["scalars"] == ["overview/per_head_loss"]
        values = [e.value for e in per_head.Scalars("overview/per_head_loss")]
        assert len(values) == MAX_ITERS // 8 and all(math.isfinite(v) for v in values)
    assert any(t.startswith("val_detail/IoU/") for t in scalar_tags)
    # Deliberate change: the HPARAMS tab reads overview/mIoU etc., no single-point hparam/* cards.
    assert not any(t.startswith("hparam/") for t in scalar_tags)
    assert {"val/sample_0", "val/sample_1", "val_detail/confusion_matrix"} <= set(tags["images"])
    image = events.Images("val/sample_0")[0]
    assert image.width == 3 * 128 and image.height == 64  # input | truth | prediction
    assert [e.step for e in events.Images("val_detail/confusion_matrix")] == [16, 32]
    assert "config/text_summary" in tags["tensors"]
    hparams = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["loss"].string_value == "ohem"
    assert start.hparams["lr"].number_value == pytest.approx(0.01)
    assert start.hparams["max_iters"].number_value == MAX_ITERS
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {"overview/mIoU", "val/mIoU_best"} <= {m.name.tag for m in experiment.metric_infos}
    assert "_hparams_/session_end_info" in hparams  # the run completed
    assert [s.step for s in events.Scalars("overview/mIoU")] == [16, 32]
    best = events.Scalars("val/mIoU_best")[-1].value
    assert best == pytest.approx(trained.best_score) and trained.best_metric == "mIoU"


def _same_metrics(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal mIoU and per-class IoU lists (NaN equal to NaN)."""
    same_iou = all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)
        for x, y in zip(a["IoU"], b["IoU"], strict=True)
    )
    return same_iou and a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-12)


@pytest.mark.slow
def test_accumulation_ema_and_snapshots_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer.accumulate=2, trainer.ema.decay=0.9, trainer.keep_snapshots=2: the last two
    snapshots are kept, evaluations score the EMA (and eval/predict/export load it), and a
    run resumed from a snapshot ends with exactly the weights and the EMA of the original."""
    overrides = [
        *tiny_overrides(tmp_path / "synthcity"),
        "trainer.max_iters=8",
        "trainer.eval_interval=4",
        "trainer.ckpt_interval=2",
        "trainer.log_interval=2",
        "trainer.accumulate=2",
        "trainer.keep_snapshots=2",
        "trainer.ema.decay=0.9",
    ]
    outputs = tmp_path / "outputs" / "default"
    from seg.engine.evaluator import Evaluator

    scored: list[bool] = []  # per periodic evaluation: was the model scored the EMA copy?
    evaluate = Evaluator.evaluate

    def recording(self: Evaluator, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        scored.append(not any(p.requires_grad for p in model.parameters()))
        return evaluate(self, model, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", recording)
    result = run(compose_cfg(overrides), run_dir=outputs / "run")
    monkeypatch.undo()
    assert scored == [True, True]  # iterations 4 and 8: the EMA (no gradients), not the model
    folder = result.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt",
        "iter_000006.pt",
        "iter_000008.pt",
        "last.pt",
    ]
    last = load_checkpoint(folder / "last.pt", required_keys=CHECKPOINT_KEYS)
    assert last["iteration"] == 8 and (last["ema"]["steps"], last["ema"]["updates"]) == (8, 8)
    assert not weights_equal(last["ema"]["model"], last["model"])
    log = (result.run_dir / "train.log").read_text()
    assert "gradient accumulation: 2 micro-batches of 2 image(s)" in log
    assert "eval at iter 8 (EMA) | mIoU" in log

    # Inference (eval, predict, export) loads the EMA weights, whose metrics were stored.
    ema_net = load_inference_model(folder / "last.pt")
    assert ema_net.weights == "ema"
    for key, value in ema_net.model.state_dict().items():
        assert torch.equal(value, last["ema"]["model"][key]), key
    assert load_inference_model(folder / "last.pt", ema=False).weights == "model"
    cfg = compose_cfg(tiny_overrides(tmp_path / "synthcity"))
    loader = torch.utils.data.DataLoader(build(cfg.dataset.val, "val"), batch_size=1)
    metrics = build(cfg.eval, "evaluator").evaluate(ema_net.model, loader, "cpu", progress=False)
    assert _same_metrics(metrics, last["metrics"]["val"])

    # Resume from the iteration-6 snapshot (into the same run folder): exact EMA and weights.
    resumed = run(
        compose_cfg([*overrides, f"resume={folder / 'iter_000006.pt'}"]),
        run_dir=outputs / "resumed",
    )
    assert resumed.run_dir == result.run_dir and resumed.iteration == 8
    again = load_checkpoint(folder / "last.pt", required_keys=CHECKPOINT_KEYS)
    assert weights_equal(again["model"], last["model"])
    assert weights_equal(again["ema"]["model"], last["ema"]["model"])
    assert again["ema"]["updates"] == 8
    assert again["metrics"]["val"]["mIoU"] == last["metrics"]["val"]["mIoU"]


class PoisonedLoss(torch.nn.Module):
    """The real loss, times NaN at steps 3, 4 and from 7 on (NaN gradients too)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> LossOutput:
        self.calls += 1
        out = self.inner(outputs, labels)
        if self.calls in (3, 4) or self.calls >= 7:
            out.total = out.total * float("nan")
        return out


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_training(tmp_path: Path) -> None:
    """NaN losses at steps 3-4 are skipped (weights and BatchNorm statistics untouched); from
    step 7 on they stop training at the next check, with last.pt holding the weights after
    step 6, the last finite one."""
    cfg = compose_cfg(
        [
            *tiny_overrides(tmp_path / "synthcity"),
            "trainer.max_iters=40",
            "trainer.eval_interval=100",
            "trainer.ckpt_interval=100",
            "trainer.log_interval=2",
            "trainer.max_nonfinite_steps=3",
        ]
    )
    settings = parse_settings(cfg)
    seed_everything(settings.seed)
    parts = build_parts(cfg, settings, build_datasets(cfg))
    parts.step.criterion = PoisonedLoss(parts.step.criterion)
    # Weights before each step's forward pass: snapshots[k] holds them after step k.
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def before_forward(model: torch.nn.Module, _inputs: object) -> None:
        snapshots[len(snapshots)] = {k: v.clone() for k, v in model.state_dict().items()}

    parts.model.register_forward_pre_hook(before_forward)
    with (
        run_logging(tmp_path / "run" / "train.log", True),
        pytest.raises(NonFiniteLossError, match="not finite for 4 iterations in a row") as error,
    ):
        train(parts, tmp_path / "run")
    assert "stopped at iteration 10" in str(error.value)  # the first check after 3 NaNs in a row
    assert weights_equal(snapshots[4], snapshots[2])  # two skipped steps changed nothing
    assert not weights_equal(snapshots[5], snapshots[4])  # finite step 5 trained
    last = load_checkpoint(
        tmp_path / "run" / "checkpoints" / "last.pt", required_keys=CHECKPOINT_KEYS
    )
    assert last["iteration"] == 10
    assert weights_equal(last["model"], snapshots[6])
    assert last["metrics"]["nonfinite_steps"] == 6
    assert "non-finite 6" in (tmp_path / "run" / "train.log").read_text()


def _train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_missing_cityscapes_is_one_line(tmp_path: Path) -> None:
    result = _train_cli("+experiment=cityscapes_ohem", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(tmp_path / "data" / "cityscapes") in lines[0] and "dataset.root=" in lines[0]


@pytest.mark.parametrize("override", ["trainer.cudnn_benchmark=maybe", "trainer.channels_last=on"])
def test_cli_bad_device_switch_stops_before_writing(tmp_path: Path, override: str) -> None:
    result = _train_cli(override, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0], result.stderr
    assert not (tmp_path / "run" / "train.log").exists()


def test_cli_help() -> None:
    result = _train_cli("--help", cwd=REPO)
    assert result.returncode == 0
    assert "cityscapes_ohem" in result.stdout and "trainer" in result.stdout


@pytest.mark.slow
def test_cli_run_dir_layout(tmp_path: Path) -> None:
    args = [
        *tiny_overrides(tmp_path / "synthcity"),
        "trainer.max_iters=2",
        "trainer.log_interval=1",
        "hydra.verbose=seg.train",  # Hydra's switch for DEBUG lines of chosen loggers
    ]
    result = _train_cli("+experiment=synthcity_ce", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "synthcity_ce").iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert {".hydra", "train.log", "checkpoints"} <= names
    assert any(name.startswith("events.out.tfevents.") for name in names)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"last.pt"}
    log = (run_dir / "train.log").read_text()
    assert "iter 2/2" in log and "eval at iter 2" in log
    assert "DEBUG seg.train: built BiSeNetV2" in log
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.loss.name == "ce"


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_training_evaluates_and_extends(tmp_path: Path, amp: str) -> None:
    """The trainer's CUDA path end to end (AMP, channels_last, cuDNN benchmark mode, the
    sync-free OHEM selection): finite losses, no skipped step, an evaluation, a checkpoint
    that a longer run continues. CUDA kernels are not bitwise repeatable (atomic adds in
    the upsampling backward), so the extension is not compared with an uninterrupted run."""
    overrides = [o for o in tiny_overrides(tmp_path / "data") if o != "trainer.device=cpu"]
    overrides += ["trainer.device=cuda", f"trainer.amp={amp}", "trainer.eval_interval=8"]
    run_dir = tmp_path / "run"
    first = run(compose_cfg([*overrides, "trainer.max_iters=8"]), run_dir=run_dir)
    assert first.iteration == 8 and first.stopped_by is None
    assert 0.0 <= first.metrics["mIoU"] <= 1.0
    losses = scalars(run_dir, "overview/loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert scalars(run_dir, "train/nonfinite_steps")[-1] == 0
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last, map_location="cpu", required_keys=CHECKPOINT_KEYS)
    assert state["config"]["trainer"]["amp"] == amp and state["iteration"] == 8

    extended = run(
        compose_cfg([*overrides, "trainer.max_iters=12", f"resume={last}"]), run_dir=run_dir
    )
    assert extended.iteration == 12 and math.isfinite(extended.metrics["mIoU"])
    assert len(scalars(run_dir, "overview/loss")) == 3

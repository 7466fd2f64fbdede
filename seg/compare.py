"""Compare losses over seeds: train every loss x seed with one budget, then report.

Published gains of OHEM on Cityscapes are a few tenths of a point while run-to-run spread
is one to two points, so one run per loss proves nothing. A comparison trains each loss
with several seeds (same data, schedule and budget; only ``loss`` and ``seed`` change),
then reports mean +- std per loss, each run's value, per-class IoU, rare-class mIoU,
training time per iteration and val-mIoU curves, and labels differences smaller than the
seed spread as such.

Layout of a comparison folder (``out``)::

    runs/<loss>-seed<seed>/        one training run each (.hydra/, train.log, tb/, checkpoints/)
    report.md, report.json         the report
    miou_curves.png, class_iou.png the plots

``tensorboard --logdir <out>`` shows every run side by side. Training runs are separate
processes (``tools/train.py``); a run whose ``last.pt`` already reached ``max_iters`` is
reused, and an unfinished one is resumed, so an interrupted comparison can be restarted
with the same ``out``.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seg.engine.checkpoint import load_checkpoint
from seg.errors import ConfigError, SegError
from seg.fileio import write_bytes_atomic, write_text_atomic
from seg.tables import markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "tools" / "train.py"
#: The fraction of classes, least frequent first by training pixel count, called "rare".
RARE_FRACTION = 1.0 / 3.0


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison."""

    loss: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.loss}-seed{self.seed}"


@dataclass
class RunResult:
    """What one finished run measured (metrics as fractions in [0, 1])."""

    loss: str
    seed: int
    run_dir: str
    iteration: int
    miou: float
    class_iou: list[float]
    curve: list[tuple[int, float]]  # (iteration, val mIoU)
    seconds_per_iter: float


def plan_runs(losses: Sequence[str], seeds: Sequence[int], out_dir: Path) -> list[RunSpec]:
    """Every loss x seed, in an order that interleaves losses (fair to machine drift)."""
    if not losses or not seeds:
        raise ConfigError(
            "a comparison needs at least one loss in losses=[...] and one seed in seeds=[...]"
        )
    if len(set(losses)) != len(losses) or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"losses and seeds must not repeat (losses={list(losses)}, seeds={list(seeds)})"
        )
    return [
        RunSpec(loss, int(seed), out_dir / "runs" / f"{loss}-seed{seed}")
        for seed in seeds
        for loss in losses
    ]


def train_command(spec: RunSpec, train_overrides: Sequence[str], resume: Path | None) -> list[str]:
    """The ``tools/train.py`` command line of one run: the user's overrides, then ours."""
    command = [sys.executable, str(TRAIN_SCRIPT), *train_overrides]
    command += [f"loss={spec.loss}", f"seed={spec.seed}", f"hydra.run.dir={spec.run_dir}"]
    if resume is not None:
        command.append(f"resume={resume}")
    return command


def finished_iteration(spec: RunSpec) -> tuple[int, int] | None:
    """``(iteration, max_iters)`` of the run's ``last.pt``, or ``None`` when there is none."""
    last = spec.run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    checkpoint = load_checkpoint(last)
    return int(checkpoint["iteration"]), int(checkpoint["config"]["trainer"]["max_iters"])


def run_training(specs: Sequence[RunSpec], train_overrides: Sequence[str], max_iters: int) -> None:
    """Train each run in its own process; reuse finished runs, resume unfinished ones."""
    for index, spec in enumerate(specs, 1):
        done = finished_iteration(spec)
        if done is not None and done[0] >= max_iters:
            print(
                f"[{index}/{len(specs)}] {spec.name}: finished earlier (iteration {done[0]}), reused"
            )
            continue
        resume = spec.run_dir / "checkpoints" / "last.pt" if done is not None else None
        print(f"[{index}/{len(specs)}] {spec.name}: training -> {spec.run_dir}", flush=True)
        command = train_command(spec, train_overrides, resume)
        status = subprocess.call(command, cwd=Path.cwd())
        if status != 0:
            raise SegError(
                f"training run {spec.name} failed with exit status {status}: {' '.join(command)}"
            )


def read_scalars(tb_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files under ``tb_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                out[tag] += [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)]
    # Resumed runs append to the same tags: keep the latest value of each step.
    return {tag: sorted(dict(values).items()) for tag, values in out.items()}


def read_run(spec: RunSpec, batch_size: int) -> RunResult:
    """Final metrics from ``last.pt``; the mIoU curve and speed from TensorBoard."""
    checkpoint = load_checkpoint(spec.run_dir / "checkpoints" / "last.pt")
    metrics = (checkpoint.get("metrics") or {}).get("val") or {}
    if "mIoU" not in metrics:
        raise SegError(f"run {spec.name} has no evaluation in {spec.run_dir}/checkpoints/last.pt")
    scalars = read_scalars(spec.run_dir / "tb", ["val/mIoU", "train/images_per_s"])
    speeds = [v for _, v in scalars["train/images_per_s"] if v > 0]
    seconds_per_iter = batch_size / statistics.median(speeds) if speeds else math.nan
    return RunResult(
        loss=spec.loss,
        seed=spec.seed,
        run_dir=str(spec.run_dir),
        iteration=int(checkpoint["iteration"]),
        miou=float(metrics["mIoU"]),
        class_iou=[math.nan if v is None else float(v) for v in metrics["IoU"]],
        curve=scalars["val/mIoU"],
        seconds_per_iter=seconds_per_iter,
    )


def rare_classes(train_pixels: Sequence[int], fraction: float = RARE_FRACTION) -> list[int]:
    """Train ids of the least frequent ``fraction`` of classes by training pixel count."""
    count = max(1, round(len(train_pixels) * fraction))
    return sorted(int(k) for k in np.argsort(np.asarray(train_pixels), kind="stable")[:count])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


@dataclass
class LossSummary:
    """One loss over its seeds (fractions in [0, 1], seconds)."""

    loss: str
    seeds: list[int]
    miou: list[float]
    miou_mean: float
    miou_std: float
    rare_miou_mean: float
    rare_miou_std: float
    class_iou_mean: list[float]
    seconds_per_iter: float


def summarize(
    results: Sequence[RunResult], losses: Sequence[str], rare: Sequence[int]
) -> list[LossSummary]:
    """Per-loss statistics over seeds, in the order of ``losses``."""
    summaries = []
    for loss in losses:
        runs = [r for r in results if r.loss == loss]
        mious = [r.miou for r in runs]
        rare_mious = [_nanmean([r.class_iou[k] for k in rare]) for r in runs]
        per_class = np.array([r.class_iou for r in runs], dtype=np.float64)
        with warnings.catch_warnings():  # a class absent from every run is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            class_mean = np.nanmean(per_class, axis=0).tolist()
        miou_mean, miou_std = _mean_std(mious)
        rare_mean, rare_std = _mean_std(rare_mious)
        summaries.append(
            LossSummary(
                loss=loss,
                seeds=[r.seed for r in runs],
                miou=mious,
                miou_mean=miou_mean,
                miou_std=miou_std,
                rare_miou_mean=rare_mean,
                rare_miou_std=rare_std,
                class_iou_mean=class_mean,
                seconds_per_iter=statistics.median([r.seconds_per_iter for r in runs]),
            )
        )
    return summaries


def verdicts(summaries: Sequence[LossSummary]) -> list[str]:
    """Pairwise differences of mean mIoU, each labelled against the seed spread.

    The seed spread of a pair is the larger of the two losses' standard deviations over
    seeds. A difference no larger than it is reported as within the noise, not as a win.
    """
    lines = []
    for i, a in enumerate(summaries):
        for b in summaries[i + 1 :]:
            diff = 100.0 * (a.miou_mean - b.miou_mean)
            spread = 100.0 * max(a.miou_std, b.miou_std)
            if len(a.miou) < 2 or len(b.miou) < 2:
                label = "one seed only: no spread to judge against"
            elif abs(diff) <= spread:
                label = f"within the seed spread ({spread:.2f}): not a difference"
            else:
                winner = a.loss if diff > 0 else b.loss
                label = f"larger than the seed spread ({spread:.2f}): {winner} ahead"
            lines.append(f"{a.loss} - {b.loss}: {diff:+.2f} mIoU points; {label}")
    return lines


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"


def format_report(
    summaries: Sequence[LossSummary],
    results: Sequence[RunResult],
    class_names: Sequence[str],
    rare: Sequence[int],
    command: str,
    setup: dict[str, Any],
) -> str:
    """The markdown report (figures in percent)."""
    lines = ["# Loss comparison", "", f"Command: `{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += ["", "## mIoU over seeds (val, final iteration)", ""]
    rows = [
        [
            s.loss,
            f"{_pct(s.miou_mean)} +- {_pct(s.miou_std)}",
            ", ".join(f"{_pct(v)} (seed {seed})" for v, seed in zip(s.miou, s.seeds, strict=True)),
            f"{_pct(s.rare_miou_mean)} +- {_pct(s.rare_miou_std)}",
            f"{1000.0 * s.seconds_per_iter:.0f}",
        ]
        for s in summaries
    ]
    lines.append(
        markdown_table(
            ["loss", "mIoU mean +- std", "each run", "rare-class mIoU", "ms / iteration"], rows
        )
    )
    lines += ["", "Differences (mean mIoU):", ""]
    lines += [f"- {v}" for v in verdicts(summaries)]
    rare_names = ", ".join(class_names[k] for k in rare)
    lines += ["", f"Rare classes (least frequent third by training pixel count): {rare_names}.", ""]
    lines += ["## Per-class IoU (mean over seeds)", ""]
    header = ["class", *[s.loss for s in summaries]]
    class_rows = [
        [f"{name}{' (rare)' if k in rare else ''}", *[_pct(s.class_iou_mean[k]) for s in summaries]]
        for k, name in enumerate(class_names)
    ]
    lines.append(markdown_table(header, class_rows))
    lines += ["", "## Plots", "", "![val mIoU against iteration](miou_curves.png)", ""]
    lines += ["![per-class IoU](class_iou.png)", ""]
    lines += ["## Runs", ""]
    lines.append(
        markdown_table(
            ["run", "iterations", "mIoU", "folder"],
            [[f"{r.loss} seed {r.seed}", r.iteration, _pct(r.miou), r.run_dir] for r in results],
        )
    )
    return "\n".join(lines) + "\n"


def plot_curves(results: Sequence[RunResult], losses: Sequence[str], path: Path) -> None:
    """Val mIoU against iteration: one colour per loss, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, loss in enumerate(losses):
        for j, r in enumerate(x for x in results if x.loss == loss):
            if r.curve:
                steps, values = zip(*r.curve, strict=True)
                ax.plot(
                    steps,
                    [100.0 * v for v in values],
                    color=colours[i % len(colours)],
                    marker="o",
                    markersize=3,
                    alpha=0.85,
                    label=loss if j == 0 else None,
                )
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("val mIoU against iteration (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically, then free it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def plot_class_iou(
    summaries: Sequence[LossSummary], class_names: Sequence[str], path: Path
) -> None:
    """Per-class IoU bars (mean over seeds), grouped by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(summaries), 1)
    positions = np.arange(len(class_names))
    for i, s in enumerate(summaries):
        values = [0.0 if math.isnan(v) else 100.0 * v for v in s.class_iou_mean]
        ax.bar(positions + (i - (len(summaries) - 1) / 2) * width, values, width, label=s.loss)
    ax.set_xticks(positions, list(class_names), rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_title("per-class IoU, mean over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def write_report(
    out_dir: Path,
    specs: Sequence[RunSpec],
    losses: Sequence[str],
    batch_size: int,
    class_names: Sequence[str],
    train_pixels: Sequence[int],
    command: str,
    setup: dict[str, Any],
) -> Path:
    """Read every run, write ``report.md``, ``report.json`` and the two plots; return the report path."""
    results = [read_run(spec, batch_size) for spec in specs]
    rare = rare_classes(train_pixels)
    summaries = summarize(results, losses, rare)
    plot_curves(results, losses, out_dir / "miou_curves.png")
    plot_class_iou(summaries, class_names, out_dir / "class_iou.png")
    report = out_dir / "report.md"
    write_text_atomic(report, format_report(summaries, results, class_names, rare, command, setup))
    payload = {
        "command": command,
        "setup": setup,
        "rare_classes": [class_names[k] for k in rare],
        "summaries": [asdict(s) for s in summaries],
        "runs": [asdict(r) for r in results],
        "verdicts": verdicts(summaries),
    }
    write_text_atomic(out_dir / "report.json", json.dumps(payload, indent=2, allow_nan=True))
    return report


#: Keys of configs/compare.yaml that belong to the comparison, not to the training runs.
COMPARE_KEYS = ("losses", "seeds")


def train_overrides(task_overrides: Sequence[str]) -> list[str]:
    """The user's command-line overrides that each training run receives."""
    own = tuple(f"{key}=" for key in COMPARE_KEYS)
    return [
        o
        for o in task_overrides
        if not o.startswith(own) and not o.startswith(("hydra.", "loss=", "seed="))
    ]


def class_pixel_counts(dataset_cfg: Any) -> list[int]:
    """Training pixels per train id (reads every training label once)."""
    from seg.data.build import build_dataset
    from seg.data.check import check_split

    dataset = build_dataset(dataset_cfg.train, transform=None, strict=False)
    report = check_split(dataset, "train")
    return [int(v) for v in report.train_id_pixels[: int(dataset_cfg.num_classes)]]


def run(cfg: Any) -> Path:
    """Train every loss x seed of ``cfg`` (configs/compare.yaml), then write the report."""
    from hydra.core.hydra_config import HydraConfig

    from seg.bench.report import describe_machine

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    losses = [str(v) for v in cfg.losses]
    seeds = [int(v) for v in cfg.seeds]
    available = {p.stem for p in (REPO_ROOT / "configs" / "loss").glob("*.yaml")}
    unknown = [loss for loss in losses if loss not in available]
    if unknown:
        raise ConfigError(
            f"unknown loss {unknown} in losses=[...]; configs/loss has {sorted(available)}"
        )
    specs = plan_runs(losses, seeds, out_dir)
    overrides = train_overrides(hydra_cfg.overrides.task)
    max_iters = int(cfg.trainer.max_iters)
    print(f"comparison: {len(specs)} runs ({', '.join(losses)} x seeds {seeds}) -> {out_dir}")
    run_training(specs, overrides, max_iters)
    command = " ".join(["python tools/compare.py", *hydra_cfg.overrides.task])
    import torch

    on_gpu = torch.cuda.is_available() and str(cfg.trainer.device) != "cpu"
    info = describe_machine("cuda" if on_gpu else "cpu")
    machine = (
        f"{info['cuda_device'] or info['cpu']} ({info['cpu_cores']} CPU cores), torch {info['torch']}, "
        f"{info['date']}"
    )
    setup = {
        "experiment": cfg.experiment_name,
        "dataset": f"{cfg.dataset.name} at {cfg.dataset.root}",
        "budget": f"{max_iters} iterations, batch {cfg.loader.batch_size}, crop {list(cfg.dataset.crop_size)}",
        "evaluation": f"every {cfg.trainer.eval_interval} iterations on the {cfg.dataset.split} split",
        "seeds": seeds,
        "machine": machine,
    }
    report = write_report(
        out_dir,
        specs,
        losses,
        int(cfg.loader.batch_size),
        list(cfg.dataset.class_names),
        class_pixel_counts(cfg.dataset),
        command,
        setup,
    )
    print(f"report: {report}\nTensorBoard: tensorboard --logdir {out_dir}")
    return report

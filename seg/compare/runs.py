"""The runs of a sweep folder: find them, check that they are one budget, read them.

A sweep folder is what ``tools/train.py -m ... loss=A,B seed=0,1`` writes (any launcher,
any machine): one job folder per run (``<loss>-seed<seed>/`` by default, but any
``hydra.sweep.subdir`` works: loss and seed are read from each run's stored config),
each with ``checkpoints/last.pt`` and TensorBoard event files, plus Hydra's ``multirun.yaml``.

Runs are compared only when they are one budget: every run finished
(``iteration == trainer.max_iters`` of its config) and their stored configs are equal
except for the loss, the seed, the experiment's name and the settings that cannot change
a result (``seg.engine.state.RESULT_NEUTRAL_KEYS``). Anything else is refused with one
line naming the runs (:class:`IncomparableRuns`, exit status 1), never reported beside
the others.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from seg.checkpoint import load_checkpoint
from seg.data.check import check_split
from seg.engine.class_weight import stored_auto_weights
from seg.engine.logging import MIOU_TAG
from seg.engine.state import RESULT_NEUTRAL_KEYS, config_differences, describe_differences
from seg.errors import ConfigError, SegError
from seg.instantiate import build_from_checkpoint

#: What the report reads from each run's last.pt.
RUN_KEYS = ("config", "iteration", "metrics")
#: What may differ between the runs of one comparison (besides RESULT_NEUTRAL_KEYS).
COMPARED_KEYS = ("loss", "seed", "experiment_name")


class IncomparableRuns(SegError):
    """The runs of a sweep folder are not one finished budget (exit status 1)."""


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
    class_weight: list[float] | None = None  # the loss's class weights as the run trained
    class_weight_auto: bool = False  # they were resolved from loss.class_weight=auto


@dataclass
class Sweep:
    """The runs of a sweep folder, checked to be one budget, in job order."""

    results: list[RunResult]
    losses: list[str]
    seeds: list[int]
    config: dict[str, Any]  # the first run's stored config: the shared settings


@dataclass
class _Run:
    folder: Path
    checkpoint: dict[str, Any] | None  # None: the job never saved last.pt
    job_num: int

    @property
    def config(self) -> dict[str, Any]:
        return dict((self.checkpoint or {}).get("config") or {})

    @property
    def loss(self) -> str:
        return str((self.config.get("loss") or {}).get("name", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", -1))

    @property
    def name(self) -> str:
        return f"{self.loss}-seed{self.seed}" if self.checkpoint else self.folder.name


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: subfolders holding Hydra's ``.hydra/`` or checkpoints."""
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep folder not found: {sweep_dir}")
    return sorted(
        p
        for p in sweep_dir.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and ((p / ".hydra").is_dir() or (p / "checkpoints").is_dir())
    )


def _job_num(folder: Path) -> int:
    """The job's number in its sweep (``.hydra/hydra.yaml``), for the report's order."""
    record = folder / ".hydra" / "hydra.yaml"
    number = OmegaConf.select(OmegaConf.load(record), "hydra.job.num") if record.is_file() else None
    return int(number) if number is not None else 1 << 30  # no record: after the others


def _load_runs(sweep_dir: Path) -> list[_Run]:
    runs = []
    for folder in job_folders(sweep_dir):
        last = folder / "checkpoints" / "last.pt"
        checkpoint = load_checkpoint(last, required_keys=RUN_KEYS) if last.is_file() else None
        runs.append(_Run(folder, checkpoint, _job_num(folder)))
    runs.sort(key=lambda r: (r.job_num, r.folder.name))
    return runs


def check_one_budget(runs: Sequence[_Run]) -> None:
    """Refuse runs that are unfinished or differ in more than loss and seed."""
    unfinished = []
    for run in runs:
        if run.checkpoint is None:
            unfinished.append(f"{run.folder} (no checkpoints/last.pt)")
            continue
        done, budget = int(run.checkpoint["iteration"]), int(run.config["trainer"]["max_iters"])
        if done != budget:
            unfinished.append(f"{run.name} stopped at iteration {done} of {budget}")
    if unfinished:
        raise IncomparableRuns(
            f"not every run reached its budget, so none is reported: {'; '.join(unfinished)}. "
            "Finish them (rerun the same command: resume=auto continues each run) and "
            "report again"
        )
    ignore = (*RESULT_NEUTRAL_KEYS, *COMPARED_KEYS)
    first = runs[0]
    for run in runs[1:]:
        differences = config_differences(first.config, run.config, ignore=ignore)
        if differences:
            names = (f"in {first.name}", f"in {run.name}")
            detail = describe_differences(first.config, run.config, differences, names=names)
            raise IncomparableRuns(
                f"runs {first.folder} and {run.folder} are not one budget: they differ in "
                f"more than loss and seed ({detail})"
            )


def _select_grid(
    runs: list[_Run], losses: Sequence[str] | None, seeds: Sequence[int] | None
) -> tuple[list[_Run], list[str], list[int]]:
    """The runs of the loss x seed grid (the one asked for, or the one found), each once."""
    found_losses = list(dict.fromkeys(r.loss for r in runs))
    found_seeds = list(dict.fromkeys(r.seed for r in runs))
    want_losses = list(losses) if losses is not None else found_losses
    want_seeds = [int(s) for s in seeds] if seeds is not None else found_seeds
    chosen, missing = [], []
    for loss in want_losses:
        for seed in want_seeds:
            matches = [r for r in runs if r.loss == loss and r.seed == seed]
            if len(matches) > 1:
                folders = ", ".join(str(r.folder) for r in matches)
                raise IncomparableRuns(f"run {loss}-seed{seed} is there twice: {folders}")
            if matches:
                chosen.append(matches[0])
            else:
                missing.append(f"{loss}-seed{seed}")
    if missing:
        raise IncomparableRuns(
            f"the sweep lacks run(s) {', '.join(missing)} of losses {want_losses} x seeds "
            f"{want_seeds}"
        )
    chosen.sort(key=lambda r: (r.job_num, r.folder.name))
    return chosen, want_losses, want_seeds


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files in ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                out[tag] += [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)]
    # Resumed runs append to the same tags: keep the latest value of each step.
    return {tag: sorted(dict(values).items()) for tag, values in out.items()}


def read_run(run: _Run) -> RunResult:
    """Final metrics from ``last.pt``; the mIoU curve and speed from TensorBoard."""
    assert run.checkpoint is not None
    metrics = (run.checkpoint.get("metrics") or {}).get("val") or {}
    if "mIoU" not in metrics:
        raise IncomparableRuns(
            f"run {run.name} has no evaluation in {run.folder}/checkpoints/last.pt"
        )
    # Images per optimizer step: the micro-batch times the accumulation steps.
    accumulate = int((run.config.get("trainer") or {}).get("accumulate", 1) or 1)
    batch_size = int(run.config["loader"]["batch_size"]) * accumulate
    scalars = read_scalars(run.folder, [MIOU_TAG, "train/speed/images_per_s"])
    speeds = [v for _, v in scalars["train/speed/images_per_s"] if v > 0]
    seconds_per_iter = batch_size / statistics.median(speeds) if speeds else math.nan
    return RunResult(
        loss=run.loss,
        seed=run.seed,
        run_dir=str(run.folder),
        iteration=int(run.checkpoint["iteration"]),
        miou=float(metrics["mIoU"]),
        class_iou=[math.nan if v is None else float(v) for v in metrics["IoU"]],
        curve=scalars[MIOU_TAG],
        seconds_per_iter=seconds_per_iter,
        class_weight=_class_weight(run.config),
        class_weight_auto=stored_auto_weights({"config": run.config}) is not None,
    )


def _class_weight(config: Mapping[str, Any]) -> list[float] | None:
    """A stored config's ``loss.class_weight`` list (None: no class weights)."""
    value = (config.get("loss") or {}).get("class_weight")
    return [float(v) for v in value] if isinstance(value, list) else None


def read_sweep(
    sweep_dir: Path, losses: Sequence[str] | None = None, seeds: Sequence[int] | None = None
) -> Sweep:
    """The runs of ``sweep_dir`` as one checked budget (see the module docstring).

    Raises:
        ConfigError: no sweep folder, or no run in it.
        IncomparableRuns: a run short of its budget, missing or twice, or runs that
            differ in more than loss and seed.
    """
    runs = _load_runs(sweep_dir)
    if not runs:
        raise ConfigError(f"no runs in {sweep_dir}: expected job folders with checkpoints/last.pt")
    check_one_budget(runs)
    chosen, want_losses, want_seeds = _select_grid(runs, losses, seeds)
    return Sweep([read_run(r) for r in chosen], want_losses, want_seeds, chosen[0].config)


def recorded_sweep_command(sweep_dir: Path) -> str | None:
    """The ``tools/train.py -m`` command that made the sweep, from its ``multirun.yaml``."""
    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return None
    task = OmegaConf.select(OmegaConf.load(record), "hydra.overrides.task")
    return " ".join(["python tools/train.py -m", *(str(o) for o in task or [])])


def class_pixel_counts(config: Mapping[str, Any]) -> list[int]:
    """Training pixels per train id of a run's dataset (reads every training label once).

    The dataset node comes from a checkpoint: only seg's own classes are built from it
    (``seg.instantiate.check_targets``), it reads without a cache and generates nothing.
    """
    dataset = build_run_dataset(
        config["dataset"]["train"], "training dataset of the runs", transform=None, strict=False
    )
    report = check_split(dataset, "train")
    return [int(v) for v in report.train_id_pixels[: int(config["dataset"]["num_classes"])]]


def build_run_dataset(node: Mapping[str, Any], what: str, **options: Any) -> Any:
    """Build a dataset node of a run's stored config (``dataset.train`` or ``.val``).

    The node comes from a checkpoint: only seg's own classes are built from it
    (``seg.instantiate.build_from_checkpoint``). It reads the files as they are: no decoded
    cache (it may exist only where the run trained) and no generation. ``options``: more
    keyword arguments for the dataset (e.g. ``transform=None``).
    """
    dataset_cfg = OmegaConf.create(dict(node))
    off = {k: v for k, v in (("cache", None), ("generate", False)) if k in dataset_cfg}
    return build_from_checkpoint(dataset_cfg, what, **off, **options)

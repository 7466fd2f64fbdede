"""What a training checkpoint holds and how a run gets it back: progress, RNG, resume.

A checkpoint (contract in docs/architecture.md) is the states of the model, optimizer,
LR schedule, GradScaler and loss (GHM-C's moving bin counts; empty for the other losses),
the EMA of the weights when ``trainer.ema`` is on (``"ema"``), the :class:`TrainState`
(iteration, metrics, the best score of ``trainer.best_metric`` and the early-stopping count,
skip counts), the global RNG states and the resolved config. Only tensors and plain containers
go in, so that ``torch.load(weights_only=True)`` reads it back (``seg.checkpoint``).

Resuming (``resume=...``, :func:`resolve_resume`):

- ``resume=PATH``: continue from that checkpoint, whatever its config (this is how a
  finished run is extended: ``resume=PATH trainer.max_iters=N``; the schedule follows the
  new length, so the result differs from a run trained to N from the start);
- ``resume=auto``: continue the newest ``checkpoints/last.pt`` of a run of this
  experiment (``outputs/<experiment_name>/*/``) whose stored config equals this one,
  ignoring only :data:`RESULT_NEUTRAL_KEYS`; ``trainer.max_iters`` must match too. With
  none, training starts afresh and one line in ``train.log`` says why. Inside a multirun
  a job looks in its own job folder only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg.checkpoint import load_checkpoint
from seg.engine.step import TrainStep
from seg.errors import CheckpointError, ConfigError, first_line


# ----------------------------------------------------------------------------- progress
@dataclass
class TrainState:
    """Where a run stands, besides the states of its model and optimizer.

    Attributes:
        iteration: steps taken.
        metrics: the last evaluation (plain floats and lists, fractions in [0, 1]).
        best_metric: what ``best_score`` measures (``trainer.best_metric``,
            ``seg.engine.selection``): ``mIoU``, ``mAcc``, ``aAcc``, ``fwIoU`` or ``IoU/<class>``.
        best_score, best_iteration: the best value of ``best_metric`` so far and where
            (``-inf``/-1: none); ``best.pt`` holds the weights that scored it.
        stall_reference, evals_since_improvement: early stopping (``trainer.early_stop``):
            the score at the last evaluation that improved by more than ``min_delta``, and
            the evaluations since then (counted whether early stopping is on or not).
        nonfinite_steps, nonfinite_streak: skipped steps in total and the current run of
            consecutive ones, as of the last checkpoint (the loop keeps the live counts).
        stopped_by: the name of the signal that stopped the run (``"SIGINT"``,
            ``"SIGTERM"``, ``"SIGUSR1"``, ``"SIGUSR2"``; ``seg.signals``), or None.
        stopped_early: early stopping ended the run before ``trainer.max_iters``.
    """

    iteration: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    best_metric: str = "mIoU"
    best_score: float = -math.inf
    best_iteration: int = -1
    stall_reference: float = -math.inf
    evals_since_improvement: int = 0
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    stopped_by: str | None = None
    stopped_early: bool = False

    def record(self, score: float, min_delta: float = 0.0) -> bool:
        """Count one evaluation's ``score``; True (and recorded) when it beats the best so far.

        For early stopping, ``score`` is an improvement when it beats ``stall_reference``
        by more than ``min_delta`` (the reference then moves to it and the count restarts);
        otherwise the count grows. NaN (an undefined score) is never an improvement.
        """
        if not math.isnan(score) and score > self.stall_reference + min_delta:
            self.stall_reference, self.evals_since_improvement = score, 0
        else:
            self.evals_since_improvement += 1
        if math.isnan(score) or score <= self.best_score:
            return False
        self.best_score, self.best_iteration = score, self.iteration
        return True

    def use_metric(self, name: str) -> bool:
        """Judge by ``name`` from now on; a change forgets the best score and the
        early-stopping count (another metric's values are no reference). True if changed."""
        if name == self.best_metric:
            return False
        self.best_metric, self.best_score, self.best_iteration = name, -math.inf, -1
        self.stall_reference, self.evals_since_improvement = -math.inf, 0
        return True


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def checkpoint_payload(
    model: nn.Module,
    step: TrainStep,
    state: TrainState,
    config: Mapping[str, Any],
    dataset_templates: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a run (rank 0's RNG states; ``"ema"`` when the step has one;
    ``"dataset_templates"``, the unresolved dataset paths, when given:
    ``seg.engine.dataset_paths``)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "loss": step.criterion.state_dict(),
        "iteration": state.iteration,
        "rng": capture_rng_state(),
        "config": dict(config),
        "metrics": {
            "val": plain(state.metrics),
            "best_metric": state.best_metric,
            "best_score": _finite_or_none(state.best_score),
            "best_iteration": state.best_iteration,
            "early_stop": {
                "reference": _finite_or_none(state.stall_reference),
                "evals_since_improvement": state.evals_since_improvement,
            },
            "nonfinite_steps": state.nonfinite_steps,
            "nonfinite_streak": state.nonfinite_streak,
        },
    }
    if state.best_metric == "mIoU":  # the key of checkpoints before trainer.best_metric
        payload["metrics"]["best_mIoU"] = payload["metrics"]["best_score"]
    if step.ema is not None:
        payload["ema"] = step.ema.state_dict()
    if dataset_templates is not None:
        payload["dataset_templates"] = dict(dataset_templates)
    return payload


def restore(
    checkpoint: Mapping[str, Any], source: Path, model: nn.Module, step: TrainStep
) -> TrainState:
    """Load a checkpoint's states into ``model`` and ``step``; returns the run's progress.

    The RNG states are not applied here: the loop applies them once the data iterator
    exists, in the same order as in an uninterrupted run. With ``trainer.ema`` on, the EMA
    comes back from the checkpoint's ``"ema"``, or starts from the restored weights when
    the checkpoint has none (its run had EMA off).

    Raises:
        CheckpointError: the checkpoint's states do not fit this config's model/optimizer.
    """
    try:
        model.load_state_dict(checkpoint["model"])
        step.optimizer.load_state_dict(checkpoint["optimizer"])
        step.scheduler.load_state_dict(checkpoint["scheduler"])
        if "loss" in checkpoint:  # checkpoints from before losses had state lack it
            step.criterion.load_state_dict(checkpoint["loss"])
        if step.ema is not None and "ema" in checkpoint:
            step.ema.load_state_dict(checkpoint["ema"])
        elif step.ema is not None:
            step.ema.reset()
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"cannot resume from {source}: it does not fit this config ({first_line(error, limit=200)})"
        ) from None
    scaler_state = checkpoint.get("scaler") or {}
    if step.scaler.is_enabled() and scaler_state:
        step.scaler.load_state_dict(scaler_state)
    return progress_of(checkpoint)


def progress_of(checkpoint: Mapping[str, Any]) -> TrainState:
    """The :class:`TrainState` stored in a checkpoint (no states are loaded).

    Checkpoints from before ``trainer.best_metric`` hold ``best_mIoU`` only: their best
    score is that mIoU, the early-stopping reference is it too and the count starts at 0.
    """
    metrics = checkpoint.get("metrics") or {}
    best = metrics.get("best_score", metrics.get("best_mIoU"))
    stall = metrics.get("early_stop") or {}
    reference = stall.get("reference", best)
    return TrainState(
        iteration=int(checkpoint["iteration"]),
        metrics=dict(metrics.get("val") or {}),
        best_metric=str(metrics.get("best_metric", "mIoU")),
        best_score=float(best) if best is not None else -math.inf,
        best_iteration=int(metrics.get("best_iteration", -1)),
        stall_reference=float(reference) if reference is not None else -math.inf,
        evals_since_improvement=int(stall.get("evals_since_improvement", 0)),
        nonfinite_steps=int(metrics.get("nonfinite_steps", 0)),
        nonfinite_streak=int(metrics.get("nonfinite_streak", 0)),
    )


def plain(value: Any) -> Any:
    """Metrics as plain floats/lists/dicts (checkpoint-safe, JSON-friendly)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- RNG state
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *(v for v in np_state[2:])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -------------------------------------------------------------------------------- resume
#: Settings that cannot change what a run computes (its weights, evaluations and
#: checkpoints' content): ``resume=auto`` ignores them when it compares configs. Log and
#: checkpoint intervals, snapshots kept, TensorBoard images and the finite-loss check frequency only
#: decide when things are written or read; the data order and augmentation depend on
#: the seed and the sample's position, not on the number of loader workers
#: (tests/test_resume.py), and the decoded cache holds exactly the source files' pixels
#: (tests/test_data_cache.py); ``dataset.check_splits`` and ``dataset.missing_hint`` are read
#: by tools/check_dataset.py and error messages only. Everything else, ``trainer.max_iters``
#: included, must match.
#: Not neutral, by decision: ``trainer.best_metric`` (it decides which weights ``best.pt``
#: holds) and ``trainer.early_stop.*`` (patience and min_delta decide the iteration a run
#: ends at, hence its ``last.pt``): changing them on resume is ``resume=PATH``, which names
#: the change, e.g. a run that stopped early continued with a larger patience.
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "resume",
    "trainer.log_interval",
    "trainer.ckpt_interval",
    "trainer.num_vis_images",
    "trainer.keep_snapshots",
    "trainer.check_finite_every_step",
    "loader.num_workers",
    "dataset.check_splits",
    "dataset.missing_hint",
    *(
        f"dataset.{node}{key}"
        for node in ("", "train.", "val.")
        for key in ("cache", "cache_build")
    ),
)


#: The key of a stored config that records what its run resolved when it started: a
#: mirror of the config holding, at each key the run replaced, the command's value
#: (``loss.class_weight: auto`` resolved to a list: ``seg.engine.class_weight``).
RESOLVED_FROM = "resolved_from"


def as_commanded(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as its command gave it: the values recorded under :data:`RESOLVED_FROM`
    put back, the record dropped. ``resume=auto`` compares configs in this form, so that
    a run that resolved ``loss.class_weight=auto`` equals the same command typed again."""
    record = config.get(RESOLVED_FROM)
    if not isinstance(record, Mapping):
        return dict(config)

    def put_back(node: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(node)
        for key, value in given.items():
            inner = out.get(key)
            both_nodes = isinstance(value, Mapping) and isinstance(inner, Mapping)
            out[key] = put_back(inner, value) if both_nodes else value
        return out

    return put_back({k: v for k, v in config.items() if k != RESOLVED_FROM}, record)


#: Settings added after checkpoints had been written, with the value that keeps what those
#: runs did: a stored config without the key reads as having it, so that ``resume=auto``
#: still continues the runs of older versions. Keys whose default is null need no entry:
#: an absent key and null compare equal (:func:`config_differences`).
ADDED_KEY_DEFAULTS: dict[str, Any] = {
    "trainer.best_metric": "mIoU",
    "trainer.early_stop.min_delta": 0.0,
    "trainer.overfit_batches": 0,
}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values; an empty mapping is one)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _with_added_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``flatten(config)`` with the :data:`ADDED_KEY_DEFAULTS` it lacks (where it has their
    section, ``trainer``, at all)."""
    flat = flatten(config)
    added = {k: v for k, v in ADDED_KEY_DEFAULTS.items() if k.split(".")[0] in config}
    return {**added, **flat}


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in ignore)


def config_differences(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    ignore: tuple[str, ...] = RESULT_NEUTRAL_KEYS,
) -> list[str]:
    """The dotted keys whose values differ between two resolved configs (or that one of
    them lacks), sorted, leaving out ``ignore`` and the keys below them. Both are compared
    as their commands gave them (:func:`as_commanded`), and a key of
    :data:`ADDED_KEY_DEFAULTS` that a config lacks reads as its default there. Any other key
    one config lacks and the other sets to null is no difference either: settings added to
    seg later default to null (off), so a run started before one existed still continues."""
    a, b = _with_added_defaults(as_commanded(stored)), _with_added_defaults(as_commanded(current))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if not _ignored(k, ignore) and plain(a.get(k)) != plain(b.get(k))]


def describe_differences(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: list[str],
    limit: int = 3,
    names: tuple[str, str] = ("there", "here"),
) -> str:
    """``"seed: 0 there, 1 here; ..."`` for the first ``limit`` of ``keys`` (``names``
    say which config is which)."""
    a, b = flatten(as_commanded(stored)), flatten(as_commanded(current))
    parts = [
        f"{k}: {a.get(k, '(absent)')} {names[0]}, {b.get(k, '(absent)')} {names[1]}"
        for k in keys[:limit]
    ]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(parts) + more


@dataclass(frozen=True)
class ResumeChoice:
    """What ``resume=`` resolved to: a checkpoint (or None: start afresh) and why, in
    one line for ``train.log``."""

    path: Path | None
    reason: str


def _stored_config(path: Path) -> dict[str, Any]:
    checkpoint = load_checkpoint(path, map_location="cpu", required_keys=("config",))
    config = checkpoint.get("config")
    return dict(config) if isinstance(config, Mapping) else {}


def find_auto_resume(
    run_dir: Path, config: Mapping[str, Any], own_folder_only: bool = False
) -> ResumeChoice:
    """``resume=auto``: the ``last.pt`` of a run of this experiment with this config.

    Candidates are ``run_dir``'s own ``checkpoints/last.pt`` and, unless
    ``own_folder_only`` (a multirun job: its own folder only), those of its siblings
    (``outputs/<experiment_name>/*/``), newest first. The first whose stored config
    equals ``config`` (:func:`config_differences`, ignoring :data:`RESULT_NEUTRAL_KEYS`)
    is chosen; with none, training starts afresh and the reason names the newest
    candidate's first differences.

    Raises:
        ConfigError: in ``own_folder_only`` mode, the folder holds a run with another
            config (starting afresh there would overwrite it).
    """
    own = run_dir / "checkpoints" / "last.pt"
    if own_folder_only:
        if not own.is_file():
            return ResumeChoice(None, f"resume=auto: no checkpoints/last.pt in {run_dir} yet")
        differences = config_differences(_stored_config(own), config)
        if differences:
            raise ConfigError(
                f"resume=auto: {own} holds a run with another config "
                f"({describe_differences(_stored_config(own), config, differences)}); it is "
                "not overwritten: use another hydra.sweep.dir or remove that folder"
            )
        return ResumeChoice(own, f"resume=auto: continuing this job's run {own}")
    candidates = [p for p in run_dir.parent.glob("*/checkpoints/last.pt") if p.is_file()]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        return ResumeChoice(
            None, f"resume=auto: no checkpoints/last.pt under {run_dir.parent}/*, starting afresh"
        )
    newest_differences = ""
    for path in candidates:
        try:
            stored = _stored_config(path)
        except CheckpointError as error:  # a broken old run must not block the others
            newest_differences = newest_differences or f"{path}: unreadable ({error})"
            continue
        differences = config_differences(stored, config)
        if not differences:
            return ResumeChoice(path, f"resume=auto: continuing {path} (same config)")
        if not newest_differences:
            newest_differences = f"{path}: {describe_differences(stored, config, differences)}"
    return ResumeChoice(
        None,
        f"resume=auto: none of the {len(candidates)} run(s) under {run_dir.parent} has this "
        f"config, starting afresh (newest, {newest_differences})",
    )


def resolve_resume(
    resume: Any, run_dir: Path, config: Mapping[str, Any], own_folder_only: bool = False
) -> ResumeChoice:
    """The checkpoint to resume from: ``None``, ``auto`` (:func:`find_auto_resume`) or a
    path, which must exist and is continued whatever its config (the reason then lists
    the differences, e.g. a raised ``trainer.max_iters`` that extends the run)."""
    if resume is None or resume is False or str(resume) == "":
        return ResumeChoice(None, "")
    if str(resume) == "auto":
        return find_auto_resume(run_dir, config, own_folder_only)
    path = Path(str(resume))
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    stored = _stored_config(path)
    differences = config_differences(stored, config)
    if differences:
        return ResumeChoice(
            path,
            f"resume={path}: continuing it although its config differs "
            f"({describe_differences(stored, config, differences)})",
        )
    return ResumeChoice(path, f"resume={path}: continuing it (same config)")

"""``tools/compare.py``: run the loss x seed sweep with ``tools/train.py -m``, then report.

The comparison is a Hydra multirun of the training tool::

    python tools/train.py -m <your overrides> seed=0,1,2 loss=ohem,ce,focal resume=auto \
        hydra.sweep.dir=<comparison folder> [hydra/launcher=joblib ...]

run as a child process on whatever launcher the compare command names (the basic one,
one job after another, by default; ``hydra/launcher=joblib`` for parallel jobs on this
machine; ``submitit_local`` / ``submitit_slurm`` through submitit). Seeds come first on
the command line so that the job order interleaves the losses (fair to a machine whose
speed drifts). ``resume=auto`` makes a rerun of the same command continue every
unfinished job in its own folder and leave finished ones as they are. When the sweep
has finished, the report is made from the run folders (``seg.compare.report``).

``sweep_dir=PATH`` skips the training and reports on an existing sweep folder (one made
by ``tools/train.py -m`` on a cluster, say).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from seg.cli import CONFIG_DIR, in_multirun, run_in_process
from seg.compare.report import write_report
from seg.errors import ConfigError, SegError
from seg.machine import describe_machine
from seg.values import int_setting

TRAIN_SCRIPT = CONFIG_DIR.parent / "tools" / "train.py"
#: Keys of configs/compare.yaml that belong to the comparison, not to the training runs.
COMPARE_KEYS = ("losses", "seeds", "sweep_dir", "bootstrap_replicates", "report_device")
#: Hydra overrides of the compare command that the sweep receives (the launcher's).
LAUNCHER_OVERRIDES = ("hydra/launcher=", "hydra.launcher.", "hydra.sweep.subdir=")
#: Signals passed on to the sweep (it runs in its own process group: each arrives once).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class SweepFailed(SegError):
    """The sweep's process ended with an error (exit status 1)."""


def plan_sweep(losses: Sequence[str], seeds: Sequence[int], available: set[str]) -> list[str]:
    """The two sweep overrides, seeds first so that the job order interleaves the losses:
    ``["seed=0,1", "loss=ohem,ce"]``."""
    if not losses or not seeds:
        raise ConfigError(
            "a comparison needs at least one loss in losses=[...] and one seed in seeds=[...]"
        )
    if len(set(losses)) != len(losses) or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"losses and seeds must not repeat (losses={list(losses)}, seeds={list(seeds)})"
        )
    unknown = [loss for loss in losses if loss not in available]
    if unknown:
        raise ConfigError(
            f"unknown loss {unknown} in losses=[...]; configs/loss has {sorted(available)}"
        )
    return [f"seed={','.join(str(int(s)) for s in seeds)}", f"loss={','.join(losses)}"]


def train_overrides(task_overrides: Sequence[str]) -> list[str]:
    """The user's command-line overrides that each training run receives."""
    own = tuple(f"{key}=" for key in COMPARE_KEYS)
    dropped = ("hydra.", "loss=", "seed=", "resume=")
    return [o for o in task_overrides if not o.startswith(own) and not o.startswith(dropped)]


def launcher_overrides(hydra_overrides: Sequence[str]) -> list[str]:
    """The compare command's Hydra overrides that choose and set the sweep's launcher."""
    return [o for o in hydra_overrides if o.startswith(LAUNCHER_OVERRIDES)]


def sweep_command(
    task_overrides: Sequence[str],
    hydra_overrides: Sequence[str],
    sweep: Sequence[str],
    sweep_dir: Path,
) -> list[str]:
    """The ``tools/train.py -m`` command line of the comparison."""
    return [
        sys.executable,
        str(TRAIN_SCRIPT),
        "-m",
        *train_overrides(task_overrides),
        *sweep,
        "resume=auto",
        f"hydra.sweep.dir={sweep_dir}",
        *launcher_overrides(hydra_overrides),
    ]


def run_sweep(command: Sequence[str]) -> int:
    """Run the sweep as a child process; returns its exit status.

    The child gets its own process group, and this process passes each stop signal on
    to that group once (Ctrl-C included), so every training job saves ``last.pt`` and
    stops, instead of being killed with this process.
    """
    process = subprocess.Popen(list(command), start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        del frame
        with contextlib.suppress(ProcessLookupError):  # the sweep has just ended
            os.killpg(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        return process.wait()
    except BaseException:
        # This process is going down (an error): stop the sweep as a scheduler would, so
        # that no job is left training on its own; the jobs save last.pt first.
        forward(signal.SIGTERM, None)
        process.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _choices() -> tuple[list[str], list[str], str, Path | None]:
    """(task overrides, hydra overrides, launcher name, output folder) of this command."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output = hydra_cfg.runtime.get("output_dir")
    return (
        [str(o) for o in hydra_cfg.overrides.task],
        [str(o) for o in hydra_cfg.overrides.hydra],
        str(hydra_cfg.runtime.choices.get("hydra/launcher") or "basic"),
        Path(str(output)) if output else None,
    )


def this_machine() -> str:
    """CPU / GPU, torch version and date of this machine, for the report."""
    info = describe_machine("cuda" if torch.cuda.is_available() else "cpu")
    return (
        f"{info['cuda_device'] or info['cpu']} ({info['cpu_cores']} CPU cores), "
        f"torch {info['torch']}, {info['date']}"
    )


def compare(cfg: DictConfig) -> int:
    """``tools/compare.py``'s work (configs/compare.yaml)."""
    if in_multirun():
        raise ConfigError("tools/compare.py runs its own sweep: drop -m/--multirun")
    task, hydra_overrides, launcher, out_dir = _choices()
    given = {o.split("=", 1)[0] for o in task}
    report_options = {
        "replicates": int_setting(cfg.bootstrap_replicates, "bootstrap_replicates", minimum=1),
        "device": str(cfg.report_device),
    }
    if cfg.get("sweep_dir"):
        sweep_dir = Path(str(cfg.sweep_dir))
        report = write_report(
            sweep_dir,
            [str(v) for v in cfg.losses] if "losses" in given else None,
            [int(v) for v in cfg.seeds] if "seeds" in given else None,
            machine=f"not recorded (report made on {this_machine()})",
            **report_options,
        )
        print(f"report: {report}")
        return 0
    if out_dir is None:
        raise ConfigError("no comparison folder: run tools/compare.py (or pass sweep_dir=...)")
    losses, seeds = [str(v) for v in cfg.losses], [int(v) for v in cfg.seeds]
    available = {p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")}
    sweep = plan_sweep(losses, seeds, available)
    command = sweep_command(task, hydra_overrides, sweep, out_dir)
    shown = " ".join(["python tools/train.py", *command[2:]])
    print(
        f"comparison: {len(losses) * len(seeds)} runs ({', '.join(losses)} x seeds {seeds}) "
        f"-> {out_dir}\nsweep: {shown}",
        flush=True,
    )
    status = run_sweep(command)
    if status > 128:  # stopped by a signal: the jobs saved last.pt; rerun to continue
        print(
            f"the sweep was stopped ({signal.Signals(status - 128).name}); no report. Rerun "
            f"the same command with hydra.run.dir={out_dir} to continue it.",
            file=sys.stderr,
        )
        return status
    if status != 0:
        raise SweepFailed(
            f"the sweep ended with exit status {status} (the failed jobs' error lines are "
            f"above); no report. Fix the cause and rerun with hydra.run.dir={out_dir}: "
            "finished runs are kept"
        )
    local = launcher in ("basic", "joblib", "submitit_local")
    machine = f"{this_machine()}, launcher {launcher}" if local else f"launcher {launcher}"
    shown_hydra = [o for o in hydra_overrides if not o.startswith("hydra.mode=")]
    own = " ".join(["python tools/compare.py", *task, *shown_hydra])
    report = write_report(out_dir, losses, seeds, command=own, machine=machine, **report_options)
    print(f"report: {report}\nTensorBoard: tensorboard --logdir {out_dir}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``tools/compare.py ARGS`` in this process (the report step: ``sweep_dir=PATH``)."""
    return run_in_process("compare", argv, compare)

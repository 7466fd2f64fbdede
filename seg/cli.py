"""The one edge between a tool's work and the shell: error lines and exit statuses.

Every tool in ``tools/`` is a ``@hydra.main`` app whose body is one call,
``run_job(work, cfg)``, and whose module ends with ``run_app(main)``::

    @hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        run_job(evaluate, cfg)

    if __name__ == "__main__":
        run_app(main)

``work(cfg)`` does the job and returns an exit status (``None`` = 0). What goes wrong is
printed as ONE line, ``error: <message>``, on stderr, and the process exits with:

====  ===========================================================================
0     done
1     the work failed although its input was accepted: any :class:`SegError` that is not
      one of the input errors below (training diverged, a sweep job failed, runs short of
      their budget, files skipped by predict), or a job of a multirun that failed
2     bad input or config, to be fixed by the user: :class:`ConfigError`,
      :class:`DatasetError`, :class:`CheckpointError`, Hydra's own errors (a mistyped
      override, an unknown config group option, a missing ``???`` value), ``OSError``
      on a path (an unwritable output folder; the message names the path), and any
      ``SegError`` class that says so (``exit_status = 2``, e.g. a missing extra)
128+N stopped by signal N (the run saved what it had first): 130 SIGINT, 143 SIGTERM,
      138 SIGUSR1, 140 SIGUSR2 (``seg.signals``)
====  ===========================================================================

Inside a multirun (``-m``) a failing job prints its line prefixed with its overrides and
is marked failed, so that the other jobs still run; the sweep then ends with one more
``error:`` line and the job's status. A job stopped by a signal stops the sweep with
that signal's status.

Hydra's own errors reach :func:`run_app` because it runs the app with Hydra's
``HYDRA_FULL_ERROR`` switch on (Hydra re-raises instead of printing a traceback); a user
who sets ``HYDRA_FULL_ERROR=1`` themselves gets Hydra's full traceback as usual.

:func:`run_in_process` runs the same work with the same config and error edge from
Python (tests, notebooks), composing the config with Hydra's compose API.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from seg.errors import CheckpointError, ConfigError, DatasetError, SegError
from seg.signals import exit_status as signal_status
from seg.signals import sweep_stopped

#: The project's config folder (``configs/``): every tool's config lives here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
#: The errors that mean "fix your command, files or config" (exit status 2).
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetError,
    CheckpointError,
    HydraException,
    OmegaConfBaseException,
    OSError,
)
#: Set beside HYDRA_FULL_ERROR when run_app (not the user) switched it on.
_OUR_SWITCH = "SEG_CLI_SET_HYDRA_FULL_ERROR"

Work = Callable[[DictConfig], "int | None"]


class JobFailed(Exception):
    """A multirun job that failed: Hydra marks the job failed and runs the others.

    ``status`` is the job's exit status (1 or 2), ``line`` the message it printed.
    """

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status, self.line = status, line

    def __reduce__(self) -> tuple[Any, ...]:  # joblib/submitit carry it back to the master
        return (JobFailed, (self.status, self.line))


def exit_status(error: BaseException) -> int:
    """The exit status for ``error`` (see the table in this module's docstring). A
    ``SegError`` subclass may fix its own with a class attribute ``exit_status``."""
    if isinstance(error, JobFailed):
        return error.status
    own = getattr(type(error), "exit_status", None)
    if isinstance(error, SegError) and isinstance(own, int):
        return own
    return EXIT_BAD_INPUT if isinstance(error, INPUT_ERRORS) else EXIT_FAILED


def error_line(error: BaseException) -> str:
    """``error`` as one line: the message's lines joined, Hydra's detail lines dropped."""
    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "a key"
        return f"{key}=... is required (it has no default; see --help)"
    text = str(error).strip() or type(error).__name__
    # Hydra lists its config search path after the message: not for users.
    text = text.split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip(" ^")]
    if isinstance(error, OverrideParseException) and error.override not in text:
        lines.insert(0, f"cannot parse the override {error.override!r}:")
    # OmegaConf appends "full_key: ..., object_type=..." lines: the first line names the key.
    details = ("full_key:", "object_type=", "reference_type=", "See https://hydra.cc")
    kept = [line for line in lines if not line.startswith(details)] or lines[:1]
    cause = error.__cause__
    if isinstance(error, HydraException) and isinstance(cause, OmegaConfBaseException):
        first_cause = str(cause).strip().splitlines()[0].strip() if str(cause).strip() else ""
        if first_cause and first_cause not in kept:
            kept.append(first_cause)
    return _join(kept)


def _join(lines: list[str]) -> str:
    """Message lines as one: sentences joined by spaces, list items (after a line that
    ends with ``:``) by commas."""
    out = ""
    listing = False
    for line in lines:
        if not out:
            out = line
        elif listing:
            out += f", {line}" if not out.endswith(":") else f" {line}"
        else:
            out += " " + line if out.endswith((".", ":")) else f"; {line}"
        listing = line.endswith(":") or (listing and not line.endswith("."))
    return out


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_label() -> str:
    """This multirun job's number and folder, e.g. ``[job 3, multirun/x/ce-seed1]``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "[job]"
    hydra_cfg = HydraConfig.get()
    folder = hydra_cfg.runtime.get("output_dir")
    return f"[job {hydra_cfg.job.num}, {folder}]" if folder else f"[job {hydra_cfg.job.num}]"


def jobs_run_elsewhere() -> bool:
    """True in a multirun job run by a launcher other than the basic one (joblib,
    submitit): the job is not the master process."""
    from hydra.core.hydra_config import HydraConfig

    launcher = HydraConfig.get().runtime.choices.get("hydra/launcher") or "basic"
    return in_multirun() and launcher != "basic"


def run_job(work: Work, cfg: DictConfig) -> None:
    """Run one tool's ``work(cfg)`` behind the error edge (call it from the Hydra task).

    A single run ends the process on failure (``SystemExit`` with the status, after the
    ``error:`` line). In a multirun a failure raises :class:`JobFailed` so that Hydra
    records it and goes on with the other jobs. A job stopped by a signal ends the sweep:
    with the basic launcher at once (``SystemExit``); with joblib or submitit as a failed
    job once every running job has saved (``seg.signals.SweepSignals``), jobs of
    a stopped sweep not started yet are skipped.
    """
    if in_multirun():
        from hydra.core.hydra_config import HydraConfig

        stopped = sweep_stopped(Path(str(HydraConfig.get().sweep.dir)))
        if stopped is not None:
            line = f"{job_label()} skipped: the sweep was stopped ({stopped})"
            print(line, file=sys.stderr, flush=True)
            raise JobFailed(signal_status(stopped), line)
    try:
        status = int(work(cfg) or 0)
    except (SegError, OSError, OmegaConfBaseException, HydraException) as error:
        status, line = exit_status(error), error_line(error)
        if in_multirun():
            line = f"{job_label()} {line}"
            print(f"error: {line}", file=sys.stderr, flush=True)
            raise JobFailed(status, line) from None
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None
    if status == 0:
        return
    if in_multirun() and status in (EXIT_FAILED, EXIT_BAD_INPUT):
        raise JobFailed(status, f"{job_label()} ended with exit status {status}")
    if status > 128 and jobs_run_elsewhere():  # let the master wait for the others' saves
        name = signal.Signals(status - 128).name
        raise JobFailed(status, f"{job_label()} stopped by {name}, last.pt saved")
    raise SystemExit(status)


def run_app(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function and give Hydra's own errors the same edge.

    Hydra's errors (a mistyped override, an unknown group option) and a failed multirun
    job arrive here as exceptions; each becomes one ``error:`` line and its exit status.
    """
    user_full_error = (
        os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OUR_SWITCH) != "1"
    )
    if not user_full_error:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        os.environ[_OUR_SWITCH] = "1"
    try:
        main()
    except JobFailed as error:
        print(f"error: the sweep did not finish: {error.line}", file=sys.stderr, flush=True)
        raise SystemExit(error.status) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits 130)
        print("error: interrupted (SIGINT)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (HydraException, OmegaConfBaseException, SegError, OSError) as error:
        if user_full_error:
            raise
        print(f"error: {error_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(exit_status(error)) from None
    raise SystemExit(0)


@contextmanager
def _hydra_config_set(hydra_cfg: DictConfig) -> Iterator[None]:
    """Make ``HydraConfig.get()`` answer as inside ``@hydra.main`` (restored afterwards)."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(hydra_cfg)
    try:
        yield
    finally:
        instance.cfg = previous


def compose_tool_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` as the tool would, hydra
    node included (``cfg.hydra``); Hydra's errors become one-line :class:`ConfigError`."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(
                config_name=config_name, overrides=list(overrides), return_hydra_config=True
            )
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(error_line(error)) from None


def run_in_process(config_name: str, argv: Sequence[str], work: Work) -> int:
    """Run a tool's ``work`` in this process with command-line style ``argv`` overrides;
    returns the exit status the tool would have (error lines on stderr, as the tool)."""
    flags = [a for a in argv if a.startswith("-")]
    try:
        if flags:
            raise ConfigError(
                f"{' '.join(flags)}: only key=value overrides run in-process (use the tool)"
            )
        full = compose_tool_config(config_name, argv)
    except ConfigError as error:
        print(f"error: {error_line(error)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    task_cfg = copy.deepcopy(full)  # as Hydra's run_job: the task sees no hydra node
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    with _hydra_config_set(full):
        try:
            run_job(work, task_cfg)
        except SystemExit as stop:
            return int(stop.code or 0)
    return 0

"""Clean stops: a signal asks the loop to stop after the current step and save ``last.pt``.

=========  ===========================================  ==================================
signal     who sends it                                 what the run does, exit status
=========  ===========================================  ==================================
SIGINT     Ctrl-C                                       save, stop; 130
SIGTERM    ``kill``, schedulers, torchrun's agent       save, stop; 143
SIGUSR1    SLURM ``--signal=USR1@<seconds>`` before     save, stop, hand over (below); 138
           the time limit, or at preemption
SIGUSR2    submitit's default for the same purpose      save, stop, hand over; 140
           (``SUBMITIT_PREEMPT_SIGNAL``)
=========  ===========================================  ==================================

The exit status is the shell's 128 + signal number (:func:`exit_status`), so a scheduler
or script can tell an interrupted run from a finished one (0).

Hand-over (:func:`hand_over`): after ``last.pt`` is written, a USR signal is passed on to
the handler that was installed before training started, if it is a Python one. Inside a
job of Hydra's submitit launcher that is submitit's: it asks the launcher for a
checkpoint (the same job, same overrides, same job folder), requeues the job (SLURM:
``scontrol requeue``; the local executor restarts it) and exits. The requeued job runs
with ``resume=auto`` and continues its own folder's ``last.pt``. Inside a submitit job
SIGTERM is left to submitit, which ignores it by design: clusters send SIGTERM before
the USR signal at preemption, and the USR signal is the one that saves and requeues.

Under DDP the ranks agree on stopping at log intervals only (one all-reduce of the
signal number there), so every rank stops after the same iteration, with the same
reason, without a collective per step.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seg import dist

#: The signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
#: The signals that ask for a save before a requeue (passed on by :func:`hand_over`).
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def exit_status(reason: str | None) -> int:
    """The process exit status for a run stopped by signal ``reason`` (0: not stopped)."""
    if reason is None:
        return 0
    return 128 + int(signal.Signals[reason])


def is_submitit_handler(handler: Any) -> bool:
    """True for a signal handler installed by submitit in its job process."""
    return callable(handler) and str(getattr(handler, "__module__", "")).startswith("submitit")


def hand_over(reason: str | None) -> None:
    """Pass a requeue signal on to the handler installed before training (call it after
    ``last.pt`` is saved). Submitit's requeues the job and exits; without a Python
    handler (a plain process) this does nothing and the caller exits with
    :func:`exit_status`."""
    if reason is None:
        return
    signum = signal.Signals[reason]
    if signum not in REQUEUE_SIGNALS:
        return
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(int(signum), None)


class StopSignals:
    """A context that turns :data:`STOP_SIGNALS` into a stop request.

    The first signal sets :attr:`reason` (its name). A second Ctrl-C aborts at once; a
    repeated SIGTERM or USR signal changes nothing (schedulers and parents may deliver one
    signal twice: to the job's processes and through a parent passing it on; SIGKILL is the
    hard stop). Inside a thread other than the main one signals cannot be caught; the
    context then does nothing. On exit the handlers found on entry are put back
    (submitit's among them, for :func:`hand_over`).
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._main_pid = os.getpid()

    def __enter__(self) -> StopSignals:
        try:
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if signum == signal.SIGTERM and is_submitit_handler(current):
                    continue  # submitit ignores SIGTERM on purpose (module docstring)
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: leave signals alone
            self._restore()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def request(self, reason: str) -> None:
        """Ask for a stop after the current step (what the signal handler does)."""
        self.reason = self.reason or reason

    def agreed(self, check_now: bool, device: torch.device) -> bool:
        """Whether to stop now. Under DDP the ranks agree only when ``check_now`` (one
        all-reduce of the signal number; a rank stopped by a peer takes the peer's signal
        as its reason)."""
        if not dist.is_distributed():
            return self.reason is not None
        if not check_now:
            return False
        number = int(signal.Signals[self.reason]) if self.reason is not None else 0
        flag = torch.tensor(float(number), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        received = int(flag.item())  # the sync: only at log intervals
        if received > 0:
            self.request(signal.Signals(received).name)
        return received > 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if os.getpid() != self._main_pid:
            # A data-loader worker forked after the handler was installed: Ctrl-C reaches the
            # whole process group, and workers must keep serving until the main process stops.
            return
        name = signal.Signals(signum).name
        if self.reason is None:
            # tqdm.write keeps the bar intact; logging may not be safe inside a handler.
            from tqdm import tqdm

            again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
            tqdm.write(f"{name}: stopping after this iteration and saving last.pt{again}")
        self.request(name)
        if signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# --------------------------------------------------------------------- a sweep's master
#: Launchers whose jobs are processes of this machine, in the master's process group.
LOCAL_PROCESS_LAUNCHERS = ("joblib", "submitit_local")
#: The file that tells the jobs of a sweep not started yet that the sweep was stopped.
STOP_FILE = ".stop"
_master: dict[str, Any] = {"reason": None, "previous": {}, "stop_file": None}


def sweep_stopped(sweep_dir: Path) -> str | None:
    """The name of the signal that stopped the sweep in ``sweep_dir``, or None."""
    path = sweep_dir / STOP_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or "SIGTERM"


class SweepSignals(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/train.yaml): stop signals in a sweep.

    With a launcher whose jobs are processes of this machine (joblib, submitit_local), the
    master would die on Ctrl-C and take the jobs down before they save. Instead it keeps
    waiting: the jobs (which got the same Ctrl-C, or the SIGTERM the master passes on to
    its process group) save ``last.pt`` and stop, jobs not started yet are skipped (the
    master writes ``<sweep dir>/.stop``), and the sweep ends with 128 + the signal's
    number. A second Ctrl-C aborts at once. The basic launcher runs jobs in the master
    itself, where the training's own handlers act; submitit_slurm jobs run elsewhere and
    Ctrl-C only stops the master's waiting, as usual.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        (sweep_dir / STOP_FILE).unlink(missing_ok=True)  # a rerun: forget the last stop
        if config.hydra.runtime.choices.get("hydra/launcher") in LOCAL_PROCESS_LAUNCHERS:
            _master["stop_file"] = sweep_dir / STOP_FILE
            for signum in STOP_SIGNALS:
                _master["previous"][signum] = signal.signal(signum, _on_master_signal)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for signum, handler in _master["previous"].items():
            signal.signal(signum, handler)
        _master.update(reason=None, previous={}, stop_file=None)


def _on_master_signal(signum: int, frame: FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if _master["reason"] is not None:
        if signum == signal.SIGINT and name == _master["reason"]:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        return
    _master["reason"] = name
    stop_file: Path = _master["stop_file"]
    stop_file.parent.mkdir(parents=True, exist_ok=True)
    stop_file.write_text(f"{name}\n")
    print(
        f"{name}: the sweep stops: running jobs save last.pt and stop, the others are "
        "skipped (Ctrl-C again to abort)",
        file=sys.stderr,
        flush=True,
    )
    if signum != signal.SIGINT:  # Ctrl-C reached the jobs already; a kill reached only us
        os.killpg(os.getpgid(0), signum)

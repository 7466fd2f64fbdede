"""Clean stops: SIGINT/SIGTERM ask the loop to stop after the current step and save.

Under DDP the ranks agree on stopping at log intervals only (one all-reduce there), so
every rank stops after the same iteration without a collective per step.
"""

from __future__ import annotations

import os
import signal
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed

from seg import dist

#: The signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context that turns :data:`STOP_SIGNALS` into a stop request.

    The first signal sets :attr:`reason` (its name) and restores the default action, so a
    second one aborts at once. Inside a thread other than the main one signals cannot be
    caught; the context then does nothing.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._main_pid = os.getpid()

    def __enter__(self) -> StopSignals:
        try:
            for signum in STOP_SIGNALS:
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
        all-reduce; a rank stopped by a peer gets reason ``"peer"``)."""
        if not dist.is_distributed():
            return self.reason is not None
        if not check_now:
            return False
        flag = torch.tensor(float(self.reason is not None), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item() > 0)  # the sync: only at log intervals
        if stop:
            self.request("peer")
        return stop

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

            tqdm.write(f"{name}: stopping after this iteration and saving last.pt (again to abort)")
        self.request(name)
        signal.signal(
            signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

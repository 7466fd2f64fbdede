"""The tools' error edge (seg/cli.py) and the stop signals' statuses and hand-over."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from seg import signals
from seg.cli import JobFailed, error_line, exit_status, run_in_process
from seg.engine.loop import NonFiniteLossError
from seg.errors import CheckpointError, ConfigError, DatasetError, SegError


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConfigError("x"), 2),
        (DatasetError("x"), 2),
        (CheckpointError("x"), 2),
        (ConfigCompositionException("x"), 2),
        (PermissionError(13, "Permission denied", "/out"), 2),
        (NonFiniteLossError("x"), 1),  # the input was fine; the work failed
        (SegError("x"), 1),
        (JobFailed(2, "x"), 2),
    ],
)
def test_exit_status_of_each_kind_of_error(error: BaseException, status: int) -> None:
    assert exit_status(error) == status


def test_a_seg_error_class_may_set_its_own_status() -> None:
    from seg.export import ExportError
    from seg.extras import DeployDependencyError

    assert exit_status(DeployDependencyError("pip install -e '.[deploy]'")) == 2
    assert exit_status(ExportError("logits differ")) == 1


def test_error_line_is_one_line() -> None:
    error = ConfigCompositionException(
        "Could not override 'trainer.max_iterz'.\nTo append to your config use "
        "+trainer.max_iterz=3\nKey 'max_iterz' is not in struct\n    full_key: trainer.max_iterz"
        "\n    object_type=dict"
    )
    line = error_line(error)
    assert "\n" not in line and "trainer.max_iterz" in line and "object_type" not in line
    listing = error_line(
        ConfigCompositionException(
            "In 'train': Could not find 'loss/nope'\n\nAvailable options in 'loss':\n\tce\n"
            "\tohem\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf"
        )
    )
    assert (
        listing == "In 'train': Could not find 'loss/nope'; Available options in 'loss': ce, ohem"
    )


def test_job_failed_survives_the_trip_back_from_a_worker() -> None:
    again = pickle.loads(pickle.dumps(JobFailed(2, "[job 1] bad")))
    assert (again.status, again.line) == (2, "[job 1] bad")


def test_in_process_run_has_the_tools_statuses_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def work(cfg: object) -> int:
        raise DatasetError(f"dataset root not found: {tmp_path}")

    assert run_in_process("check_dataset", ["dataset=cityscapes"], work) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: dataset root not found: {tmp_path}"
    ]
    assert run_in_process("check_dataset", ["dataset.rooot=x"], lambda cfg: 0) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "dataset.rooot" in err[0]
    assert run_in_process("check_dataset", [], lambda cfg: 1) == 1
    assert run_in_process("check_dataset", ["--cfg", "job"], lambda cfg: 0) == 2


@pytest.mark.parametrize(
    ("reason", "status"),
    [(None, 0), ("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 138), ("SIGUSR2", 140)],
)
def test_signal_exit_statuses(reason: str | None, status: int) -> None:
    assert signals.exit_status(reason) == status


def test_usr1_stops_then_is_handed_over_to_the_previous_handler() -> None:
    """What submitit's handler sees: called once, after the run stopped (and saved)."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        with signals.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.agreed(True, torch.device("cpu")) and stop.reason == "SIGUSR1"
            assert calls == []  # not passed on while the run saves
        signals.hand_over(stop.reason)
        assert calls == [signal.SIGUSR1]
        signals.hand_over("SIGTERM")  # only requeue signals are passed on
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_submitit_keeps_its_sigterm_handler() -> None:
    """Inside a submitit job SIGTERM stays submitit's (it ignores it on purpose)."""

    def submitit_bypass(signum: int, frame: object) -> None:
        del signum, frame

    submitit_bypass.__module__ = "submitit.core.job_environment"
    previous = signal.signal(signal.SIGTERM, submitit_bypass)
    try:
        with signals.StopSignals():
            assert signal.getsignal(signal.SIGTERM) is submitit_bypass
            assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_DFL  # ours: save first
        assert signal.getsignal(signal.SIGTERM) is submitit_bypass
    finally:
        signal.signal(signal.SIGTERM, previous)

"""Atomic checkpoint saving and safe, one-line-error loading."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg import checkpoint as ckpt_module
from seg.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint
from seg.errors import CheckpointError


def _payload(value: float = 1.0) -> dict:
    model = torch.nn.Conv2d(3, 4, 1)
    torch.nn.init.constant_(model.weight, value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"last_epoch": 3},
        "scaler": {},
        "iteration": 3,
        "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]},
        "config": {"dataset": {"num_classes": 4, "mean": [0.5, 0.5, 0.5]}, "seed": 0},
        "metrics": {"mIoU": 0.25},
    }


class _MarkerOnUnpickle:
    """Unpickling this object opens (creates) a marker file: a stand-in for hostile code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    payload = _payload()
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path, required_keys=CHECKPOINT_KEYS)
    assert set(loaded) == set(CHECKPOINT_KEYS)
    assert torch.equal(loaded["model"]["weight"], payload["model"]["weight"])
    assert loaded["config"] == payload["config"] and loaded["iteration"] == 3
    assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_failed_save_keeps_previous_file_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()
    bad = _payload(2.0)
    bad["metrics"] = {"fn": lambda: None}  # cannot be pickled: torch.save fails midway
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["model"]["weight"].flatten()[0] == 1.0


def test_crash_during_write_never_exposes_half_a_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()

    def crash_after_half(obj, file) -> None:
        file.write(before[: len(before) // 2])
        raise KeyboardInterrupt  # e.g. the job was killed

    monkeypatch.setattr(ckpt_module.torch, "save", crash_after_half)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _payload(2.0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "not found" in _one_line_error(tmp_path / "nope.pt")
    assert "not a file" in _one_line_error(tmp_path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am a text file\n")
    assert "not a PyTorch checkpoint" in _one_line_error(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    assert "not a seg checkpoint" in _one_line_error(listing)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_checkpoint(tmp_path: Path, keep: float) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(good, _payload())
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in _one_line_error(cut)


def test_missing_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    save_checkpoint(path, {"model": {}, "iteration": 1})
    assert "['config']" in _one_line_error(path)
    load_checkpoint(path, required_keys=("model",))  # fine when config is not needed


def test_hostile_pickle_is_refused_and_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = _payload()
    payload["metrics"] = _MarkerOnUnpickle(marker)
    torch.save(payload, path)
    assert "refused" in _one_line_error(path)
    assert not marker.exists()
    # The premise holds: an unsafe load would have run the payload's code.
    torch.load(path, weights_only=False)
    assert marker.exists()


class _FullDisk:
    """A file whose disk fills up after ``room`` bytes: writes then fail with ENOSPC."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


@pytest.mark.parametrize("room", [0, 5000])
def test_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch, room: int
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(
        ckpt_module.torch, "save", lambda obj, file: real_save(obj, _FullDisk(file, room))
    )
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _payload(2.0))
    message = str(info.value)
    assert message == (
        f"cannot save checkpoint {path}: No space left on device (ENOSPC); "
        "the previous last.pt is unchanged"
    )
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the partial file is gone
    with pytest.raises(CheckpointError, match=r"best\.pt: No space .*no best\.pt was written"):
        save_checkpoint(tmp_path / "best.pt", _payload(2.0))


# A writer killed mid-save: it writes part of a checkpoint, says so, and hangs.
_HANGING_WRITER = """
import sys, time
from seg.fileio import atomic_write

def write(file):
    file.write(b"x" * 4096)
    file.flush()
    print("writing", flush=True)
    time.sleep(60)

atomic_write(sys.argv[1], write, durable=True)
"""


def test_partial_file_of_a_killed_save_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """kill -9 during a save leaves ``.last.pt.<host>-<pid>-<hex>.partial``; the next load
    (a resume) or save in that folder removes it, and leaves a live writer's file alone."""
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, _payload(1.0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writer = subprocess.Popen(
        [sys.executable, "-c", _HANGING_WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        live = [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
        assert len(live) == 1
        load_checkpoint(path)  # the writer still runs: its file stays
        assert live[0].exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert live[0].exists()  # what kill -9 leaves behind
    assert load_checkpoint(path)["iteration"] == 3  # e.g. resume=... reads the folder
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]

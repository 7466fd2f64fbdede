"""seg.fileio: atomic writes keep the old file on failure and leave no partial file."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from seg import fileio
from seg.errors import OutputError
from seg.fileio import atomic_write, write_png, write_text_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_failed_write_keeps_old_content_and_no_partial_file(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "out" / "report.md"
    write_text_atomic(path, "old\n", durable=durable)

    def half_then_fail(file) -> None:
        file.write(b"new but cut")
        raise KeyboardInterrupt  # e.g. the job was killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail, durable=durable)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"]


def test_written_file_gets_umask_permissions_not_private(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "{}\n")
    plain = tmp_path / "plain.json"
    plain.write_text("{}\n")  # what open() gives under this process's umask
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_write_png_round_trips_and_rejects_what_cannot_be_encoded(tmp_path: Path) -> None:
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_png(tmp_path / "label.png", label)
    assert np.array_equal(cv2.imread(str(tmp_path / "label.png"), cv2.IMREAD_UNCHANGED), label)
    with pytest.raises(OSError, match=r"bad\.png"):
        write_png(tmp_path / "bad.png", np.zeros((2, 2, 7), np.uint8))  # 7 channels
    assert not (tmp_path / "bad.png").exists()


def _no_space(file) -> None:
    file.write(b"some bytes")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _wrapped_no_space(file) -> None:
    """As torch's zip writer reports it: a RuntimeError raised while handling the OSError."""
    try:
        _no_space(file)
    except OSError:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None


@pytest.mark.parametrize("write", [_no_space, _wrapped_no_space])
def test_full_disk_is_one_output_error_naming_the_file(tmp_path: Path, write) -> None:
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(OutputError) as info:
        atomic_write(path, write)
    assert str(info.value) == f"cannot write {path}: No space left on device (ENOSPC)"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_unwritable_folder_is_one_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=r"cannot write .*file/out\.png: "):
        write_png(blocker / "out.png", np.zeros((2, 2), np.uint8))  # a file where a folder goes


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    return int(done.stdout)


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    host, dead = fileio._host(), _dead_pid()
    names = {
        "dead_here": f".last.pt.{host}-{dead}-0123abcd.partial",
        "dead_old_format": f".last.pt.{dead}-0123abcd.partial",  # names before hosts were in them
        "dead_video": f".a.mp4.{host}-{dead}-0123abcd.partial.mp4",
        "alive_here": f".last.pt.{host}-{os.getpid()}-0123abcd.partial",
        "other_host_fresh": f".last.pt.elsewhere-{dead}-0123abcd.partial",
        "other_host_old": f".best.pt.elsewhere-{dead}-0123abcd.partial",
        "not_ours": ".notes.partial",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - fileio.STALE_AFTER_S - 60
    os.utime(tmp_path / names["other_host_old"], (old, old))
    removed = {p.name for p in fileio.remove_stale_partials(tmp_path)}
    stale = {"dead_here", "dead_old_format", "dead_video", "other_host_old"}
    assert removed == {names[k] for k in stale}
    assert {p.name for p in tmp_path.iterdir()} == {v for k, v in names.items() if k not in stale}
    assert fileio.partial_path(tmp_path / "x.pt").name.startswith(f".x.pt.{host}-{os.getpid()}-")
    assert fileio.remove_stale_partials(tmp_path / "absent") == []

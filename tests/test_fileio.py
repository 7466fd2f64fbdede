"""seg.fileio: atomic writes keep the old file on failure and leave no partial file."""

from __future__ import annotations

import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

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

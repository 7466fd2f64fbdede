"""What a training run reports: ``train.log``, the tqdm bar, and TensorBoard.

Only rank 0 reports. Other ranks log warnings to the console and write no files.

TensorBoard tags (under ``<run dir>/tb``):

- ``train/loss`` (weighted total), ``train/loss/<head>`` (each head's loss),
  ``train/<head>/<stat>`` (loss statistics, e.g. ``train/main/kept_fraction`` for OHEM),
  ``train/lr``, ``train/images_per_s``, ``train/nonfinite_steps``;
- ``val/mIoU``, ``val/mAcc``, ``val/aAcc``, ``val/fwIoU``, ``val/IoU/<class>``;
- images ``val/sample_<i>``: input | ground truth | prediction, in the dataset's colours;
- the hyper-parameters with the final metrics (TensorBoard's HPARAMS tab,
  metric tags ``hparam/*``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from seg.visualize import colorize

#: Images shown in TensorBoard are shrunk (nearest) to at most this height.
MAX_PANEL_HEIGHT = 256
_OWNED = "_seg_train_handler"  # marks the handlers this module adds (removed on exit)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write`` so that the bar stays intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


@contextmanager
def run_logging(log_file: Path | None, is_main: bool) -> Iterator[logging.Logger]:
    """Send the ``seg.*`` loggers' records to the console (through tqdm) and, on rank 0, to
    ``log_file``.

    The ``seg`` logger gets the handlers for the duration of the block; they are removed and
    closed afterwards, so several runs in one process (tests) do not pile up handlers.
    Ranks other than 0 show warnings and errors only.
    """
    root = logging.getLogger("seg")
    handlers: list[logging.Handler] = [TqdmHandler()]
    if is_main and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    old_level, old_propagate = root.level, root.propagate
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler.setLevel(logging.INFO if is_main else logging.WARNING)
        setattr(handler, _OWNED, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # Hydra's console handler on the root logger would repeat each line
    try:
        yield logging.getLogger("seg.train")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(old_level)
        root.propagate = old_propagate


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """The iteration bar: position ``initial`` of ``total``; tqdm shows the rate and ETA."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="it",
        dynamic_ncols=True,
        desc="train",
    )


def format_duration(seconds: float) -> str:
    """``3725.0`` -> ``1:02:05``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def label_panel(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    palette: Sequence[Sequence[int]],
    max_height: int = MAX_PANEL_HEIGHT,
) -> np.ndarray:
    """``input | ground truth | prediction`` side by side.

    Args:
        image: H x W x 3 uint8 RGB; label, pred: H x W train ids (255 drawn black).
    Returns:
        h x 3w x 3 uint8 RGB, shrunk by an integer factor to at most ``max_height`` rows.
    """
    panel = np.concatenate(
        [
            image,
            colorize(label.astype(np.uint8), palette),
            colorize(pred.astype(np.uint8), palette),
        ],
        axis=1,
    )
    step = max(1, math.ceil(panel.shape[0] / max_height))
    return np.ascontiguousarray(panel[::step, ::step])


class TensorBoardLog:
    """Rank 0's TensorBoard writer (a no-op elsewhere, or when ``log_dir`` is None)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", value, step)

    def evaluation(self, metrics: Mapping[str, Any], class_names: Sequence[str], step: int) -> None:
        """``val/mIoU`` ... and ``val/IoU/<class>`` (NaN IoUs, classes never seen, are left out)."""
        if self.writer is None:
            return
        for key in ("mIoU", "mAcc", "aAcc", "fwIoU"):
            if key in metrics:
                self.writer.add_scalar(f"val/{key}", float(metrics[key]), step)
        for name, iou in zip(class_names, metrics.get("IoU", []), strict=False):
            if iou is not None and not math.isnan(float(iou)):
                self.writer.add_scalar(f"val/IoU/{name}", float(iou), step)

    def panels(self, panels: Sequence[np.ndarray], step: int) -> None:
        """Images ``val/sample_<i>`` (H x W x 3 uint8 each)."""
        if self.writer is None:
            return
        for index, panel in enumerate(panels):
            self.writer.add_image(f"val/sample_{index}", panel, step, dataformats="HWC")

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The run's hyper-parameters with its final metrics (HPARAMS tab).

        Written into the same folder (``run_name="."``) so that one run is one entry.
        """
        if self.writer is None:
            return
        clean = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()
        }
        self.writer.add_hparams(clean, dict(metrics), run_name=".")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

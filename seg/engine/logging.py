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
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seg.visualize import colorize

logger = logging.getLogger("seg.train")

#: Images shown in TensorBoard are shrunk (nearest) to at most this height.
MAX_PANEL_HEIGHT = 256
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def run_logging(log_file: Path | None, is_main: bool) -> Iterator[logging.Logger]:
    """Send the ``seg.*`` loggers' records to the console and, on rank 0, to ``log_file``.

    Console lines go through ``tqdm.write`` (tqdm's ``logging_redirect_tqdm``) so that
    progress bars stay intact. The ``seg`` logger gets the handlers for the duration of the
    block; they are removed and closed afterwards, so several runs in one process (tests)
    do not pile up handlers. Rank 0 shows INFO (DEBUG where ``hydra.verbose`` asked for it:
    a level set on a logger is kept); other ranks show warnings and errors only.
    """
    root = logging.getLogger("seg")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    old_level, old_propagate = root.level, root.propagate
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    if not is_main:
        root.setLevel(logging.WARNING)
    elif root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.propagate = False  # Hydra's console handler on the root logger would repeat each line
    try:
        with logging_redirect_tqdm(loggers=[root]):
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


class PanelCollector:
    """An evaluation ``on_prediction`` sink keeping the first ``limit`` panels
    (input | ground truth | prediction) for TensorBoard."""

    def __init__(self, limit: int, palette: Sequence[Sequence[int]]) -> None:
        self.limit, self.palette = limit, palette
        self.panels: list[np.ndarray] = []

    def __call__(self, batch: Mapping[str, Any], pred: Any) -> None:
        if len(self.panels) >= self.limit:
            return
        preds = pred.to("cpu").numpy()
        for i in range(min(len(preds), self.limit - len(self.panels))):
            image, label = batch["image"][i].numpy(), batch["label"][i].numpy()
            self.panels.append(label_panel(image, label, preds[i], self.palette))


class RunLog:
    """What a training run reports, kept out of the loop: the bar, train.log, TensorBoard.

    Only rank 0 writes (``is_main``); elsewhere every method is a cheap no-op apart from
    the bar, which is disabled.

    Args:
        run_dir: TensorBoard events go to ``run_dir/tb``.
        max_iters, start: the bar's total and starting position.
        global_batch: images per iteration over all ranks (for images/s).
        class_names, palette: per-class IoU tags and coloured panels.
        hparams: the flat summary for TensorBoard's HPARAMS tab.
        is_main: rank 0.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_iters: int,
        start: int,
        global_batch: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        hparams: Mapping[str, Any],
        is_main: bool,
    ) -> None:
        self.max_iters, self.global_batch = max_iters, global_batch
        self.class_names, self.palette = list(class_names), [list(c) for c in palette]
        self.hparams, self.is_main = dict(hparams), is_main
        self.tb = TensorBoardLog(run_dir / "tb" if is_main else None)
        self.bar = progress_bar(max_iters, start, is_main)
        self.restart_clock(start)

    def restart_clock(self, iteration: int) -> None:
        """Measure images/s from here (after an evaluation or a checkpoint, which are not training)."""
        self._clock, self._clock_iter = time.perf_counter(), iteration

    def step(self) -> None:
        self.bar.update(1)

    def train(self, iteration: int, values: dict[str, float], lr: float) -> None:
        """Report the means since the last call (``RunningStats.flush``) at ``iteration``."""
        elapsed = max(time.perf_counter() - self._clock, 1e-9)
        speed = (iteration - self._clock_iter) * self.global_batch / elapsed
        self.restart_clock(iteration)
        values = {**values, "lr": lr, "images_per_s": speed}
        self.tb.scalars(
            {k: v for k, v in values.items() if k != "max_nonfinite_streak"},
            iteration,
            prefix="train/",
        )
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        heads = " ".join(
            f"{k.removeprefix('loss/')} {v:.3f}" for k, v in values.items() if k.startswith("loss/")
        )
        eta = (self.max_iters - iteration) * self.global_batch / max(speed, 1e-9)
        logger.info(
            "iter %d/%d | loss %.4f (%s) | lr %.3e | %.1f img/s | eta %s | non-finite %d",
            iteration,
            self.max_iters,
            values["loss"],
            heads,
            lr,
            speed,
            format_duration(eta),
            int(values["nonfinite_steps"]),
        )

    def panel_collector(self, limit: int) -> PanelCollector:
        """A sink for the evaluation's predictions (collects nothing on ranks > 0)."""
        return PanelCollector(limit if self.is_main else 0, self.palette)

    def evaluation(
        self, iteration: int, metrics: Mapping[str, Any], panels: Sequence[np.ndarray]
    ) -> None:
        """``val/*`` scalars, per-class IoU, panels, and the log line."""
        self.tb.evaluation(metrics, self.class_names, iteration)
        self.tb.panels(panels, iteration)
        self.tb.flush()
        logger.info(
            "eval at iter %d | mIoU %.2f | mAcc %.2f | aAcc %.2f",
            iteration,
            100 * float(metrics["mIoU"]),
            100 * float(metrics["mAcc"]),
            100 * float(metrics["aAcc"]),
        )

    def close(self, final_metrics: Mapping[str, float] | None) -> None:
        """Close the bar and TensorBoard; ``final_metrics`` go to the HPARAMS tab."""
        self.bar.close()
        if final_metrics:
            self.tb.hparams(self.hparams, final_metrics)
        self.tb.close()

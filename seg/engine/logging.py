"""What a training run reports: ``train.log``, the progress bars, and TensorBoard.

Only rank 0 reports. Other ranks log warnings to the console and write no files.

TensorBoard. Events go into the run folder itself, so that ``tensorboard --logdir
outputs`` names a run ``<experiment>/<timestamp>`` (and ``<loss>-seed<n>`` inside a
comparison folder); a resumed run appends to the same run. Tags are laid out for the
Time Series view, which sorts groups (the part before the first ``/``) and the cards in
them alphabetically and opens the first two groups only, so the curves a user watches
come first, in three cards:

- ``overview`` (open): ``overview/loss`` (the weighted total), ``overview/mIoU`` (val
  mIoU at each evaluation) and ``overview/per_head_loss``, one line per head: TensorBoard
  draws one line per run in a card, so each head's loss is written by a writer of its own
  into ``<run>/heads/<head>`` (runs ``<run>/heads/main``, ``.../aux2``, ...);
- ``train`` (open): ``train/lr``, ``train/nonfinite_steps``, ``train/speed/images_per_s``
  and the loss statistics ``train/stats/<head>/<stat>`` (e.g. OHEM's ``kept_fraction``);
- ``val`` (closed): ``val/<metric>_best``, the best so far of ``trainer.best_metric``
  (``val/mIoU_best`` by default, ``val/IoU/road_best`` for ``IoU/road``), ``val/collapsed``
  (1 when the evaluation's predictions collapsed to one class, ``seg.engine.collapse``, with
  the reason as the text ``val/collapse``; 0 otherwise) and the images ``val/sample_<i>``:
  input | ground truth | prediction, in the dataset's colours;
- ``val_detail`` (closed): ``val_detail/mAcc``, ``val_detail/aAcc``, ``val_detail/fwIoU``,
  the per-class IoU ``val_detail/IoU/<class>`` and the image
  ``val_detail/confusion_matrix`` (rows: ground truth, normalised; IoU per class).

The HPARAMS tab lists the run's hyper-parameters (written when the run starts) with
metrics read from the scalars above (``overview/mIoU``, ``val/<metric>_best``,
``overview/loss``...), so they follow each evaluation and an interrupted run has them too;
the best metric's name is an hyper-parameter (``best_metric``) and names its column.
The TEXT tab holds the composed config (``config``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seg.metrics import ConfusionMatrix
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
    """The iteration bar: position ``initial`` of ``total``; tqdm shows the rate and ETA.

    It sits on the first line; an evaluation's bar appears below it while it runs."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="it",
        dynamic_ncols=True,
        desc="train",
        position=0,
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
        self.log_dir = log_dir
        self.head_writers: dict[str, Any] = {}  # head -> its writer in <log_dir>/heads/<head>
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", value, step)

    def head_losses(self, losses: Mapping[str, float], step: int) -> None:
        """Each head's loss as ``overview/per_head_loss`` in the head's own sub-run, so that
        one card shows a line per head."""
        if self.writer is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        assert self.log_dir is not None  # there is a writer
        for head, value in losses.items():
            if head not in self.head_writers:
                folder = self.log_dir / HEADS_DIR / head
                self.head_writers[head] = SummaryWriter(log_dir=str(folder))
            self.head_writers[head].add_scalar(HEAD_LOSS_TAG, value, step)

    def evaluation(
        self,
        metrics: Mapping[str, Any],
        class_names: Sequence[str],
        step: int,
        best_score: float | None = None,
        best_tag: str | None = None,
    ) -> None:
        """``overview/mIoU``, the best score so far as ``best_tag`` (default
        ``val/mIoU_best``), ``val_detail/<metric>``
        and the per-class IoU ``val_detail/IoU/<class>`` (NaN IoUs, classes never seen, are
        left out)."""
        if self.writer is None:
            return
        if "mIoU" in metrics:
            self.writer.add_scalar(MIOU_TAG, float(metrics["mIoU"]), step)
        if best_score is not None and math.isfinite(best_score):
            self.writer.add_scalar(best_tag or BEST_MIOU_TAG, best_score, step)
        for key in ("mAcc", "aAcc", "fwIoU"):
            if key in metrics:
                self.writer.add_scalar(f"val_detail/{key}", float(metrics[key]), step)
        for name, iou in zip(class_names, metrics.get("IoU", []), strict=False):
            if iou is not None and not math.isnan(float(iou)):
                self.writer.add_scalar(f"val_detail/IoU/{name}", float(iou), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """One H x W x 3 uint8 image."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, markdown, step)

    def session_start(self, params: Mapping[str, Any], best_metric: str = "mIoU") -> None:
        """The HPARAMS tab's entry for this run: ``params`` and the metric tags it shows
        (:func:`hparam_metrics`; ``best_metric`` names the best-so-far column).

        The tab reads each metric's latest value from the run's scalars, so nothing is
        written for the metrics here and they follow every evaluation.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in params.items()
            if v is not None
        }
        metrics = hparam_metrics(best_metric)
        experiment, start, _ = hparams(clean, dict.fromkeys(metrics, 0.0))
        self.writer.file_writer.add_summary(_flag_headline(experiment, metrics))
        self.writer.file_writer.add_summary(start)
        self.writer.flush()

    def session_end(self) -> None:
        """Mark the HPARAMS entry finished (status success)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        _, _, end = hparams({}, {})
        self.writer.file_writer.add_summary(end)

    def flush(self) -> None:
        for writer in [self.writer, *self.head_writers.values()]:
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        for writer in self.head_writers.values():
            writer.close()
        self.head_writers = {}
        if self.writer is not None:
            self.writer.close()
            self.writer = None


#: The first group of the Time Series view: the curves a user watches (module docstring).
LOSS_TAG = "overview/loss"
MIOU_TAG = "overview/mIoU"
HEAD_LOSS_TAG = "overview/per_head_loss"
HEADS_DIR = "heads"  # <run>/heads/<head>: one sub-run per head for HEAD_LOSS_TAG
BEST_MIOU_TAG = "val/mIoU_best"
#: 1 when an evaluation's predictions collapsed to one class, else 0; the reason as text.
COLLAPSED_TAG = "val/collapsed"
COLLAPSE_TEXT_TAG = "val/collapse"
#: Metrics beside the hyper-parameters in the HPARAMS tab (latest value of each scalar),
#: with the default trainer.best_metric (mIoU); :func:`hparam_metrics` for another.
HPARAM_METRICS = (MIOU_TAG, BEST_MIOU_TAG, "val_detail/mAcc", "val_detail/aAcc", LOSS_TAG)
METRIC_NAMES = {
    MIOU_TAG: "mIoU (last eval)",
    "val_detail/mAcc": "mAcc (last eval)",
    "val_detail/aAcc": "aAcc (last eval)",
    LOSS_TAG: "train loss (last)",
}


def best_tag(best_metric: str) -> str:
    """The best-so-far scalar of ``trainer.best_metric``: ``val/mIoU_best``, ``val/IoU/road_best``."""
    return f"val/{best_metric}_best"


def hparam_metrics(best_metric: str = "mIoU") -> dict[str, str]:
    """The HPARAMS tab's metrics, tag -> column name, the best-so-far one of
    ``best_metric`` second (``val/IoU/road_best``: "best IoU/road")."""
    names = {MIOU_TAG: METRIC_NAMES[MIOU_TAG], best_tag(best_metric): f"best {best_metric}"}
    return {**names, **{tag: METRIC_NAMES[tag] for tag in HPARAM_METRICS[2:]}}


#: Hyper-parameters the HPARAMS tab shows before the others (it shows five at first).
HEADLINE_HPARAMS = ("experiment", "loss", "lr", "batch_size", "seed")


def _flag_headline(experiment: Any, metric_names: Mapping[str, str]) -> Any:
    """Mark :data:`HEADLINE_HPARAMS` in torch's experiment summary so that TensorBoard lists
    them first (it sorts by the ``differs`` flag, then by name), and name the metrics
    (``metric_names``: tag -> column name)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    metadata = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(metadata.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in HEADLINE_HPARAMS
    for info in data.experiment.metric_infos:
        info.display_name = metric_names.get(info.name.tag, info.name.tag)
    metadata.content = data.SerializeToString()
    return experiment


def train_tag(name: str) -> str:
    """TensorBoard tag of a training value other than a head's loss: ``loss`` (the total)
    is ``overview/loss``; ``lr`` and ``nonfinite_steps`` go under ``train/``,
    ``images_per_s`` under ``train/speed/`` and loss statistics (``<head>/<stat>``) under
    ``train/stats/``. A head's loss (``loss/<head>``) goes to :meth:`TensorBoardLog.head_losses`."""
    if name == "loss":
        return LOSS_TAG
    if name.startswith("loss/"):
        raise ValueError(f"{name!r} is a head's loss: TensorBoardLog.head_losses writes it")
    if name == "images_per_s":
        return "train/speed/images_per_s"
    if "/" not in name:
        return f"train/{name}"
    return f"train/stats/{name}"


class EvalCollector:
    """An evaluation ``on_prediction`` sink: the first ``limit`` panels (input | ground
    truth | prediction, rank 0 only) and the confusion matrix of this rank's shard.

    Call :meth:`finish` on every rank after the evaluation: it sums the matrices over the
    DDP ranks (a collective).
    """

    def __init__(
        self,
        limit: int,
        palette: Sequence[Sequence[int]],
        num_classes: int,
        ignore_index: int,
        device: torch.device,
    ) -> None:
        self.limit, self.palette = limit, palette
        self.panels: list[np.ndarray] = []
        self.confusion = ConfusionMatrix(num_classes, ignore_index, device=device)

    def __call__(self, batch: Mapping[str, Any], pred: torch.Tensor) -> None:
        self.confusion.update(pred, batch["label"].to(pred.device, non_blocking=True).long())
        if len(self.panels) >= self.limit:
            return
        preds = pred.to("cpu").numpy()
        for i in range(min(len(preds), self.limit - len(self.panels))):
            image, label = batch["image"][i].numpy(), batch["label"][i].numpy()
            self.panels.append(label_panel(image, label, preds[i], self.palette))

    def finish(self) -> torch.Tensor:
        """The C x C matrix (rows: ground truth, columns: prediction) over all ranks."""
        self.confusion.all_reduce()
        return self.confusion.matrix


class RunLog:
    """What a training run reports, kept out of the loop: the bars, train.log, TensorBoard.

    Only rank 0 writes (``is_main``); elsewhere every method is a cheap no-op apart from
    the bars, which are disabled.

    Args:
        run_dir: TensorBoard events go into this folder (the run is named after it).
        max_iters, start: the bar's total and starting position.
        global_batch: images per iteration (optimizer step) over all ranks (for images/s).
        class_names, palette: per-class IoU tags, confusion matrix and coloured panels.
        hparams: the flat summary for TensorBoard's HPARAMS tab (written at once).
        is_main: rank 0.
        best_metric: ``trainer.best_metric``, which names the best-so-far scalar.
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
        best_metric: str = "mIoU",
    ) -> None:
        self.max_iters, self.global_batch = max_iters, global_batch
        self.class_names, self.palette = list(class_names), [list(c) for c in palette]
        self.hparams, self.is_main = dict(hparams), is_main
        self.best_metric = best_metric
        self.tb = TensorBoardLog(run_dir if is_main else None)
        self.tb.session_start(self.hparams, best_metric)
        self.bar = progress_bar(max_iters, start, is_main)
        self.restart_clock(start)

    def restart_clock(self, iteration: int) -> None:
        """Measure images/s from here (after an evaluation or a checkpoint, which are not training)."""
        self._clock, self._clock_iter = time.perf_counter(), iteration

    def step(self) -> None:
        self.bar.update(1)

    def config(self, config: Mapping[str, Any], iteration: int) -> None:
        """The composed config as text (TEXT tab, tag ``config``), once per (re)start."""
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(dict(config)))
        # Indented by four spaces: a Markdown code block, shown as written.
        self.tb.text("config", "\n".join(f"    {line}" for line in text.splitlines()), iteration)

    def train(self, iteration: int, values: dict[str, float], lr: float) -> None:
        """Report the means since the last call (``RunningStats.flush``) at ``iteration``."""
        elapsed = max(time.perf_counter() - self._clock, 1e-9)
        speed = (iteration - self._clock_iter) * self.global_batch / elapsed
        self.restart_clock(iteration)
        values = {**values, "lr": lr, "images_per_s": speed}
        head_losses = {
            k.removeprefix("loss/"): v for k, v in values.items() if k.startswith("loss/")
        }
        self.tb.scalars(
            {
                train_tag(k): v
                for k, v in values.items()
                if k != "max_nonfinite_streak" and not k.startswith("loss/")
            },
            iteration,
        )
        self.tb.head_losses(head_losses, iteration)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        heads = " ".join(f"{head} {v:.3f}" for head, v in head_losses.items())
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

    def eval_progress(self, loader: Iterable[Any], description: str) -> Iterable[Any]:
        """``loader`` wrapped in a bar nested under the training bar, erased when done."""
        total = len(loader) if isinstance(loader, Sized) else None
        return tqdm(
            loader,
            total=total,
            desc=description,
            unit="batch",
            position=1,
            leave=False,
            dynamic_ncols=True,
            disable=not self.is_main,
        )

    def eval_collector(
        self, limit: int, num_classes: int, ignore_index: int, device: torch.device
    ) -> EvalCollector:
        """A sink for the evaluation's predictions (panels are kept on rank 0 only)."""
        return EvalCollector(
            limit if self.is_main else 0, self.palette, num_classes, ignore_index, device
        )

    def evaluation(
        self,
        iteration: int,
        metrics: Mapping[str, Any],
        panels: Sequence[np.ndarray],
        confusion: torch.Tensor | None = None,
        best_score: float | None = None,
        what: str = "model",
        collapse: str | None = None,
    ) -> None:
        """Scalars, per-class IoU, panels, the confusion matrix, and the log line; with
        ``collapse`` (``seg.engine.collapse.collapse_message``) one warning line more."""
        self.tb.evaluation(
            metrics, self.class_names, iteration, best_score, best_tag(self.best_metric)
        )
        self.tb.scalars({COLLAPSED_TAG: float(collapse is not None)}, iteration)
        if collapse is not None:
            self.tb.text(COLLAPSE_TEXT_TAG, collapse, iteration)
        for index, panel in enumerate(panels):
            self.tb.image(f"val/sample_{index}", panel, iteration)
        if confusion is not None and self.tb.writer is not None:
            from seg.engine.confusion_plot import confusion_image

            title = f"{what} at iteration {iteration}: rows ground truth (normalised)"
            image = confusion_image(confusion, self.class_names, metrics.get("IoU"), title)
            self.tb.image("val_detail/confusion_matrix", image, iteration)
        self.tb.flush()
        logger.info(
            "eval at iter %d%s | mIoU %.2f | mAcc %.2f | aAcc %.2f",
            iteration,
            " (EMA)" if what == "EMA" else "",
            100 * float(metrics["mIoU"]),
            100 * float(metrics["mAcc"]),
            100 * float(metrics["aAcc"]),
        )
        if collapse is not None:
            logger.warning(
                "eval at iter %d: %s (docs/few_classes.md: what to try)", iteration, collapse
            )

    def close(self, completed: bool) -> None:
        """Close the bar and TensorBoard; a ``completed`` run is marked so in HPARAMS."""
        self.bar.close()
        if completed:
            self.tb.session_end()
        self.tb.close()

"""Per-image confusion matrices of a finished run, for the paired bootstrap of the report.

A run's ``last.pt`` stores the metrics of its final evaluation summed over the val split;
the bootstrap (:mod:`seg.bootstrap`) resamples val images, so it needs each image's
confusion matrix. :func:`per_image_confusions` evaluates ``last.pt`` again on the run's
own val split with its own evaluation settings (the model and the dataset are rebuilt
through the checkpoint allow-list, as ``tools/eval.py`` does) and keeps one C x C matrix
per image. The result is checked against the stored final mIoU, and kept beside the
checkpoint in ``per_image_confusion.npz`` so that a second report reads it instead.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from seg import dist
from seg.bootstrap import miou_from_confusion, per_image_confusion
from seg.checkpoint import load_checkpoint
from seg.compare.runs import build_run_dataset
from seg.data.loader import build_eval_loader
from seg.engine.evaluator import Evaluator
from seg.engine.load import load_inference_model
from seg.errors import SegError
from seg.fileio import write_bytes_atomic
from seg.instantiate import build_from_checkpoint

log = logging.getLogger(__name__)

#: Kept in each run folder, next to checkpoints/.
CACHE_NAME = "per_image_confusion.npz"
#: Largest accepted gap (mIoU fraction) between the stored final mIoU and the re-evaluation:
#: the same weights on the same images agree to rounding, unless the run's evaluation
#: differs from the one done here (e.g. a nondeterministic GPU kernel).
MIOU_TOLERANCE = 1e-3


class ReevaluationMismatch(SegError):
    """Evaluating a run's last.pt again does not give its stored mIoU (exit status 1)."""

    exit_status = 1


@dataclass
class PerImage:
    """One run's val split, image by image.

    ``matrices``: int64 ``[images, C, C]`` (rows: ground truth, columns: prediction) in the
    loader's order; ``names``: the image names in that order; ``miou``: the mIoU of the
    summed matrix (a fraction), equal to the run's stored final mIoU within
    ``MIOU_TOLERANCE``.
    """

    matrices: np.ndarray
    names: list[str]
    miou: float


class ConfusionPerImage:
    """A prediction sink for ``Evaluator.evaluate``: one confusion matrix per image."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrices: list[np.ndarray] = []
        self.names: list[str] = []

    def __call__(self, batch: Mapping[str, Any], pred: torch.Tensor) -> None:
        """``pred``: int64 N x H x W; ``batch["label"]``: uint8 N x H x W of the same size."""
        labels = torch.as_tensor(batch["label"]).to(pred.device, torch.long)
        matrices = per_image_confusion(pred, labels, self.num_classes, self.ignore_index)
        self.matrices.extend(matrices.cpu().numpy())  # evaluation only: one copy per batch
        self.names.extend(str(n) for n in batch["name"])


def _checkpoint_stamp(path: Path) -> np.ndarray:
    """Size and modification time of ``path``: a new last.pt makes the kept file stale."""
    info = path.stat()
    return np.array([info.st_size, info.st_mtime_ns], dtype=np.int64)


def _read_kept(path: Path, stamp: np.ndarray) -> PerImage | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as kept:
            if not np.array_equal(kept["checkpoint_stamp"], stamp):
                return None
            return PerImage(
                kept["matrices"].astype(np.int64),
                [str(n) for n in kept["names"]],
                float(kept["miou"]),
            )
    except (OSError, KeyError, ValueError):  # unreadable or from another version: redo it
        return None


def report_device(setting: torch.device | str, config: Mapping[str, Any]) -> torch.device:
    """Where to evaluate a run again: ``auto`` is the CPU for a run that trained with
    ``trainer.device=cpu`` (a GPU's kernels may flip a few pixels of it and trip the
    mIoU check), else this machine's default device; anything else as given."""
    if not isinstance(setting, str):
        return setting
    if setting == "auto" and str((config.get("trainer") or {}).get("device", "auto")) == "cpu":
        return torch.device("cpu")
    return dist.resolve_device(setting, "report_device")


def _evaluate(checkpoint_path: Path, device_setting: torch.device | str) -> tuple[PerImage, float]:
    """Evaluate ``checkpoint_path`` on its run's val split; returns (result, stored mIoU)."""
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
    config = checkpoint["config"]  # checked by load_inference_model before anything is built
    stored = float(((checkpoint.get("metrics") or {}).get("val") or {})["mIoU"])
    device = report_device(device_setting, config)
    log.info("per-image confusion matrices of %s on %s", checkpoint_path, device)
    net = load_inference_model(checkpoint_path, device, checkpoint=checkpoint)
    dataset = build_run_dataset(config["dataset"]["val"], f"val dataset of {checkpoint_path}")
    evaluator: Evaluator = build_from_checkpoint(
        OmegaConf.create(dict(config["eval"])), f"evaluator of {checkpoint_path}"
    )
    loader = build_eval_loader(
        dataset,
        batch_size=evaluator.batch_size,
        num_workers=int((config.get("loader") or {}).get("num_workers", 0)),
        pin_memory=device.type == "cuda",
    )
    sink = ConfusionPerImage(evaluator.num_classes, evaluator.ignore_index)
    evaluator.evaluate(net.model, loader, device, progress=False, on_prediction=sink)
    matrices = np.stack(sink.matrices).astype(np.int64)
    miou = float(miou_from_confusion(matrices.sum(0)))
    return PerImage(matrices, sink.names, miou), stored


def per_image_confusions(run_dir: Path, device: torch.device | str = "auto") -> PerImage:
    """The per-image confusion matrices of ``run_dir/checkpoints/last.pt`` on its val split.

    Read from ``run_dir/per_image_confusion.npz`` when that was made from this very
    ``last.pt`` (same size and modification time); otherwise evaluated and kept there.

    Raises:
        ReevaluationMismatch: the re-evaluation's mIoU differs from the stored final mIoU
            by more than ``MIOU_TOLERANCE`` (the bootstrap would not describe the run).
    """
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    kept_path = run_dir / CACHE_NAME
    stamp = _checkpoint_stamp(checkpoint_path)
    kept = _read_kept(kept_path, stamp)
    if kept is not None:
        return kept
    result, stored = _evaluate(checkpoint_path, device)
    if abs(result.miou - stored) > MIOU_TOLERANCE:
        raise ReevaluationMismatch(
            f"evaluating {checkpoint_path} again gives mIoU {100 * result.miou:.2f}, but the "
            f"run stored {100 * stored:.2f}: its val split or evaluation settings changed "
            "since it trained, so its per-image results would not describe the run"
        )
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        matrices=result.matrices,
        names=np.array(result.names),
        miou=np.float64(result.miou),
        checkpoint_stamp=stamp,
    )
    write_bytes_atomic(kept_path, buffer.getvalue())
    return result

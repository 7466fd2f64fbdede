"""Run a trained checkpoint on the user's own images, folders of images and videos.

For every image the predictor writes three files under the output folder:

- ``labels/<name>.png``: the label map (train ids, one uint8 per pixel);
- ``colors/<name>.png``: the label map coloured with the dataset palette;
- ``overlays/<name>.png``: the coloured mask blended over the image.

A video gives ``overlays/<name>.mp4`` (mp4v), one overlaid frame per input frame.
Files inside an input folder keep their relative path; files whose outputs would share a
name get distinct ones (:func:`output_names`). Files that cannot be read are reported by
name and skipped; :class:`PredictSummary` lists them.

Large images are predicted tile by tile (:meth:`Predictor.predict_tiled`): above
``tile_pixels`` pixels, windows of ``tile_size`` with ``tile_margin`` pixels of context on
each side, so that the memory a prediction needs stops growing with the image's size
beyond a few bytes per pixel for the image and its outputs (docs/reliability.md has the
measured bound).

The model comes from :func:`seg.engine.load.load_inference_model` (the loader that eval and
export use too); inference reuses :mod:`seg.engine.inference`, the evaluator's path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from seg.data.batch import normalize_images
from seg.engine.amp import amp_choice, autocast, resolve_amp
from seg.engine.inference import INFERENCE_MODES, predict_probs
from seg.engine.load import is_onnx, load_inference_model
from seg.errors import ConfigError, DatasetError
from seg.fileio import partial_path, remove_stale_partials, write_png
from seg.models.inference_model import InferenceModel
from seg.values import bool_setting, float_setting, int_setting, pair_setting, scales_setting
from seg.visualize import colorize, overlay, palette_array

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
OUTPUT_FOLDERS = ("labels", "colors", "overlays")
#: Images with more pixels than this are predicted tile by tile (2048 x 2048; a Cityscapes
#: frame, 1024 x 2048, is predicted whole).
TILE_PIXELS = 2048 * 2048
TILE_SIZE = (1024, 1024)
TILE_MARGIN = 128
#: Rows blended at a time for an overlay (bounds its float temporaries on huge images).
OVERLAY_ROWS = 512


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputFile:
    """One input: its path, the output name (relative, without suffix) and its kind.

    ``renamed``: the name is not the file's stem, as another input has that stem.
    """

    path: Path
    name: str
    is_video: bool
    renamed: bool = False


def collect_inputs(source: str | os.PathLike[str], exclude: Path | None = None) -> list[InputFile]:
    """The images and videos to process: one file, or every image/video under a folder.

    Folder contents are found recursively (sorted) and keep their relative paths as
    output names; ``exclude`` (the output folder) is skipped when it lies inside.
    A single file whose suffix is not a known video suffix is treated as an image.
    """
    root = Path(source)
    if not root.exists():
        raise DatasetError(f"input not found: {root}")
    if root.is_file():
        return [InputFile(root, root.stem, root.suffix.lower() in VIDEO_SUFFIXES)]
    excluded = exclude.resolve() if exclude is not None else None
    files = []
    for path in sorted(root.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES or not path.is_file():
            continue
        if excluded is not None and excluded in path.resolve().parents:
            continue
        files.append(path)
    if not files:
        raise DatasetError(
            f"no images or videos in {root} (looked for {', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})"
        )
    relative = [p.relative_to(root) for p in files]
    names = output_names(relative)
    return [
        InputFile(
            path, name, path.suffix.lower() in VIDEO_SUFFIXES, name != str(rel.with_suffix(""))
        )
        for path, rel, name in zip(files, relative, names, strict=True)
    ]


def output_names(relative_paths: Sequence[Path]) -> list[str]:
    """One distinct output name (relative path without suffix) per input, in input order.

    A file keeps its stem when no other input has it; files sharing a stem (``a.jpg``,
    ``a.png``) get their suffix appended (``a_jpg``, ``a_png``), and a name still taken
    (by ``a_png.png``, or the same name in another case, for case-insensitive disks) gets
    ``_2``, ``_3``, ... Names are compared case-folded, so no two outputs share a file.
    """
    stems = [str(p.with_suffix("")) for p in relative_paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    # Stems that are unique keep their names: reserve them before any renamed one.
    used = {stem.casefold() for stem in stems if counts[stem.casefold()] == 1}
    names = []
    for path, stem in zip(relative_paths, stems, strict=True):
        if counts[stem.casefold()] == 1:
            names.append(stem)
            continue
        base = f"{stem}_{path.suffix.lower().lstrip('.')}"
        name, number = base, 1
        while name.casefold() in used:
            number += 1
            name = f"{base}_{number}"
        used.add(name.casefold())
        names.append(name)
    return names


def _decode_image(path: Path) -> tuple[np.ndarray | None, str]:
    """``(uint8 H x W x 3 RGB image, "")``, or ``(None, reason)`` when it cannot be read."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # imdecode copes with non-ASCII paths
    except OSError as error:
        return None, f"cannot read the file ({error.strerror or error})"
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        return None, "not a readable image"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), ""


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 H x W x 3 RGB (grey and alpha images are converted).

    Raises:
        DatasetError: the file cannot be read or decoded.
    """
    image, reason = _decode_image(path)
    if image is None:
        raise DatasetError(f"{path}: {reason}")
    return image


class _ImageReader(torch.utils.data.Dataset):
    """Decodes images (in DataLoader workers when asked); a failure travels as a message."""

    def __init__(self, inputs: Sequence[InputFile]) -> None:
        self.inputs = list(inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[InputFile, np.ndarray | None, str]:
        item = self.inputs[index]
        return (item, *_decode_image(item.path))


def _keep(sample: Any) -> Any:
    """DataLoader collate that leaves samples untouched (numpy stays numpy)."""
    return sample


# --------------------------------------------------------------------------- prediction


@dataclass
class PredictSummary:
    """What a prediction run did; ``skipped`` holds ``(path, reason)`` per unreadable file."""

    images: int = 0
    videos: int = 0
    frames: int = 0
    tiled: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    renamed: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the end of a run."""
        text = f"predicted {self.images} image(s) and {self.videos} video(s) ({self.frames} frames)"
        if self.tiled:
            text += f", {self.tiled} image(s) in tiles"
        if self.renamed:
            shown = ", ".join(f"{path.name} -> {name}" for path, name in self.renamed[:3])
            more = ", ..." if len(self.renamed) > 3 else ""
            text += f"; outputs renamed to keep them apart: {shown}{more}"
        return f"{text}; {len(self.skipped)} file(s) skipped"


class Predictor:
    """Label maps, coloured masks and overlays from a loaded checkpoint.

    Args:
        net: the loaded model and its dataset info (:func:`load_inference_model`).
        batch_size: images per forward pass; only images of equal size share a batch.
        alpha: weight of the coloured mask in overlays.
        amp: "off", "fp16", "bf16" (or a bool) autocast for the forward pass.
        mode, scales, flip, crop_size, stride: test-time inference as in the evaluator
            (:func:`seg.engine.inference.predict_probs`).
        num_workers: DataLoader workers that decode images in the background.
        progress: show tqdm bars.
        tile_pixels: images with more pixels are predicted tile by tile (None: never),
            so that their memory stays bounded (:meth:`predict_tiled`).
        tile_size, tile_margin: the tiles' [h, w], and the context added on every side.
    """

    def __init__(
        self,
        net: InferenceModel,
        *,
        batch_size: int = 1,
        alpha: float = 0.5,
        amp: str | bool = "off",
        mode: str = "whole",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        num_workers: int = 0,
        progress: bool = True,
        tile_pixels: int | None = TILE_PIXELS,
        tile_size: Sequence[int] = TILE_SIZE,
        tile_margin: int = TILE_MARGIN,
    ) -> None:
        batch_size = int_setting(batch_size, "batch_size", minimum=1)
        alpha = float_setting(alpha, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        if mode not in INFERENCE_MODES:
            raise ConfigError(f"mode must be one of {list(INFERENCE_MODES)}, got {mode!r}")
        crop = pair_setting(crop_size, "crop_size")
        step = pair_setting(stride, "stride")
        if mode == "slide":
            if crop is None or step is None:
                raise ConfigError("mode=slide needs crop_size and stride ([h, w])")
            if step[0] > crop[0] or step[1] > crop[1]:
                raise ConfigError(
                    f"stride {list(step)} larger than crop_size {list(crop)} would leave "
                    "pixels unpredicted"
                )
        scales = scales_setting(scales, "scales")
        tile = pair_setting(tile_size, "tile_size")
        if tile is None:
            raise ConfigError("tile_size must be [h, w], got None")
        self.tile_size = tile
        self.tile_margin = int_setting(tile_margin, "tile_margin", minimum=0)
        self.tile_pixels = (
            None if tile_pixels is None else int_setting(tile_pixels, "tile_pixels", minimum=1)
        )
        self.net = net
        self.batch_size = batch_size
        self.alpha = alpha
        self.amp = resolve_amp(amp, net.device, "amp")
        self.inference = {
            "mode": mode,
            "scales": scales,
            "flip": bool_setting(flip, "flip"),
            "crop_size": list(crop) if crop is not None else None,
            "stride": list(step) if step is not None else None,
        }
        self.num_workers = int_setting(num_workers, "num_workers", minimum=0)
        self.progress = progress
        self.lut = palette_array(net.palette)

    def needs_tiles(self, image: np.ndarray) -> bool:
        """True when ``image`` (H x W x 3) has more than ``tile_pixels`` pixels."""
        height, width = image.shape[:2]
        return self.tile_pixels is not None and height * width > self.tile_pixels

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Label maps for same-size uint8 H x W x 3 RGB images -> uint8 N x H x W train ids.

        Images above ``tile_pixels`` go through :meth:`predict_tiled`, one at a time.
        """
        if self.needs_tiles(images[0]):
            return np.stack([self.predict_tiled(image) for image in images])
        return self._labels(torch.from_numpy(np.stack(images)))

    def _labels(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 N x H x W x 3 RGB (CPU) -> uint8 N x H x W train ids."""
        with torch.inference_mode(), autocast(self.amp):
            normalised = normalize_images(batch.to(self.net.device), self.net.mean, self.net.std)
            probs = predict_probs(self.net.model, normalised, **self.inference)
            return probs.argmax(dim=1).to(torch.uint8).cpu().numpy()

    def predict_tiled(self, image: np.ndarray) -> np.ndarray:
        """The label map (uint8 H x W) of one uint8 H x W x 3 RGB image, tile by tile.

        Each ``tile_size`` tile is predicted (with the configured mode, scales and flip) from
        the tile plus ``tile_margin`` pixels of context on each side, and only its own pixels
        are kept, so no probability map larger than one tile with margins is ever held.
        The model sees a tile's context, not the whole image's.
        """
        height, width = image.shape[:2]
        tile_h, tile_w = self.tile_size
        margin = self.tile_margin
        source = torch.from_numpy(image)  # shares memory: no copy of the whole image
        labels = np.empty((height, width), dtype=np.uint8)
        for top in range(0, height, tile_h):
            for left in range(0, width, tile_w):
                bottom, right = min(top + tile_h, height), min(left + tile_w, width)
                y0, x0 = max(0, top - margin), max(0, left - margin)
                y1, x1 = min(height, bottom + margin), min(width, right + margin)
                window = self._labels(source[y0:y1, x0:x1].unsqueeze(0))[0]
                labels[top:bottom, left:right] = window[
                    top - y0 : bottom - y0, left - x0 : right - x0
                ]
        return labels

    def run(self, inputs: Sequence[InputFile], out_dir: str | os.PathLike[str]) -> PredictSummary:
        """Predict every input, writing results under ``out_dir``; never stops on a bad file."""
        out = Path(out_dir)
        for folder in OUTPUT_FOLDERS:  # temporary files of a killed earlier run
            remove_stale_partials(out / folder, recursive=True)
        summary = PredictSummary()
        summary.renamed = [(item.path, item.name) for item in inputs if item.renamed]
        images = [item for item in inputs if not item.is_video]
        if images:
            self._run_images(images, out, summary)
        for item in inputs:
            if item.is_video:
                self._run_video(item, out, summary)
        return summary

    def _skip(self, summary: PredictSummary, path: Path, reason: str) -> None:
        summary.skipped.append((path, reason))
        tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)

    def _run_images(self, inputs: Sequence[InputFile], out: Path, summary: PredictSummary) -> None:
        loader = torch.utils.data.DataLoader(
            _ImageReader(inputs), batch_size=None, collate_fn=_keep, num_workers=self.num_workers
        )
        bar = tqdm(total=len(inputs), desc="images", unit="img", disable=not self.progress)
        pending: list[tuple[InputFile, np.ndarray]] = []

        def flush() -> None:
            labels = self.predict([image for _, image in pending])
            for (item, image), label in zip(pending, labels, strict=True):
                self._write_image_outputs(out, item.name, image, label)
                summary.images += 1
                summary.tiled += int(self.needs_tiles(image))
            bar.update(len(pending))
            pending.clear()

        with bar:
            for item, image, reason in loader:
                if image is None:
                    self._skip(summary, item.path, reason)
                    bar.update(1)
                    continue
                if pending and pending[0][1].shape != image.shape:
                    flush()  # only same-size images share a batch
                pending.append((item, image))
                if len(pending) == self.batch_size or self.needs_tiles(image):
                    flush()  # a large image is predicted on its own, in tiles
            if pending:
                flush()

    def _write_image_outputs(
        self, out: Path, name: str, image: np.ndarray, label: np.ndarray
    ) -> None:
        color = colorize(label, self.lut)
        write_png(out / "labels" / f"{name}.png", label)
        write_png(out / "colors" / f"{name}.png", color[..., ::-1])
        write_png(out / "overlays" / f"{name}.png", self._overlay(image, color)[..., ::-1])

    def _overlay(self, image: np.ndarray, color: np.ndarray) -> np.ndarray:
        """:func:`seg.visualize.overlay`, ``OVERLAY_ROWS`` rows at a time (same pixels;
        float temporaries of a few rows instead of the whole image)."""
        if image.shape[0] <= OVERLAY_ROWS:
            return overlay(image, color, self.alpha)
        blended = np.empty_like(image)
        for top in range(0, image.shape[0], OVERLAY_ROWS):
            rows = slice(top, top + OVERLAY_ROWS)
            blended[rows] = overlay(image[rows], color[rows], self.alpha)
        return blended

    def _run_video(self, item: InputFile, out: Path, summary: PredictSummary) -> None:
        capture = cv2.VideoCapture(str(item.path))
        if not capture.isOpened():
            self._skip(summary, item.path, "cannot open video")
            return
        target = out / "overlays" / f"{item.name}.mp4"
        # The writer picks its container from the suffix: the partial file ends in .mp4 too.
        partial = partial_path(target, ".mp4")
        writer: cv2.VideoWriter | None = None
        cannot_write = False
        frames = 0
        try:
            fps = capture.get(cv2.CAP_PROP_FPS)
            fps = fps if fps and fps > 0 else 25.0
            total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
            bar = tqdm(total=total, desc=item.path.name, unit="frame", disable=not self.progress)
            with bar:
                for batch in _frame_batches(capture, self.batch_size):
                    if writer is None:
                        height, width = batch[0].shape[:2]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        writer = cv2.VideoWriter(
                            str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
                        )
                        if not writer.isOpened():
                            cannot_write = True
                            break
                    for image, label in zip(batch, self.predict(batch), strict=True):
                        blended = overlay(image, colorize(label, self.lut), self.alpha)
                        writer.write(np.ascontiguousarray(blended[..., ::-1]))
                    frames += len(batch)
                    bar.update(len(batch))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            capture.release()
            if writer is not None:
                writer.release()
        if cannot_write:
            partial.unlink(missing_ok=True)
            self._skip(summary, item.path, f"cannot write an mp4v video to {partial}")
            return
        if frames == 0:
            partial.unlink(missing_ok=True)
            self._skip(summary, item.path, "no readable frames")
            return
        os.replace(partial, target)
        summary.videos += 1
        summary.frames += frames


def _frame_batches(capture: cv2.VideoCapture, batch_size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive RGB frames of an open capture, ``batch_size`` at a time."""
    batch: list[np.ndarray] = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        batch.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_prediction(
    ckpt: str | os.PathLike[str],
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    onnx_threads: int | None = None,
    **options: Any,
) -> PredictSummary:
    """Load ``ckpt``, predict every image/video of ``input`` into ``out``; see :class:`Predictor`.

    ``ckpt`` may be an exported ``.onnx`` (fp32 or int8): it runs with onnxruntime on the
    CPU with ``onnx_threads`` intra-op threads, normalised and coloured with the mean, std
    and palette stored in it; ``device`` and ``amp`` then do not apply.
    """
    if is_onnx(ckpt) and amp_choice(options.get("amp", "off"), "cpu", "amp") != "off":
        raise ConfigError("amp applies to checkpoints; an ONNX model runs in its own precision")
    inputs = collect_inputs(input, exclude=Path(out))
    net = load_inference_model(ckpt, device, onnx_threads=onnx_threads)
    if is_onnx(ckpt):
        print(f"model: {net.model.describe()}")
    return Predictor(net, **options).run(inputs, out)

"""Dataset health check behind ``tools/check_dataset.py``.

Reads every image/label pair of every split of a dataset config and reports: images per
split, image sizes, per-class pixel frequency (train ids), label values outside the
dataset's table, image/label size mismatches, unreadable or truncated files and images
without labels. Also prints per-channel image mean/std (0-1 scale), the numbers the
dataset config's ``mean``/``std`` need.

Exit status: 0 when every file is fine, 1 when some are bad (they are listed), 2 when
the dataset cannot be opened at all (a ``SegError``, e.g. a missing root), printed as
one ``error:`` line on stderr by ``seg.cli``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from seg.cli import run_in_process
from seg.data.build import build_dataset
from seg.data.class_weights import ClassFrequency, weights_report
from seg.data.folder import PairedDataset
from seg.errors import ConfigError, DatasetError, first_line
from seg.tables import markdown_table

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose_dataset_config(overrides: Sequence[str], default: str = "synthcity") -> DictConfig:
    """Compose ``configs/`` with only the dataset group.

    ``overrides`` are Hydra overrides as typed by users: ``dataset=NAME`` picks the group
    option (default ``default``), others (``dataset.root=...``) change keys. Returns the
    whole config; the dataset is ``cfg.dataset``.
    """
    group = [o for o in overrides if o.startswith(("dataset=", "+dataset="))]
    rest = [o for o in overrides if o not in group]
    name = group[-1].split("=", 1)[1] if group else default
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=None, overrides=[f"+dataset={name}", *rest])
    except HydraException as error:  # a typo in an override: one line, not a traceback
        first = first_line(error)
        raise ConfigError(f"bad override in {' '.join(overrides)!r}: {first}") from None


@dataclass
class SplitReport:
    """What was found in one split."""

    name: str
    images: int = 0
    sizes: Counter = field(default_factory=Counter)  # (h, w) -> count
    train_id_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    unknown_values: Counter = field(default_factory=Counter)  # raw value -> files
    bad_files: list[str] = field(default_factory=list)  # one message per bad file
    channel_sum: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    channel_sq_sum: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    pixels: int = 0
    class_frequency: ClassFrequency = field(default_factory=ClassFrequency)  # class weights

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel RGB mean and std of the images (0-1 scale)."""
        n = max(self.pixels, 1)
        mean = self.channel_sum / n
        return mean, np.sqrt(np.maximum(self.channel_sq_sum / n - mean**2, 0.0))


def check_split(dataset: PairedDataset, name: str) -> SplitReport:
    """Read every pair of ``dataset`` (built with ``strict=False``) and collect findings."""
    report = SplitReport(name=name, images=len(dataset) + len(dataset.problems))
    report.bad_files += dataset.problems
    # On a terminal only (tqdm's disable=None): logs and pipes get the report alone.
    for index in tqdm(range(len(dataset)), desc=f"check {name}", unit="image", disable=None):
        label_path = dataset.pairs[index][1]
        try:
            image, raw = dataset.load_raw(index)
        except DatasetError as err:
            report.bad_files.append(str(err))
            continue
        report.sizes[image.shape[:2]] += 1
        counts = np.bincount(raw.ravel(), minlength=256)
        unknown = np.flatnonzero((counts > 0) & ~dataset.valid)
        if unknown.size:
            shown = ", ".join(str(v) for v in unknown[:8])
            report.bad_files.append(
                f"label values outside the dataset's table ({shown}): {label_path}"
            )
            report.unknown_values.update(int(v) for v in unknown)
        train_id_counts = np.bincount(dataset.lut, weights=counts, minlength=256).astype(np.int64)
        report.train_id_pixels += train_id_counts
        report.class_frequency.add(train_id_counts)
        pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
        report.channel_sum += pixels.sum(0)
        report.channel_sq_sum += (pixels**2).sum(0)
        report.pixels += pixels.shape[0]
    return report


def _read_only(node: DictConfig) -> dict[str, Any]:
    """Build arguments of a check: no transform, no decoded cache, every problem kept, and no
    data generated (SynthCity's ``generate``): the check reads the source files themselves."""
    options: dict[str, Any] = {"transform": None, "strict": False, "cache": None}
    if "generate" in node:
        options["generate"] = False
    return options


def checked_splits(dataset_cfg: DictConfig) -> tuple[list[str], set[str]]:
    """The splits a check reads, and those of them that may be absent.

    A dataset config declares them with ``check_splits`` (e.g. CamVid ``[train, val,
    test]``; Cityscapes ``[train, val]``, as its test annotations are withheld): each must
    open. Without it: ``train`` and ``dataset.split``, plus ``test`` where it exists when
    the ``val`` node takes a ``split`` argument (Cityscapes layout).
    """
    declared = dataset_cfg.get("check_splits")
    if declared is not None:
        return [str(split) for split in declared], set()
    splits = list(dict.fromkeys(["train", str(dataset_cfg.split)]))
    if "split" in dataset_cfg.val and "test" not in splits:
        return [*splits, "test"], {"test"}
    return splits, set()


def split_node(dataset_cfg: DictConfig, split: str) -> DictConfig:
    """The node that reads ``split``: ``dataset.train`` for ``train``, else ``dataset.val``
    with its interpolations resolved for ``dataset.split=<split>`` (a copy; the dataset
    config's interpolations name keys of the dataset node)."""
    if split == "train":
        return dataset_cfg.train
    raw = OmegaConf.to_container(dataset_cfg, resolve=False)
    assert isinstance(raw, dict)
    raw["split"] = split
    return OmegaConf.create({"dataset": raw}).dataset.val


def _split_datasets(dataset_cfg: DictConfig) -> list[tuple[str, PairedDataset | None, str]]:
    """Build each split of :func:`checked_splits` without transforms: ``(name, dataset or
    None, error or '')``; an optional split whose folder is missing is left out. A check
    only reads: a missing SynthCity root is an error, not generated."""
    splits, optional = checked_splits(dataset_cfg)
    out = []
    for split in splits:
        node = split_node(dataset_cfg, split)
        try:
            dataset = build_dataset(
                node, f"{split} split", dataset_cfg=dataset_cfg, **_read_only(node)
            )
            out.append((split, dataset, ""))
        except DatasetError as err:
            if split in optional and "split folder not found" in str(err):
                continue
            out.append((split, None, str(err)))
    return out


def format_report(dataset_cfg: DictConfig, reports: list[SplitReport], errors: list[str]) -> str:
    """Markdown tables: splits, class frequencies, image statistics."""
    lines = [f"# dataset {dataset_cfg.name} at {Path(str(dataset_cfg.root)).resolve()}", ""]
    rows = []
    for r in reports:
        sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in r.sizes.most_common(3))
        rows.append([r.name, r.images, len(r.bad_files), sizes or "-"])
    lines += [markdown_table(["split", "images", "bad files", "sizes (h x w)"], rows), ""]
    names = list(dataset_cfg.class_names)
    header = ["class"] + [f"{r.name} %" for r in reports]
    totals = [max(int(r.train_id_pixels.sum()), 1) for r in reports]
    class_rows = []
    for k, class_name in enumerate([*names, "ignore (255)"]):
        tid = k if k < len(names) else 255
        class_rows.append(
            [f"{tid} {class_name}"]
            + [
                f"{100.0 * r.train_id_pixels[tid] / t:.3f}"
                for r, t in zip(reports, totals, strict=True)
            ]
        )
    lines += [markdown_table(header, class_rows), ""]
    for r in reports:
        if r.name == "train" and r.pixels:
            lines += [*weights_report(names, r.class_frequency, r.name), ""]
    for r in reports:
        if r.pixels:
            mean, std = r.mean_std()
            lines.append(
                f"{r.name}: RGB mean [{', '.join(f'{v:.4f}' for v in mean)}], "
                f"std [{', '.join(f'{v:.4f}' for v in std)}] (0-1 scale)"
            )
        if r.unknown_values:
            lines.append(f"{r.name}: unknown label values {sorted(r.unknown_values)}")
        missing = [names[k] for k in range(len(names)) if r.train_id_pixels[k] == 0]
        if missing and r.pixels:
            lines.append(f"{r.name}: classes absent: {', '.join(missing)}")
    lines += [f"error: {e}" for e in errors]
    bad = [f for r in reports for f in r.bad_files]
    if bad:
        lines += ["", f"{len(bad)} bad file(s):", *[f"  {b}" for b in bad]]
    return "\n".join(lines)


def run_check(dataset_cfg: DictConfig) -> tuple[str, int]:
    """Check all splits of ``dataset_cfg``; return ``(report text, exit status 0/1)``."""
    reports, errors = [], []
    for split, dataset, error in _split_datasets(dataset_cfg):
        if dataset is None:
            errors.append(error)
            continue
        reports.append(check_split(dataset, split))
    if not reports:  # nothing could be opened: one line, like any other SegError
        raise DatasetError(errors[0])
    text = format_report(dataset_cfg, reports, errors)
    bad = errors or any(r.bad_files for r in reports)
    return text, 1 if bad else 0


def check(cfg: DictConfig) -> int:
    """``tools/check_dataset.py``'s work (configs/check_dataset.yaml): print the report;
    0 when every file is fine, 1 when some are bad."""
    text, status = run_check(cfg.dataset)
    print(text)
    return status


def main(argv: Sequence[str]) -> int:
    """``tools/check_dataset.py dataset=NAME [dataset.root=...]`` in this process."""
    return run_in_process("check_dataset", argv, check)

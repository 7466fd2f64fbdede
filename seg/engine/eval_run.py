"""The logic behind ``tools/eval.py``: evaluate a checkpoint with the config stored in it.

Command line (``key=value`` in Hydra's override syntax)::

    python tools/eval.py ckpt=PATH [out=DIR] [save_pred=labelIds|color] [device=cpu]
        [dataset.root=...] [dataset.split=val|train] [eval.mode=slide] [eval.flip=true]
        [eval.scales=[0.75,1.0,1.25]] [loader.num_workers=2] [eval=slide]

``ckpt``, ``out``, ``save_pred``, ``device`` and ``progress`` are the tool's own settings
(``configs/eval.yaml``). ``eval=NAME`` replaces the stored evaluation settings by the
preset ``configs/eval/NAME.yaml``. Every other dotted key overrides the config stored in
the checkpoint; a key that config does not have is an error.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from seg import dist
from seg.data.loader import build_eval_loader
from seg.engine.checkpoint import load_checkpoint
from seg.engine.evaluator import Evaluator
from seg.engine.load import load_inference_model
from seg.errors import CheckpointError, ConfigError, SegError, first_line
from seg.fileio import write_png, write_text_atomic
from seg.instantiate import build_from_checkpoint
from seg.metrics import format_metrics_table
from seg.visualize import overlay

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TOOL_KEYS = ("ckpt", "out", "save_pred", "device", "progress")
SAVE_PRED_KINDS = ("labelIds", "color")

# The stored config is resolved: keys that were interpolations of another key no longer
# follow it. These links come from the dataset and eval contracts (docs/architecture.md);
# a linked key still holding the source's old value is updated with it.
LINKED_KEYS: dict[str, tuple[str, ...]] = {
    "dataset.root": ("dataset.train.root", "dataset.val.root"),
    "dataset.split": ("dataset.val.split",),
    "dataset.num_classes": ("eval.num_classes",),
    "dataset.ignore_index": ("eval.ignore_index",),
    "dataset.mean": ("eval.mean",),
    "dataset.std": ("eval.std",),
    "dataset.class_names": ("eval.class_names",),
}


# ----------------------------------------------------------------------------- CLI parsing
def parse_args(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split ``key=value`` arguments into (overrides for configs/eval.yaml, dotted overrides).

    The first list holds the tool's own keys and an ``eval=NAME`` preset choice, in Hydra
    syntax for :func:`compose_tool_config`; the dict maps dotted keys of the stored
    config to parsed values (``[0.5,1.0]`` -> list, ``true`` -> bool, ``null`` -> None).
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(args))
    except HydraException as error:
        raise ConfigError(f"cannot parse arguments {list(args)}: {error}") from None
    tool_overrides: list[str] = []
    config_overrides: dict[str, Any] = {}
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.is_add() or override.package:
            raise ConfigError(
                f"unsupported argument {override.input_line!r}: use key=value "
                "(keys of the checkpoint's config or of configs/eval.yaml)"
            )
        if key in TOOL_KEYS or key == "eval":
            tool_overrides.append(override.input_line)
        elif "." in key:
            config_overrides[key] = override.value()
        else:
            raise ConfigError(
                f"unknown argument {override.input_line!r}: expected one of {list(TOOL_KEYS)}, "
                "eval=PRESET, or a dotted key of the checkpoint's config such as dataset.root=..."
            )
    return tool_overrides, config_overrides


def compose_tool_config(tool_overrides: Sequence[str]) -> DictConfig:
    """Compose ``configs/eval.yaml`` (plus an ``eval`` preset if chosen) with Hydra."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="eval", overrides=list(tool_overrides))
    except (HydraException, OmegaConfBaseException) as error:
        first = first_line(error)
        raise ConfigError(f"bad eval.py arguments {list(tool_overrides)}: {first}") from None


# ------------------------------------------------------------------------ config merging
def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def build_eval_config(
    stored: Mapping[str, Any],
    overrides: Mapping[str, Any],
    eval_preset: DictConfig | None = None,
) -> DictConfig:
    """The config to evaluate with: the checkpoint's config, an optional ``eval`` preset,
    then the user's dotted ``overrides``; resolved, and read-only in structure.

    Raises:
        ConfigError: an override names a key the stored config does not have.
    """
    cfg = OmegaConf.create(dict(stored))
    if eval_preset is not None:
        # The preset's ${dataset.*} interpolations resolve against the stored dataset.
        cfg.eval = eval_preset
    OmegaConf.set_struct(cfg, True)
    for key, value in overrides.items():
        old = _select(cfg, key)
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException:
            raise ConfigError(
                f"unknown config key {key!r}: the checkpoint's config has no such key "
                f"(top-level keys: {sorted(cfg.keys())})"
            ) from None
        for linked in LINKED_KEYS.get(key, ()):
            if linked not in overrides and _select(cfg, linked) == old and old is not None:
                OmegaConf.update(cfg, linked, value, merge=False)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the evaluation config: {error}") from None
    for section in ("dataset", "model", "eval"):
        if section not in cfg:
            raise ConfigError(f"the checkpoint's config lacks the {section!r} section")
    return cfg


# ------------------------------------------------------------------------- checks
def check_num_classes(cfg: DictConfig, dataset: object, ckpt_path: Path) -> None:
    """One-line error when the checkpoint's model and the dataset count classes differently."""
    model_classes = _select(cfg, "model.num_classes")
    if model_classes is None:
        return
    wrong = []  # each count that differs from the model's, with its own value
    if int(cfg.dataset.num_classes) != int(model_classes):
        wrong.append(f"dataset.num_classes is {int(cfg.dataset.num_classes)}")
    if hasattr(dataset, "num_classes") and int(dataset.num_classes) != int(model_classes):
        wrong.append(
            f"dataset {_select(cfg, 'dataset.name')!r} at {_select(cfg, 'dataset.root')} has "
            f"{int(dataset.num_classes)}"
        )
    if wrong:
        raise CheckpointError(
            f"checkpoint {ckpt_path} predicts {model_classes} classes but {' and '.join(wrong)}"
        )


# ---------------------------------------------------------------------- prediction output
def trainid_to_labelid_table(num_classes: int) -> np.ndarray:
    """uint8[256]: Cityscapes train id -> label id (ids outside the classes map to 0)."""
    table = np.zeros(256, dtype=np.uint8)
    count = 0
    for label in cityscapes_labels:
        if 0 <= label.trainId < 255:
            table[label.trainId] = label.id
            count += 1
    if count != num_classes:
        raise ConfigError(
            f"save_pred=labelIds needs the {count} Cityscapes classes, the dataset has {num_classes}"
        )
    return table


def output_stem(name: str) -> str:
    """``aachen_000000_000019_leftImg8bit`` -> ``aachen_000000_000019``."""
    return name.removesuffix("_leftImg8bit")


class PredictionWriter:
    """Saves predictions as Cityscapes ``*_labelIds.png`` or coloured masks and overlays.

    ``kind="labelIds"``: ``<folder>/<stem>_labelIds.png`` holding Cityscapes label ids,
    the format of the Cityscapes test server and of ``cityscapesscripts``' evaluation.
    ``kind="color"``: ``<folder>/<stem>_color.png`` (palette colours) and
    ``<folder>/<stem>_overlay.png`` (half image, half colour).
    """

    def __init__(
        self,
        folder: Path,
        kind: str,
        num_classes: int,
        palette: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if kind not in SAVE_PRED_KINDS:
            raise ConfigError(f"save_pred must be one of {list(SAVE_PRED_KINDS)}, got {kind!r}")
        self.folder, self.kind = folder, kind
        if kind == "labelIds":
            self.table = trainid_to_labelid_table(num_classes)
        else:
            if palette is None or len(palette) < num_classes:
                raise ConfigError(
                    f"save_pred=color needs dataset.palette with {num_classes} colours"
                )
            self.table = np.zeros((256, 3), dtype=np.uint8)
            self.table[:num_classes] = np.asarray(palette[:num_classes], dtype=np.uint8)
        self.count = 0

    def __call__(self, batch: Mapping[str, Any], pred: torch.Tensor) -> None:
        """Write one file (or two) per image: ``pred`` int64 N x H x W train ids."""
        ids = pred.to("cpu", torch.uint8).numpy()
        for i, name in enumerate(batch["name"]):
            stem = output_stem(str(name))
            mapped = self.table[ids[i]]
            if self.kind == "labelIds":
                write_png(self.folder / f"{stem}_labelIds.png", mapped)
            else:
                blended = overlay(batch["image"][i].numpy(), mapped, alpha=0.5)
                write_png(self.folder / f"{stem}_color.png", mapped[..., ::-1])  # RGB -> BGR
                write_png(self.folder / f"{stem}_overlay.png", blended[..., ::-1])
            self.count += 1


# ------------------------------------------------------------------------- report writing
def _json_safe(value: Any) -> Any:
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_reports(
    out_dir: Path,
    metrics: Mapping[str, Any],
    class_names: Sequence[str],
    info: Mapping[str, Any],
) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` (atomically) into ``out_dir``."""
    report = dict(info)
    report["metrics"] = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "fwIoU")}
    report["per_class"] = {
        name: {"IoU": iou, "Acc": acc}
        for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"], strict=True)
    }
    json_path, md_path = out_dir / "metrics.json", out_dir / "metrics.md"
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    write_text_atomic(json_path, text)
    header = f"# Evaluation of `{info['checkpoint']}`\n\n"
    details = ", ".join(f"{k}: {v}" for k, v in info.items() if k != "checkpoint")
    markdown = header + details + "\n\n" + format_metrics_table(metrics, class_names, markdown=True)
    write_text_atomic(md_path, markdown)
    return json_path, md_path


# ------------------------------------------------------------------------------- the run
def run_eval(tool_cfg: DictConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate ``tool_cfg.ckpt``; returns the metrics (on every rank under DDP).

    Rank 0 prints the table and writes ``metrics.json`` / ``metrics.md`` to ``tool_cfg.out``
    (default: the checkpoint's folder); with ``save_pred`` every rank writes the
    predictions of its shard to ``<out>/pred_labelIds`` or ``<out>/pred_color``.
    """
    try:
        ckpt_path = Path(str(tool_cfg.ckpt))
    except MissingMandatoryValue:
        raise ConfigError("ckpt=PATH is required (the checkpoint to evaluate)") from None
    save_pred = tool_cfg.get("save_pred")
    if save_pred is not None and save_pred not in SAVE_PRED_KINDS:
        raise ConfigError(f"save_pred must be one of {list(SAVE_PRED_KINDS)}, got {save_pred!r}")
    checkpoint = load_checkpoint(ckpt_path, map_location="cpu")
    preset = tool_cfg.get("eval")
    cfg = build_eval_config(checkpoint["config"], overrides, preset)
    out_dir = Path(str(tool_cfg.out)) if tool_cfg.get("out") else ckpt_path.parent

    started_dist = not dist.is_distributed() and dist.init_distributed()
    try:
        device = dist.resolve_device(str(tool_cfg.get("device", "auto")))
        # Evaluation images share one size per dataset (or one per scale / window), so cuDNN's
        # per-shape algorithm timing pays back, as in training.
        torch.backends.cudnn.benchmark = device.type == "cuda"
        config = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(config, dict)
        net = load_inference_model(ckpt_path, device, checkpoint=checkpoint, config=config)
        dataset = build_from_checkpoint(cfg.dataset.val, "dataset")
        check_num_classes(cfg, dataset, ckpt_path)
        evaluator: Evaluator = build_from_checkpoint(cfg.eval, "evaluator")
        loader_cfg = cfg.get("loader") or {}
        loader = build_eval_loader(
            dataset,
            batch_size=evaluator.batch_size,
            num_workers=int(loader_cfg.get("num_workers", 0)),
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )
        class_names = list(evaluator.class_names or range(evaluator.num_classes))
        class_names = [str(n) for n in class_names]
        writer = None
        if save_pred is not None:
            writer = PredictionWriter(
                out_dir / f"pred_{save_pred}",
                save_pred,
                evaluator.num_classes,
                _select(cfg, "dataset.palette"),
            )
        metrics = evaluator.evaluate(
            net.model,
            loader,
            device,
            progress=bool(tool_cfg.get("progress", True)),
            on_prediction=writer,
        )
        if dist.is_main():
            info = {
                "checkpoint": str(ckpt_path),
                "iteration": checkpoint.get("iteration"),
                "dataset": _select(cfg, "dataset.name"),
                "root": _select(cfg, "dataset.val.root") or _select(cfg, "dataset.root"),
                "split": _select(cfg, "dataset.val.split") or _select(cfg, "dataset.split"),
                "images": len(dataset),
                "mode": evaluator.mode,
                "scales": evaluator.scales,
                "flip": evaluator.flip,
                "crop_size": list(evaluator.crop_size) if evaluator.crop_size else None,
                "stride": list(evaluator.stride) if evaluator.stride else None,
                "amp": evaluator.amp,
                "world_size": dist.get_world_size(),
            }
            print(format_metrics_table(metrics, class_names))
            json_path, md_path = write_reports(out_dir, metrics, class_names, info)
            print(f"wrote {json_path} and {md_path}")
            if writer is not None:
                print(f"wrote predictions to {writer.folder}")
        dist.barrier()
        return metrics
    finally:
        if started_dist:
            dist.cleanup()


def main(argv: Sequence[str]) -> int:
    """Entry point of ``tools/eval.py``; returns the exit status (2 on a user error)."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        tool_overrides, overrides = parse_args(argv)
        tool_cfg = compose_tool_config(tool_overrides)
        run_eval(tool_cfg, overrides)
    except (SegError, OSError) as error:  # OSError: an unwritable output path, named in it
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

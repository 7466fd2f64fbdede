"""The logic behind ``tools/eval.py``: evaluate a checkpoint with the config stored in it,
or an exported ONNX model on a dataset config that the user names.

Command line (Hydra overrides; ``-m`` evaluates several checkpoints)::

    python tools/eval.py ckpt=PATH [out=DIR] [save_pred=labelIds|color] [device=cpu]
        [dataset.root=...] [dataset.split=val|train|test] [eval.mode=slide] [eval.flip=true]
        [eval.scales=[0.75,1.0,1.25]] [loader.num_workers=2] [eval=slide]
        [reference=OTHER.pt|OTHER.onnx]
    python tools/eval.py ckpt=MODEL.onnx dataset=NAME [dataset.root=...] [onnx_threads=N] ...
    python tools/eval.py -m ckpt=a.pt,b.pt

The tool's config (``configs/eval.yaml``) holds its own keys (``ckpt``, ``out``,
``save_pred``, ``device``, ``progress``) and four sections, ``dataset``, ``model``,
``loader`` and ``eval``, that start empty and open (:data:`STORED_SECTIONS`, registered
as the config ``stored_config_sections``): what the user sets in them overrides the
config stored in the checkpoint, and a key that config does not have is an error.
``eval=NAME`` fills the ``eval`` section with the preset ``configs/eval/NAME.yaml``,
which then replaces the stored evaluation settings. ``--cfg job`` shows exactly these
overrides.

An ``.onnx`` file (``tools/export.py``, fp32 or int8) stores no config: ``dataset=NAME``
picks ``configs/dataset/NAME.yaml`` (``dataset.root=...`` and the other dataset keys
overridable as usual), the evaluation settings are ``configs/eval/whole.yaml`` unless
``eval=NAME`` picks another preset, and the loader settings ``configs/loader/default.yaml``
(``eval.*`` and ``loader.*`` override both). The normalisation (mean, std) is the model's
own, from its metadata; its class count must match the dataset's. The model runs with
onnxruntime on the CPU through the same :class:`Evaluator` as a checkpoint.

``reference=PATH`` (a checkpoint or an ``.onnx``) also runs a second model on every image
and reports the share of pixels where both predict the same class (e.g. int8 vs fp32).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from seg import dist
from seg.checkpoint import load_checkpoint
from seg.cli import CONFIG_DIR, run_in_process
from seg.data.batch import batch_to_device
from seg.data.build import build_dataset
from seg.data.loader import build_eval_loader
from seg.engine.dataset_paths import apply_templates, read_templates, relocate_paths
from seg.engine.evaluator import Evaluator
from seg.engine.load import check_stored_config, is_onnx, load_inference_model
from seg.engine.state import flatten
from seg.errors import CheckpointError, ConfigError
from seg.fileio import write_png, write_text_atomic
from seg.instantiate import build_from_checkpoint
from seg.metrics import format_metrics_table
from seg.models.inference_model import InferenceModel
from seg.visualize import overlay

__all__ = ["CONFIG_DIR", "build_eval_config", "evaluate", "main", "run_eval"]

SAVE_PRED_KINDS = ("labelIds", "color")
#: The sections of the stored training config that eval.py's command line may override.
STORED_SECTIONS = ("dataset", "model", "loader", "eval")
#: The evaluation and loader presets an ONNX model (which stores no config) uses.
ONNX_EVAL_PRESET, ONNX_LOADER_PRESET = "whole", "default"

# The stored config is resolved: keys that were interpolations of another key no longer
# follow it. These links come from the dataset and eval contracts (docs/architecture.md);
# a linked key still holding the source's old value is updated with it. Paths built from
# dataset.root and dataset.split (every dataset kind) are built again from the templates
# the checkpoint recorded (seg/engine/dataset_paths.py; older checkpoints: relocate_paths).
LINKED_KEYS: dict[str, tuple[str, ...]] = {
    "dataset.split": ("dataset.val.split",),
    "dataset.num_classes": ("eval.num_classes",),
    "dataset.ignore_index": ("eval.ignore_index",),
    "dataset.mean": ("eval.mean",),
    "dataset.std": ("eval.std",),
    "dataset.class_names": ("eval.class_names",),
}


def _register_sections() -> None:
    """Register ``stored_config_sections``: the four override sections, empty and open
    (struct off), so that Hydra accepts ``dataset.root=X`` without a ``+``."""
    node = OmegaConf.create({section: {} for section in STORED_SECTIONS})
    for section in STORED_SECTIONS:
        OmegaConf.set_struct(node[section], False)
    ConfigStore.instance().store(name="stored_config_sections", node=node)


_register_sections()


# ------------------------------------------------------------------------ config merging
def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def user_overrides(tool_cfg: DictConfig, preset: str | None) -> dict[str, Any]:
    """The dotted keys the user set in the tool's stored-config sections (the preset's
    own keys left out: the preset replaces the stored ``eval`` section as a whole)."""
    out: dict[str, Any] = {}
    for section in STORED_SECTIONS:
        if section == "eval" and preset is not None:
            continue
        node = tool_cfg.get(section)
        if node:
            values = OmegaConf.to_container(node, resolve=False)
            assert isinstance(values, dict)
            out.update(flatten(values, f"{section}."))
    return out


def build_eval_config(
    stored: Mapping[str, Any],
    overrides: Mapping[str, Any],
    eval_preset: Mapping[str, Any] | DictConfig | None = None,
    sections: Sequence[str] = ("dataset", "model", "eval"),
    templates: Mapping[str, str] | None = None,
) -> DictConfig:
    """The config to evaluate with: the checkpoint's config, an optional ``eval`` preset,
    then the user's dotted ``overrides``; resolved, and read-only in structure.

    ``templates``: the checkpoint's dataset path templates (``seg.engine.dataset_paths``),
    which rebuild every path made from ``dataset.root`` / ``dataset.split`` with their new
    values; None (an older checkpoint): :func:`relocate_paths` moves whole path components.

    Raises:
        ConfigError: an override names a key the stored config does not have, or one of
            ``sections`` is missing.
    """
    cfg = OmegaConf.create(dict(stored))
    if eval_preset is not None:
        # The preset's ${dataset.*} interpolations resolve against the stored dataset.
        cfg.eval = eval_preset
    OmegaConf.set_struct(cfg, True)
    old_root, old_split = _select(cfg, "dataset.root"), _select(cfg, "dataset.split")
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
    if templates is not None:
        apply_templates(cfg, templates, list(overrides))
    elif isinstance(cfg.get("dataset"), DictConfig):
        relocate_paths(cfg.dataset, old_root, old_split, list(overrides))
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve the evaluation config: {error}") from None
    for section in sections:
        if section not in cfg:
            raise ConfigError(f"the checkpoint's config lacks the {section!r} section")
    return cfg


# ------------------------------------------------------------------------- checks
def check_num_classes(
    cfg: DictConfig, dataset: object, ckpt_path: Path, model_classes: int | None = None
) -> None:
    """One-line error when the checkpoint's model and the dataset count classes differently.

    ``model_classes`` defaults to the config's ``model.num_classes``.
    """
    if model_classes is None:
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


# ------------------------------------------------------------------------- ONNX models
def onnx_stored_config(
    tool_cfg: DictConfig, net: InferenceModel, preset: str | None, dataset_choice: str | None
) -> dict:
    """The config an ONNX model is evaluated with, in place of a checkpoint's stored one.

    ``dataset``: the ``dataset=NAME`` group composed into ``tool_cfg`` with the user's
    ``dataset.*`` keys; ``eval``: the chosen preset, else ``configs/eval/whole.yaml``, then
    the user's ``eval.*`` keys; ``loader``: ``configs/loader/default.yaml`` then
    ``loader.*``. The normalisation (mean, std) is the model's own, from its metadata.
    ``preset`` / ``dataset_choice``: the ``eval=`` and ``dataset=`` choices (None: none).
    """
    if dataset_choice is None or not tool_cfg.get("dataset"):
        raise ConfigError(
            f"{net.path} stores no dataset config: name one with dataset=NAME "
            f"(a file of configs/dataset/, e.g. dataset=synthcity) and dataset.root=PATH"
        )
    eval_node = tool_cfg.eval
    if preset is None:  # only the user's eval.* keys: on top of the default preset
        eval_node = OmegaConf.merge(
            OmegaConf.load(CONFIG_DIR / "eval" / f"{ONNX_EVAL_PRESET}.yaml"), tool_cfg.eval
        )
    loader_node = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "loader" / f"{ONNX_LOADER_PRESET}.yaml"), tool_cfg.loader
    )
    stored: dict[str, Any] = {
        key: OmegaConf.to_container(node, resolve=False)
        for key, node in (
            ("dataset", tool_cfg.dataset),
            ("eval", eval_node),
            ("loader", loader_node),
        )
    }
    stored["dataset"]["mean"], stored["dataset"]["std"] = list(net.mean), list(net.std)
    return stored


class AgreementCounter:
    """Counts pixels where a reference model predicts the same class as the evaluated one.

    Called by :meth:`Evaluator.evaluate` once per batch (its ``on_prediction`` hook) with
    the batch and the evaluated model's ids (int64 N x H x W); runs ``reference`` on the
    same images through the same inference settings, normalised with its own mean/std.
    """

    def __init__(self, reference: InferenceModel, evaluator: Evaluator, device: torch.device):
        self.reference, self.evaluator, self.device = reference, evaluator, device
        self.same = torch.zeros((), dtype=torch.int64, device=device)
        self.total = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, batch: Mapping[str, Any], pred: torch.Tensor) -> None:
        images, _ = batch_to_device(batch, self.device, self.reference.mean, self.reference.std)
        probs = self.evaluator.predict(self.reference.model, images, pred.shape[-2:])
        self.same += (probs.argmax(dim=1) == pred).sum()
        self.total += pred.numel()

    def fraction(self) -> float:
        """Share of pixels with equal predictions, over every process's shard."""
        same, total = (
            dist.all_reduce_sum(self.same.clone()),
            dist.all_reduce_sum(self.total.clone()),
        )
        return float(same) / max(1, int(total))


def _chain(*hooks: Any) -> Any:
    """One ``on_prediction`` hook calling each of ``hooks`` that is not None."""
    active = [hook for hook in hooks if hook is not None]
    if not active:
        return None

    def call(batch: Mapping[str, Any], pred: torch.Tensor) -> None:
        for hook in active:
            hook(batch, pred)

    return call


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
def run_eval(
    tool_cfg: DictConfig,
    overrides: Mapping[str, Any],
    preset: str | None = None,
    dataset_choice: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``tool_cfg.ckpt``; returns the metrics (on every rank under DDP).

    ``overrides``: dotted keys of the stored config (:func:`user_overrides`); ``preset``:
    the name of the ``eval=`` preset, whose settings are ``tool_cfg.eval``;
    ``dataset_choice``: the ``dataset=NAME`` config group chosen (for ``.onnx`` models only).

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
    onnx_threads = tool_cfg.get("onnx_threads")
    checkpoint: Mapping[str, Any] = {}
    net: InferenceModel | None = None
    if is_onnx(ckpt_path):
        net = load_inference_model(ckpt_path, onnx_threads=onnx_threads)
        stored = onnx_stored_config(tool_cfg, net, preset, dataset_choice)
        cfg = build_eval_config(stored, {}, sections=("dataset", "eval"))
        check_num_classes(cfg, None, ckpt_path, net.num_classes)  # before reading the data
    else:
        if dataset_choice is not None:
            raise ConfigError(
                "dataset=NAME is for ONNX models (ckpt=*.onnx); a checkpoint is evaluated on "
                "its stored dataset config: change it with dataset.root=..., dataset.split=..."
            )
        checkpoint = load_checkpoint(ckpt_path, map_location="cpu")
        # The stored config is data: refuse planted targets and interpolations before merging.
        check_stored_config(checkpoint["config"], ckpt_path)
        preset_node = None
        if preset is not None:
            preset_node = OmegaConf.to_container(tool_cfg.eval, resolve=False)
        templates = read_templates(checkpoint, ckpt_path)
        cfg = build_eval_config(checkpoint["config"], overrides, preset_node, templates=templates)
    out_dir = Path(str(tool_cfg.out)) if tool_cfg.get("out") else ckpt_path.parent

    device_setting = str(tool_cfg.get("device", "auto"))
    # An ONNX model runs on onnxruntime's CPU provider: Gloo, whatever the device setting.
    use_cuda = net is None and dist.wants_cuda(device_setting)
    started_dist = not dist.is_distributed() and dist.init_distributed(use_cuda=use_cuda)
    try:
        device = dist.resolve_device(device_setting)
        # Evaluation images share one size per dataset (or one per scale / window), so cuDNN's
        # per-shape algorithm timing pays back, as in training.
        torch.backends.cudnn.benchmark = device.type == "cuda"
        if net is None:
            config = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(config, dict)
            net = load_inference_model(ckpt_path, device, checkpoint=checkpoint, config=config)
            check_classes = None
        else:
            device = net.device  # onnxruntime on the CPU
            check_classes = net.num_classes
        dataset = build_dataset(
            cfg.dataset.val, "dataset", dataset_cfg=cfg.dataset, from_checkpoint=True
        )
        check_num_classes(cfg, dataset, ckpt_path, check_classes)
        evaluator: Evaluator = build_from_checkpoint(cfg.eval, "evaluator")
        loader_cfg = cfg.get("loader") or {}
        loader = build_eval_loader(
            dataset,
            batch_size=evaluator.batch_size,
            num_workers=int(loader_cfg.get("num_workers", 0)),
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            pin_memory=device.type == "cuda",
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
        agreement = None
        if tool_cfg.get("reference"):
            reference = load_inference_model(
                str(tool_cfg.reference), device, onnx_threads=onnx_threads
            )
            agreement = AgreementCounter(reference, evaluator, device)
        metrics = evaluator.evaluate(
            net.model,
            loader,
            device,
            progress=bool(tool_cfg.get("progress", True)),
            on_prediction=_chain(writer, agreement),
        )
        same_fraction = agreement.fraction() if agreement is not None else None
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
            for folder in ("image_dir", "mask_dir"):  # folder datasets: where it looked
                if _select(cfg, f"dataset.val.{folder}"):
                    info[folder] = _select(cfg, f"dataset.val.{folder}")
            if is_onnx(ckpt_path):
                info["onnxruntime"] = net.model.runtime_settings()
                print(f"model: {net.model.describe()}")
            if same_fraction is not None:
                info["reference"] = str(tool_cfg.reference)
                info["argmax_agreement"] = same_fraction
            print(format_metrics_table(metrics, class_names))
            if same_fraction is not None:
                print(
                    f"argmax agreement with {tool_cfg.reference}: {100 * same_fraction:.2f}% "
                    "of pixels"
                )
            json_path, md_path = write_reports(out_dir, metrics, class_names, info)
            print(f"wrote {json_path} and {md_path}")
            if writer is not None:
                print(f"wrote predictions to {writer.folder}")
        dist.barrier()
        return metrics
    finally:
        if started_dist:
            dist.cleanup()


def evaluate(tool_cfg: DictConfig) -> int:
    """``tools/eval.py``'s work: the config composed from ``configs/eval.yaml``."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    preset, dataset_choice = choices.get("eval"), choices.get("dataset")
    run_eval(tool_cfg, user_overrides(tool_cfg, preset), preset, dataset_choice)
    return 0


def main(argv: Sequence[str]) -> int:
    """``tools/eval.py ARGS`` in this process (tests, notebooks); returns its exit status."""
    return run_in_process("eval", argv, evaluate)

"""Key mapping from published BiSeNetV2 state dicts to seg's :class:`BiSeNetV2`.

Two layouts are known, both read from their projects' public source:

- ``coincheung``: CoinCheung/BiSeNet ``lib/models/bisenetv2.py`` (its
  ``model_final_v2_*.pth`` files are a plain ``state_dict``, optionally with ``module.``
  prefixes; its ``backbone_v2.pth`` holds ``{"detail": ..., "segment": ...}``). Same
  modules as ours, other names; the four auxiliary heads are the same design and map too.
  Its bilateral guided aggregation (BGA) upsamples with ``nn.Upsample(scale_factor=4)``,
  i.e. nearest neighbour.
- ``mmseg``: open-mmlab/mmsegmentation ``mmseg/models/backbones/bisenetv2.py`` plus an
  ``FCNHead`` decode head (``configs/_base_/models/bisenetv2.py``), stored under
  ``state_dict`` with ``backbone.`` / ``decode_head.`` / ``auxiliary_head.`` prefixes. Its
  BGA upsamples bilinearly and its two 1x1 convolutions after the depthwise BGA convs carry
  a bias (mmcv's ``ConvModule`` adds one when there is no norm layer), which our model
  builds with ``bga_pointwise_bias=True``. Its auxiliary heads are FCN heads (two 3x3
  convs, no x2 refinement), another design than ours: they are dropped.

The mapping is a table from source module paths to ours (:func:`module_table`); a key is
renamed by its longest module prefix in the table, so ``conv.weight`` / ``bn.running_var``
leaves follow their module. Every source key is mapped or dropped with a reason; anything
else is an error. Shapes are checked when the result is loaded into a model
(:func:`seg.models.weights.load_into`). Both layouts are checked number for number against
the source projects' own models (``tests/fixtures/*_bisenetv2``; docs/weights.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from seg.errors import CheckpointError
from seg.models.state_keys import guess_format, strip_wrapper_prefixes

SOURCE_FORMATS = ("coincheung", "mmseg")
#: Detail-branch stages: (our name, number of ConvBNReLU layers).
DETAIL_STAGES = (("s1", 2), ("s2", 3), ("s3", 3))
#: Gather-and-expansion stages: (our name, CoinCheung name, mmseg name, layers); the first
#: layer of each stage has stride 2 (two depthwise convs and a shortcut branch).
GE_STAGES = (("s3", "S3", "stage2", 2), ("s4", "S4", "stage3", 2), ("s5_4", "S5_4", "stage4", 4))
AUX_HEAD_NAMES = ("aux2", "aux3", "aux4", "aux5_4")
#: Source key prefixes that are dropped on purpose, with the reason.
DROPPED: dict[str, dict[str, str]] = {
    "coincheung": {},
    "mmseg": {
        "auxiliary_head.": "mmsegmentation's auxiliary FCN heads are another design than "
        "seg's auxiliary heads",
    },
}
#: Model settings that make our BiSeNetV2 compute what the source computes.
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "coincheung": {"bga_upsample": "nearest", "bga_pointwise_bias": False},
    "mmseg": {"bga_upsample": "bilinear", "bga_pointwise_bias": True},
}


def _coincheung_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for index, (stage, layers) in enumerate(DETAIL_STAGES):
        for j in range(layers):
            table[f"detail.S{index + 1}.{j}"] = f"detail.{stage}.{j}"
    table |= {
        "segment.S1S2.conv": "semantic.stem.conv",
        "segment.S1S2.left.0": "semantic.stem.conv_path.0",
        "segment.S1S2.left.1": "semantic.stem.conv_path.1",
        "segment.S1S2.fuse": "semantic.stem.fuse",
    }
    for ours, theirs, _, layers in GE_STAGES:
        for j in range(layers):
            src, dst = f"segment.{theirs}.{j}", f"semantic.{ours}.{j}"
            table[f"{src}.conv1"] = f"{dst}.gather"
            if j == 0:  # GELayerS2: raw Conv2d / BatchNorm2d layers in nn.Sequential
                table |= {
                    f"{src}.dwconv1.0": f"{dst}.expand.0.conv",
                    f"{src}.dwconv1.1": f"{dst}.expand.0.bn",
                    f"{src}.dwconv2.0": f"{dst}.expand.1.conv",
                    f"{src}.dwconv2.1": f"{dst}.expand.1.bn",
                    f"{src}.shortcut.0": f"{dst}.shortcut.0.conv",
                    f"{src}.shortcut.1": f"{dst}.shortcut.0.bn",
                    f"{src}.shortcut.2": f"{dst}.shortcut.1.conv",
                    f"{src}.shortcut.3": f"{dst}.shortcut.1.bn",
                }
            else:  # GELayerS1
                table[f"{src}.dwconv.0"] = f"{dst}.expand.conv"
                table[f"{src}.dwconv.1"] = f"{dst}.expand.bn"
            table[f"{src}.conv2.0"] = f"{dst}.project.conv"
            table[f"{src}.conv2.1"] = f"{dst}.project.bn"
    table |= {
        "segment.S5_5.bn": "semantic.s5_5.bn",
        "segment.S5_5.conv_gap": "semantic.s5_5.conv_gap",
        "segment.S5_5.conv_last": "semantic.s5_5.conv_last",
        "bga.left1.0": "bga.detail_keep.0.conv",
        "bga.left1.1": "bga.detail_keep.0.bn",
        "bga.left1.2": "bga.detail_keep.1",
        "bga.left2.0": "bga.detail_down.0.conv",
        "bga.left2.1": "bga.detail_down.0.bn",
        "bga.right1.0": "bga.semantic_up.conv",
        "bga.right1.1": "bga.semantic_up.bn",
        "bga.right2.0": "bga.semantic_keep.0.conv",
        "bga.right2.1": "bga.semantic_keep.0.bn",
        "bga.right2.2": "bga.semantic_keep.1",
        "bga.conv.0": "bga.fuse.conv",
        "bga.conv.1": "bga.fuse.bn",
        "head.conv": "head.conv",
        "head.conv_out.1": "head.classifier",
    }
    for name in AUX_HEAD_NAMES:
        table |= {
            f"{name}.conv": f"aux_heads.{name}.conv",
            f"{name}.conv_out.0.1": f"aux_heads.{name}.refine.1",
            f"{name}.conv_out.1": f"aux_heads.{name}.classifier",
        }
    return table


def _mmseg_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for index, (stage, layers) in enumerate(DETAIL_STAGES):
        for j in range(layers):
            table[f"backbone.detail.detail_branch.{index}.{j}"] = f"detail.{stage}.{j}"
    stem = "backbone.semantic.stage1"
    table |= {
        f"{stem}.conv_first": "semantic.stem.conv",
        f"{stem}.convs.0": "semantic.stem.conv_path.0",
        f"{stem}.convs.1": "semantic.stem.conv_path.1",
        f"{stem}.fuse_last": "semantic.stem.fuse",
    }
    for ours, _, theirs, layers in GE_STAGES:
        for j in range(layers):
            src, dst = f"backbone.semantic.{theirs}.{j}", f"semantic.{ours}.{j}"
            table[f"{src}.conv1"] = f"{dst}.gather"
            if j == 0:  # stride 2: two depthwise ConvModules and a separable shortcut
                table |= {
                    f"{src}.dwconv.0": f"{dst}.expand.0",
                    f"{src}.dwconv.1": f"{dst}.expand.1",
                    f"{src}.shortcut.0.depthwise_conv": f"{dst}.shortcut.0",
                    f"{src}.shortcut.0.pointwise_conv": f"{dst}.shortcut.1",
                }
            else:
                table[f"{src}.dwconv.0"] = f"{dst}.expand"
            table[f"{src}.conv2.0"] = f"{dst}.project"
    context, bga = "backbone.semantic.stage4_CEBlock", "backbone.bga"
    table |= {
        f"{context}.gap.1": "semantic.s5_5.bn",
        f"{context}.conv_gap": "semantic.s5_5.conv_gap",
        f"{context}.conv_last": "semantic.s5_5.conv_last",
        f"{bga}.detail_dwconv.0.depthwise_conv": "bga.detail_keep.0",
        f"{bga}.detail_dwconv.0.pointwise_conv.conv": "bga.detail_keep.1",
        f"{bga}.detail_down.0": "bga.detail_down.0",
        f"{bga}.semantic_conv.0": "bga.semantic_up",
        f"{bga}.semantic_dwconv.0.depthwise_conv": "bga.semantic_keep.0",
        f"{bga}.semantic_dwconv.0.pointwise_conv.conv": "bga.semantic_keep.1",
        f"{bga}.conv": "bga.fuse",
        "decode_head.convs.0": "head.conv",
        "decode_head.conv_seg": "head.classifier",
    }
    return table


def module_table(source_format: str) -> dict[str, str]:
    """Source module path -> our module path, for ``"coincheung"`` or ``"mmseg"``."""
    if source_format == "coincheung":
        return _coincheung_table()
    if source_format == "mmseg":
        return _mmseg_table()
    raise CheckpointError(f"unknown source format {source_format!r}: expected {SOURCE_FORMATS}")


def map_key(key: str, table: Mapping[str, str]) -> str | None:
    """Rename ``key`` by its longest module prefix in ``table``; None when none matches."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        if module in table:
            return ".".join([table[module], *parts[end:]])
    return None


@dataclass
class Conversion:
    """A source state dict in seg's names.

    ``state``: our key -> tensor. ``mapped``: (source key, our key) pairs in source
    order. ``dropped``: (source key, reason). ``num_classes`` comes from the main
    classifier; ``aux_heads`` says whether the source had auxiliary heads that map;
    :meth:`model_settings` gives the BiSeNetV2 arguments that reproduce the source.
    """

    source_format: str
    state: dict[str, torch.Tensor]
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    num_classes: int = 0
    aux_heads: bool = False

    def model_settings(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "aux_heads": self.aux_heads,
            **MODEL_SETTINGS[self.source_format],
        }


def convert_state_dict(
    state: Mapping[str, Any], source_format: str = "auto", source: str = "<state dict>"
) -> Conversion:
    """Rename a published BiSeNetV2 state dict to seg's names.

    Args:
        state: the source state dict (``module.`` / ``_orig_mod.`` prefixes are stripped).
        source_format: ``"coincheung"``, ``"mmseg"`` or ``"auto"`` (from the key names).
        source: the file it came from, named in errors.
    Raises:
        CheckpointError: one line naming ``source``: the layout is not recognised, a key
            maps to nothing (another architecture), two keys map to one, a value is not a
            tensor, or the main classifier is missing.
    """
    state = strip_wrapper_prefixes(state)
    if source_format == "auto":
        guessed = guess_format(state)
        if guessed == "seg":
            raise CheckpointError(
                f"{source} is already in seg's layout: load it with model.weights={source}"
            )
        if guessed is None:
            raise CheckpointError(
                f"{source} is not a known BiSeNetV2 state dict (first keys: "
                f"{', '.join(list(state)[:3])}); expected CoinCheung/BiSeNet or mmsegmentation keys"
            )
        source_format = guessed
    table = module_table(source_format)
    result = Conversion(source_format=source_format, state={})
    unknown: list[str] = []
    for key, value in state.items():
        reason = next(
            (why for prefix, why in DROPPED[source_format].items() if key.startswith(prefix)), None
        )
        if reason is not None:
            result.dropped.append((key, reason))
            continue
        ours = map_key(key, table)
        if ours is None:
            unknown.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} holds a {type(value).__name__}, not a tensor")
        if ours in result.state:
            raise CheckpointError(f"{source}: two keys map to {ours}, the second is {key}")
        result.state[ours] = value
        result.mapped.append((key, ours))
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} of {len(state)} keys match no layer of a "
            f"{source_format} BiSeNetV2 (first: {', '.join(unknown[:3])}); "
            "is it another architecture?"
        )
    classifier = result.state.get("head.classifier.weight")
    if classifier is None or classifier.dim() != 4:
        raise CheckpointError(
            f"{source}: no main classifier (head.classifier.weight) among the mapped keys"
        )
    result.num_classes = int(classifier.shape[0])
    result.aux_heads = any(key.startswith("aux_heads.") for key in result.state)
    return result


def convert_backbone(payload: Mapping[str, Any], source: str = "<backbone>") -> Conversion:
    """Rename CoinCheung's ``backbone_v2.pth`` (``{"detail": sd, "segment": sd}``, the two
    branches' state dicts) to our ``detail.*`` / ``semantic.*`` keys.

    Raises:
        CheckpointError: the payload lacks the two state dicts, or a key maps to nothing.
    """
    branches = {}
    for name in ("detail", "segment"):
        branch = payload.get(name)
        if not isinstance(branch, Mapping):
            raise CheckpointError(
                f"{source} is not a BiSeNetV2 backbone file: expected a dict with 'detail' and "
                f"'segment' state dicts, got top-level keys {sorted(map(str, payload))[:5]}"
            )
        branches[name] = strip_wrapper_prefixes(branch)
    state = {
        f"{name}.{key}": value for name, branch in branches.items() for key, value in branch.items()
    }
    table = module_table("coincheung")
    result = Conversion(source_format="coincheung", state={})
    unknown = []
    for key, value in state.items():
        ours = map_key(key, table)
        if ours is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        result.state[ours] = value
        result.mapped.append((key, ours))
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} backbone keys match no layer of the detail or semantic "
            f"branch (first: {', '.join(unknown[:3])})"
        )
    return result

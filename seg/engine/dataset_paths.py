"""Stored dataset paths that follow ``dataset.root`` / ``dataset.split`` at evaluation.

A checkpoint stores its config resolved: ``mask_dir: ${dataset.root}/${dataset.split}annot``
is kept as ``data/camvid/valannot``, and which parts of it were the root and the split is
lost. So, at training time, :func:`dataset_templates` records the unresolved template of
every string under ``dataset`` that is built from ``dataset.root`` or ``dataset.split``
(directly, or through another key so built), and the checkpoint keeps them as
``"dataset_templates"`` (``{"dataset.val.mask_dir": "${dataset.root}/${dataset.split}annot",
...}``). ``tools/eval.py`` puts them back (:func:`apply_templates`; keys the user set are
left as set) and resolves the config again, so ``dataset.split=test`` gives
``data/camvid/testannot``: exactly the training-time construction, whatever the layout
(suffixes, prefixes, nested keys), and nothing else is touched.

A template is recorded, and accepted from a checkpoint, only when each of its
interpolations is a plain reference to a key of the dataset node (``${dataset.KEY}``):
resolving a stored template can then call no resolver (``${oc.env:...}``), so the
checkpoint stays data (docs/reliability.md). Paths built with a resolver are not recorded
and keep their stored value. Checkpoints written before templates were recorded keep the
older rule, :func:`relocate_paths` (whole path components).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from seg.engine.state import flatten
from seg.errors import CheckpointError

#: The checkpoint entry holding the templates (absent in older checkpoints).
TEMPLATES_KEY = "dataset_templates"
#: The keys whose new values the templates carry to the paths built from them.
SOURCES = ("dataset.root", "dataset.split")
_INTERPOLATION = re.compile(r"\$\{([^{}]*)\}")
_PLAIN_REFERENCE = re.compile(r"dataset(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def references(template: str) -> list[str] | None:
    """The keys ``template`` interpolates (``["dataset.root", "dataset.split"]``), or None
    when it is not a template of plain ``${dataset.KEY}`` references (a resolver, a
    relative or nested interpolation, an escaped ``\\${``) or holds no interpolation."""
    if "\\$" in template:
        return None
    found = _INTERPOLATION.findall(template)
    if not found or "${" in _INTERPOLATION.sub("", template):
        return None
    if not all(_PLAIN_REFERENCE.fullmatch(key) for key in found):
        return None
    return found


def _depends(key: str, on: set[str]) -> bool:
    """``key`` is one of ``on``, or a node above one of them (``dataset.generator``)."""
    return any(key == k or k.startswith(f"{key}.") for k in on)


def dataset_templates(cfg: DictConfig) -> dict[str, str]:
    """The unresolved templates of the strings under ``cfg.dataset`` built from
    ``dataset.root`` / ``dataset.split``, by dotted key (the two keys themselves left out).

    A key is recorded when its template references a source, or a key already recorded,
    or a node above one (repeated until nothing changes).
    """
    if not isinstance(cfg.get("dataset"), DictConfig):
        return {}
    raw = OmegaConf.to_container(cfg.dataset, resolve=False)
    assert isinstance(raw, dict)
    flat = flatten(raw, "dataset.")
    refs = {
        key: found
        for key, value in flat.items()
        if isinstance(value, str) and key not in SOURCES and (found := references(value))
    }
    built_from: set[str] = set(SOURCES)
    changed = True
    while changed:
        changed = False
        for key, found in refs.items():
            if key not in built_from and any(_depends(ref, built_from) for ref in found):
                built_from.add(key)
                changed = True
    return {key: flat[key] for key in sorted(built_from - set(SOURCES))}


def read_templates(checkpoint: Mapping[str, Any], path: Path) -> dict[str, str] | None:
    """The checkpoint's ``"dataset_templates"``, checked; None for older checkpoints.

    Raises:
        CheckpointError: an entry is not a ``dataset.*`` key with a template of plain
            ``${dataset.KEY}`` references (the checkpoint was altered).
    """
    templates = checkpoint.get(TEMPLATES_KEY)
    if templates is None:
        return None
    if not isinstance(templates, Mapping):
        raise CheckpointError(
            f"checkpoint {path}: {TEMPLATES_KEY} holds a {type(templates).__name__}, not a dict"
        )
    for key, template in templates.items():
        if not (isinstance(key, str) and key.startswith("dataset.")) or not (
            isinstance(template, str) and references(template)
        ):
            raise CheckpointError(
                f"checkpoint {path}: {TEMPLATES_KEY}[{str(key)[:80]!r}]={str(template)[:80]!r} "
                "is not a dataset path template of plain ${dataset.KEY} references (refused: "
                "the checkpoint was altered)"
            )
    return dict(templates)


def apply_templates(cfg: DictConfig, templates: Mapping[str, str], explicit: Sequence[str]) -> None:
    """Put ``templates`` back into the (resolved) stored config ``cfg``, so that resolving
    it builds those paths from its current ``dataset.root`` / ``dataset.split``.

    Keys the user set (``explicit``, or a node above them) and keys ``cfg`` lacks are left
    as they are.
    """
    for key, template in templates.items():
        if any(key == name or key.startswith(f"{name}.") for name in explicit):
            continue
        if OmegaConf.select(cfg, key, default=None, throw_on_missing=False) is None:
            continue
        OmegaConf.update(cfg, key, template, merge=False)


def relocate_paths(
    dataset: DictConfig, old_root: Any, old_split: Any, explicit: Sequence[str]
) -> None:
    """Older checkpoints (no templates): make the stored dataset nodes follow a new
    ``dataset.root`` / ``dataset.split`` by path components.

    Every string under ``dataset.train`` / ``dataset.val`` equal to the old root, or a
    path below it, moves to the new root; below the root, a path component equal to
    the old split becomes the new split in ``dataset.val`` (the evaluated split). A
    component that merely contains the split (``valannot``) is not changed. Keys the user
    set themselves (``explicit``) are left as set.
    """
    new_root, new_split = dataset.get("root"), dataset.get("split")
    moved_root = old_root not in (None, "") and new_root != old_root
    moved_split = old_split not in (None, "") and new_split != old_split

    def follow(node: Any, path: str, is_val: bool) -> None:
        for key in list(node.keys()):
            name = f"{path}.{key}"
            value = node[key]
            if isinstance(value, DictConfig):
                follow(value, name, is_val)
                continue
            if name in explicit or not isinstance(value, str):
                continue
            root = str(old_root)
            if value != root and not value.startswith(root.rstrip("/") + "/"):
                continue
            rest = value[len(root) :]
            if moved_split and is_val:
                parts = rest.split("/")
                rest = "/".join(str(new_split) if p == str(old_split) else p for p in parts)
            node[key] = (str(new_root) if moved_root else root) + rest

    if not (moved_root or moved_split):
        return
    for split_node in ("train", "val"):
        node = dataset.get(split_node)
        if isinstance(node, DictConfig):
            follow(node, f"dataset.{split_node}", split_node == "val")

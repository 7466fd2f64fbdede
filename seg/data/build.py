"""The one way a dataset config node becomes a Dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from seg.errors import DatasetError
from seg.instantiate import build, build_from_checkpoint


def build_dataset(
    node: Any,
    what: str = "dataset",
    *,
    dataset_cfg: Mapping[str, Any] | None = None,
    from_checkpoint: bool = False,
    **overrides: Any,
) -> Dataset:
    """``instantiate(node, **overrides)`` for a ``dataset.train``/``dataset.val`` node.

    A ``DatasetError`` (missing root, image without a label) reaches the user as its own
    one-line message, completed with how to get the data and where it was looked for:
    the dataset config's ``missing_hint`` (e.g. CamVid: where to download it), then, when
    the message does not already say how to point elsewhere, ``set dataset.root=PATH``
    with the root in use (the node's ``root``, else ``dataset_cfg``'s).

    Args:
        node: the ``dataset.train`` / ``dataset.val`` node.
        what: names the object in other build errors.
        dataset_cfg: the whole ``dataset`` node, for its ``root`` and ``missing_hint``.
        from_checkpoint: the node comes from a checkpoint's stored config: its targets are
            checked first (:func:`seg.instantiate.build_from_checkpoint`).
    """
    try:
        if from_checkpoint:
            return build_from_checkpoint(node, what, **overrides)
        return build(node, what, **overrides)
    except DatasetError as error:
        message = str(error)
        about = dataset_cfg if dataset_cfg is not None else {}
        hint = about.get("missing_hint")
        if hint and str(hint) not in message:
            message += f"; {hint}"
        root = node.get("root") if hasattr(node, "get") else None
        root = root if root is not None else about.get("root")
        if root is not None and "dataset.root" not in message:
            message += f"; set dataset.root=PATH to your copy (now dataset.root={root})"
        raise DatasetError(message) from None

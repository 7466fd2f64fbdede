"""The one way a dataset config node becomes a Dataset."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from seg.errors import DatasetError
from seg.instantiate import build


def build_dataset(node: Any, what: str = "dataset", **overrides: Any) -> Dataset:
    """``instantiate(node, **overrides)`` for a ``dataset.train``/``dataset.val`` node.

    A ``DatasetError`` (missing root, image without a label) reaches the user as its own
    one-line message; when the node has a ``root`` and the message does not already say
    how to point elsewhere, it adds ``set dataset.root=PATH``. ``what`` names the object
    in other build errors.
    """
    try:
        return build(node, what, **overrides)
    except DatasetError as error:
        message = str(error)
        root = node.get("root") if hasattr(node, "get") else None
        if root is not None and "dataset.root" not in message:
            message += f"; set dataset.root=PATH to your copy (now dataset.root={root})"
        raise DatasetError(message) from None

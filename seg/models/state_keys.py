"""What a state dict's key names say: wrapper prefixes, and which layout it is in.

Shared by the weight loader (:mod:`seg.models.weights`), which names a published layout in
its error, and the converter (:mod:`seg.models.convert`), which renames one; neither needs
the other for these facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Key prefixes added by wrappers: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Key prefixes that only one layout has: (layout, prefixes), tried in this order.
LAYOUT_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mmseg", ("backbone.bga.", "backbone.semantic.", "decode_head.")),
    ("coincheung", ("segment.S1S2.", "detail.S1.", "bga.left1.")),
    ("seg", ("semantic.stem.", "detail.s1.", "bga.detail_keep.")),
)


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a wrapper prefix (``module.``, ``_orig_mod.``) that every key carries."""
    cleaned = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if cleaned and all(key.startswith(prefix) for key in cleaned):
            cleaned = {key[len(prefix) :]: value for key, value in cleaned.items()}
    return cleaned


def guess_format(state: Mapping[str, Any]) -> str | None:
    """``"coincheung"``, ``"mmseg"`` or ``"seg"`` from the key names; None if unknown."""
    keys = list(strip_wrapper_prefixes(state))
    for layout, prefixes in LAYOUT_SIGNATURES:
        if any(key.startswith(prefixes) for key in keys):
            return layout
    return None

"""``hydra.utils.instantiate`` with the project's one-line errors.

Hydra wraps anything a ``_target_`` raises in a multi-line ``InstantiationException``. A
``SegError`` raised inside (a missing dataset root, a bad loss setting) should reach the
user as itself, in one line; any other failure becomes a one-line ``ConfigError`` naming
what could not be built.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from seg.errors import ConfigError, SegError, first_line


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; ``what`` names the object in error messages."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, SegError):
            cause = cause.__cause__
        if isinstance(cause, SegError):
            raise cause from None
        first = first_line(error)
        raise ConfigError(f"cannot build the {what}: {first}") from None

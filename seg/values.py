"""Checked conversions of the values users type (``key=value`` on a command line).

Hydra and OmegaConf hand over whatever was typed: ``max_iters=abc`` arrives as the string
``'abc'``, ``batch_size=2.9`` as a float, ``scales=abc`` as a string that would iterate
character by character. Each function here returns the value in the wanted type or raises
one ``ConfigError`` line naming the key and the value, so that no setting is silently
rounded or reaches ``int()`` / ``float()`` as a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from seg.errors import ConfigError


def int_setting(value: Any, key: str, minimum: int | None = None) -> int:
    """``value`` as an int (whole numbers only), or a one-line ``ConfigError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value!r}")
    return int(number)


def bool_setting(value: Any, key: str) -> bool:
    """``value`` as a bool (true/false only), or a one-line ``ConfigError`` naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def float_setting(value: Any, key: str) -> float:
    """``value`` as a finite or infinite float, or a one-line ``ConfigError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {value!r}") from None


def pair_setting(value: Any, key: str, minimum: int = 1) -> tuple[int, int] | None:
    """``[h, w]`` (or one whole number for both) of whole numbers >= ``minimum``; None stays
    None. A one-line ``ConfigError`` names ``key`` otherwise."""
    if value is None:
        return None
    message = f"{key} must be [h, w] (or one number) of whole numbers >= {minimum}, got {value!r}"
    items = [value, value] if isinstance(value, int | float | str) else value
    if not isinstance(items, Sequence) or len(items) != 2:
        raise ConfigError(message)
    try:
        height, width = (int_setting(v, key, minimum) for v in items)
    except ConfigError:
        raise ConfigError(message) from None
    return height, width


def scales_setting(value: Any, key: str) -> list[float]:
    """A non-empty list of positive numbers (one number is a list of one), or a one-line
    ``ConfigError`` naming ``key``."""
    message = f"{key} must be a non-empty list of positive numbers, got {value!r}"
    items = [value] if isinstance(value, int | float) and not isinstance(value, bool) else value
    if isinstance(items, str) or not isinstance(items, Sequence) or not items:
        raise ConfigError(message)
    try:
        scales = [float_setting(v, key) for v in items]
    except ConfigError:
        raise ConfigError(message) from None
    if not all(s > 0 for s in scales):  # also refuses NaN
        raise ConfigError(message)
    return scales

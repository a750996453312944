"""One place that checks settings against their ranges, before any expensive work starts.

Every config dataclass, env constructor and policy constructor calls these on its values, so that a
setting that cannot be right (``epochs=0``, ``alpha=nan``, ``layer=2.7``, a threshold that never
fires) is refused with a message naming the setting, the value and the fix, instead of running for
half an hour and then failing, or worse, succeeding with a wrong result.

The checks raise :class:`ConfigError`, a ``ValueError``, so callers that already catch ``ValueError``
(the CLI turns it into one ``ee-gym: error: ...`` line) need nothing new. Wrong *types* (``"x"`` for
a number) are ``ConfigError`` too: to a user both are "this value is not allowed".

This module imports nothing heavy: the env ids are registered, and their keywords checked, without
loading torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ConfigError",
    "check_choice",
    "check_float",
    "check_int",
    "check_optional_float",
    "check_optional_int",
    "check_output_folder",
]


class ConfigError(ValueError):
    """A setting outside its allowed values (the message names the setting, the value and the fix)."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_ too


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` when it is a whole number within [minimum, maximum], else ConfigError.

    Accepts Python and numpy integers and integral floats (``2.0``); refuses ``2.7``, ``inf``, ``nan``,
    booleans and strings, instead of truncating them silently.
    """
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        number = int(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        number = int(as_float)
    _check_range(name, number, minimum, maximum)
    return number


def check_optional_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    """None stays None (the documented "no limit" / "use the default"); else :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum=minimum, maximum=maximum)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` as a finite ``float`` within its bounds, else ConfigError (``nan`` and ``inf`` never pass)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (number < minimum or (exclusive_minimum and number == minimum)):
        relation = ">" if exclusive_minimum else ">="
        raise ConfigError(f"{name} must be {relation} {minimum}, got {value!r}")
    if maximum is not None and (number > maximum or (exclusive_maximum and number == maximum)):
        relation = "<" if exclusive_maximum else "<="
        raise ConfigError(f"{name} must be {relation} {maximum}, got {value!r}")
    return number


def check_optional_float(name: str, value: Any, **bounds: Any) -> float | None:
    """None stays None (the documented "use the default"); else :func:`check_float` with ``bounds``."""
    return None if value is None else check_float(name, value, **bounds)


def check_output_folder(name: str, value: Any) -> str | None:
    """A folder path that a run may create or reuse: None stays None; a path that is (or lies below)
    an existing file is ConfigError, since no folder can be made there."""
    if value is None:
        return None
    from pathlib import Path

    path = Path(value)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"lies below {folder}, which is a file"
                raise ConfigError(f"{name} {str(value)!r} {where}, not a folder; pass a folder path")
            break
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``, else ConfigError listing them."""
    options = list(choices)
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, options))}")
    return value


def _check_range(name: str, number: int, minimum: int | None, maximum: int | None) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {number}")

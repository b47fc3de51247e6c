"""Argument conversions shared by every layer: keys, values, sizes and TTLs.

Each function raises the exception DESIGN.md §6 names, with a message that says
what was wrong and with which value.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Union

from ._errors import CacheConfigError, KeyTooLargeError

__all__ = [
    "MAX_KEY_SIZE",
    "MAX_SIZE",
    "Key",
    "encode_key",
    "parse_size",
    "ttl_to_ns",
    "value_buffer",
]

MAX_KEY_SIZE = 65535
MAX_SIZE = 1 << 62  # any size or offset: far from the C core's 64-bit arithmetic limits

Key = Union[bytes, bytearray, memoryview, str]  # noqa: UP007 - evaluated at runtime
TTL = Union[int, float, datetime.timedelta, None]  # noqa: UP007

_MAX_TTL_SECONDS = 100 * 365.25 * 86400  # deadlines stay far inside 64-bit nanoseconds
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def encode_key(key: object) -> bytes:
    """The key as bytes: str is encoded UTF-8; at most 65535 bytes."""
    if type(key) is bytes:
        encoded = key
    elif isinstance(key, str):
        try:
            encoded = key.encode()
        except UnicodeEncodeError as exc:
            raise CacheConfigError(
                f"key {key[:40]!r} cannot be encoded as UTF-8 ({exc.reason} at position "
                f"{exc.start}): pass bytes, or a str without lone surrogates"
            ) from None
    elif isinstance(key, (bytes, bytearray, memoryview)):
        encoded = bytes(key)
    else:
        raise TypeError(f"a key is bytes, bytearray, memoryview or str, not {type(key).__name__}")
    if len(encoded) > MAX_KEY_SIZE:
        raise KeyTooLargeError(
            f"key of {len(encoded)} bytes exceeds the maximum of {MAX_KEY_SIZE} bytes"
        )
    return encoded


def value_buffer(value: object) -> memoryview:
    """A byte view of a value: any C-contiguous buffer (bytes, bytearray,
    memoryview, array, NumPy array...)."""
    if isinstance(value, str):
        raise TypeError("a value is a bytes-like object, not str: encode it first")
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"a value is a bytes-like object (a C-contiguous buffer), not {type(value).__name__}"
        ) from None
    if not view.c_contiguous:
        raise TypeError("a value must be a C-contiguous buffer; this one is not contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from an int or a string such as "512k", "64MiB", "1.5G" (powers of 1024)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{what} is an int or a string like '64MiB', not {type(value).__name__}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE_RE.fullmatch(value)
        if match is None:
            raise CacheConfigError(
                f"{what} {value!r} is not a size: use bytes or a number with k, M, G or T "
                "(powers of 1024), such as '512k', '64MiB' or '1.5G'"
            )
        number = math.ceil(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number < 0:
        raise CacheConfigError(f"{what} must not be negative, got {value!r}")
    if number > MAX_SIZE:
        raise CacheConfigError(f"{what} {value!r} is too large: at most 2**62 bytes")
    return number


def ttl_to_ns(ttl: object, what: str = "ttl") -> int | None:
    """A time-to-live in seconds (int, float or timedelta) as nanoseconds; None stays None."""
    if ttl is None:
        return None
    if isinstance(ttl, datetime.timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"{what} is a number of seconds or a timedelta, not {type(ttl).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise CacheConfigError(f"{what} must be a positive number of seconds or None, got {ttl!r}")
    if seconds > _MAX_TTL_SECONDS:
        raise CacheConfigError(
            f"{what} of {seconds:g} s is more than a century; use None for no expiry"
        )
    return max(1, int(seconds * 1e9))

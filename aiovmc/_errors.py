"""The exception tree of DESIGN.md §6.

Every exception aiovmc raises on its own account derives from `AiovmcError`;
the parameter errors also derive from `ValueError` so that code written against
the standard library's conventions keeps working. Exceptions raised by user
callbacks (loaders, ``on_evict``) propagate unchanged and are not wrapped.
"""

from __future__ import annotations

__all__ = [
    "AiovmcError",
    "CacheClosedError",
    "CacheConfigError",
    "CacheFormatError",
    "CacheFullError",
    "KeyTooLargeError",
    "ValueTooLargeError",
]


class AiovmcError(Exception):
    """Base class of every error raised by aiovmc itself."""


class CacheFormatError(AiovmcError):
    """The file is not a compatible aiovmc cache (foreign, truncated, corrupt or
    of another format version). The file is left untouched."""


class CacheConfigError(AiovmcError, ValueError):
    """Invalid or conflicting parameters."""


class CacheFullError(AiovmcError):
    """No room: policy ``"none"`` with a full cache, or a reservation that cannot fit."""


class KeyTooLargeError(AiovmcError, ValueError):
    """A key longer than 65535 bytes."""


class ValueTooLargeError(AiovmcError, ValueError):
    """A value the cache could never hold, raised before anything is evicted."""


class CacheClosedError(AiovmcError):
    """The handle is closed."""


class RepairNeeded(AiovmcError):
    """Internal, never raised to callers: an operation of `aiovmc._cache.CacheCore`
    (one made on an event loop's thread) found the file in need of a repair and
    did not run it. The caller repairs where it may wait, then calls again."""

"""How a C status becomes a Python exception: `raise_for` is the one place."""

from __future__ import annotations

from typing import NoReturn

from .._errors import (
    AiovmcError,
    CacheClosedError,
    CacheConfigError,
    CacheFormatError,
    CacheFullError,
    KeyTooLargeError,
    ValueTooLargeError,
)
from ._binding import ffi, lib

__all__ = ["ERRORS", "raise_for"]

# Every failure status the core defines, and what it becomes. VMC_MISS and
# VMC_E_NEED_ROOM are answers, not failures: callers handle them before this.
ERRORS: dict[int, type[Exception]] = {
    lib.VMC_E_FORMAT: CacheFormatError,
    lib.VMC_E_CONFIG: CacheConfigError,
    lib.VMC_E_FULL: CacheFullError,
    lib.VMC_E_KEY_TOO_LARGE: KeyTooLargeError,
    lib.VMC_E_VALUE_TOO_LARGE: ValueTooLargeError,
    lib.VMC_E_CLOSED: CacheClosedError,
    lib.VMC_E_OS: OSError,
    lib.VMC_E_STATE: AiovmcError,
    lib.VMC_E_CORRUPT: AiovmcError,
    lib.VMC_E_NEED_ROOM: AiovmcError,
}


def raise_for(status: int) -> NoReturn:
    """Raise the exception for a failed core call, with the core's message."""
    message = ffi.string(lib.vmc_last_error()).decode("utf-8", "replace")
    cls = ERRORS.get(status)
    if cls is OSError:
        raise OSError(lib.vmc_last_errno(), message)
    if cls is None:
        raise AiovmcError(f"unexpected status {status} from the native core: {message}")
    raise cls(message)


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
    RepairNeeded,
    ValueTooLargeError,
)
from ._binding import ffi, lib

__all__ = ["ERRORS", "error_for", "raise_for"]

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
    lib.VMC_E_STATE: AiovmcError,  # a reservation used in the wrong state, as in Python
    lib.VMC_E_CORRUPT: CacheFormatError,  # damage that repair could not mend
    lib.VMC_E_NEED_ROOM: AiovmcError,
    lib.VMC_E_REPAIR: RepairNeeded,  # a no-repair call: the caller repairs, then retries
}


def error_for(status: int) -> Exception:
    """The exception for a failed core call, with the core's message: build it
    at once, before anything else (a callback) can call the core on this thread
    and replace the message."""
    message = ffi.string(lib.vmc_last_error()).decode("utf-8", "replace")
    cls = ERRORS.get(status)
    if cls is OSError:
        return OSError(lib.vmc_last_errno(), message)
    if cls is None:
        return AiovmcError(f"unexpected status {status} from the native core: {message}")
    return cls(message)


def raise_for(status: int) -> NoReturn:
    """Raise the exception for a failed core call, with the core's message."""
    raise error_for(status)

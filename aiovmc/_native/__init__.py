"""The binding to the C core. Only this package touches cffi's `ffi` and `lib`."""

from ._handle import (
    END_FAILED,
    END_NONE,
    END_VALUE,
    FAST_PATH,
    FLIGHT_FULL,
    FLIGHT_LEAD,
    FLIGHT_NONE,
    FLIGHT_TAKEOVER,
    FLIGHT_VALUE,
    FLIGHT_WAIT,
    SCRATCH_SIZE,
    Handle,
    NativeInfo,
    new_ticket,
    peek,
    set_clock_offset,
)
from ._status import ERRORS, raise_for

__all__ = [
    "END_FAILED",
    "END_NONE",
    "END_VALUE",
    "ERRORS",
    "FAST_PATH",
    "FLIGHT_FULL",
    "FLIGHT_LEAD",
    "FLIGHT_NONE",
    "FLIGHT_TAKEOVER",
    "FLIGHT_VALUE",
    "FLIGHT_WAIT",
    "SCRATCH_SIZE",
    "Handle",
    "NativeInfo",
    "new_ticket",
    "peek",
    "raise_for",
    "set_clock_offset",
]

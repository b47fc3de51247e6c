"""The binding to the C core. Only this package touches cffi's `ffi` and `lib`."""

from ._handle import SCRATCH_SIZE, Handle, NativeInfo, set_clock_offset
from ._status import ERRORS, raise_for

__all__ = ["ERRORS", "SCRATCH_SIZE", "Handle", "NativeInfo", "raise_for", "set_clock_offset"]

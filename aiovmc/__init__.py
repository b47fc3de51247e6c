"""aiovmc: a cache for async Python shared by every process on a host.

One memory-mapped file, a C core, and an anyio facade that works the same on
asyncio and trio.
"""

from . import functools as functools
from ._async_cache import AsyncCache as AsyncCache
from ._async_cache import AsyncReservation as AsyncReservation
from ._cache import Cache as Cache
from ._cache import CacheEntry as CacheEntry
from ._cache import CacheStatistics as CacheStatistics
from ._cache import Reservation as Reservation
from ._errors import AiovmcError as AiovmcError
from ._errors import CacheClosedError as CacheClosedError
from ._errors import CacheConfigError as CacheConfigError
from ._errors import CacheFormatError as CacheFormatError
from ._errors import CacheFullError as CacheFullError
from ._errors import KeyTooLargeError as KeyTooLargeError
from ._errors import ValueTooLargeError as ValueTooLargeError

__all__ = [
    "AiovmcError",
    "AsyncCache",
    "AsyncReservation",
    "Cache",
    "CacheClosedError",
    "CacheConfigError",
    "CacheEntry",
    "CacheFormatError",
    "CacheFullError",
    "CacheStatistics",
    "KeyTooLargeError",
    "Reservation",
    "ValueTooLargeError",
]

__version__ = "0.1.0"

# Public names report the public module, so tracebacks and docs say aiovmc.Cache.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name

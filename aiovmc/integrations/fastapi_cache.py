"""`AiovmcBackend`: a fastapi-cache2 backend in an aiovmc file, shared by
every worker on the host.

    from fastapi_cache import FastAPICache
    from aiovmc.integrations.fastapi_cache import AiovmcBackend

    FastAPICache.init(AiovmcBackend("/dev/shm/app.cache", size="256MiB"), prefix="api")

fastapi-cache2 is imported when this module is. Its ``@cache`` decorator
neither coalesces concurrent misses nor keeps status and headers; for whole
responses, `aiovmc.integrations.asgi.CacheMiddleware` does both.
"""

from __future__ import annotations

import os
import time

from fastapi_cache.backends import Backend

from .._async_cache import AsyncCache
from ._open import LazyCache

__all__ = ["AiovmcBackend"]

_PREFIX = b"aiovmc.fastapi-cache\x00"


class AiovmcBackend(Backend):
    """fastapi-cache2's `Backend` on an aiovmc cache: `get`, `get_with_ttl`
    (the remaining seconds, -1 for a value stored without expiry, and
    ``(0, None)`` on a miss, as its other backends), `set` and `clear`.

    ``AiovmcBackend(path=None, *, size=None, cache=None)``: the cache file's
    `path` (opened in each worker at first use; `size` creates it) or an open
    `AsyncCache` as `cache`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size: int | str | None = None,
        cache: AsyncCache | None = None,
    ) -> None:
        self._cache = LazyCache(path, size, cache)

    @staticmethod
    def _key(key: str) -> bytes:
        return _PREFIX + key.encode()

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        entry = await self._cache.get().get_entry(self._key(key))
        if entry is None:
            return 0, None
        if entry.expires_at is None:
            return -1, entry.value
        return max(0, int(entry.expires_at - time.time())), entry.value

    async def get(self, key: str) -> bytes | None:
        return await self._cache.get().get(self._key(key))

    async def set(self, key: str, value: bytes, expire: int | None = None) -> None:
        await self._cache.get().put(self._key(key), value, ttl=expire or None)

    async def clear(self, namespace: str | None = None, key: str | None = None) -> int:
        """Delete every key starting with `namespace` (a scan of the keys), or
        `key`; returns how many were deleted."""
        cache = self._cache.get()
        if namespace:
            prefix = self._key(namespace)
            stored = cache.cache.keys()  # a snapshot list
            victims = [k for k in stored if k.startswith(prefix)]
        elif key:
            victims = [self._key(key)]
        else:
            return 0
        removed = 0
        for victim in victims:
            removed += await cache.delete(victim)
        return removed
